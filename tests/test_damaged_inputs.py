"""Damaged or foreign inputs: a truncated file, a JSON file of the wrong shape, an encoder of another
architecture. Each is refused in one `error:` line naming the file (or, for a cache, recomputed and said once)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import REPO
from waveft.train.latent_cache import LatentCache, Latents


def test_a_truncated_latent_cache_entry_is_recomputed_and_said_once(tiny_sdxl_dir, tmp_path, capsys):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_sdxl_dir, subfolder="vae")
    pixels = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    keys = ["view-a", "view-b"]
    first = Latents(vae, LatentCache(str(tmp_path), "vae"), "cpu")
    expected = [first.posterior(pixels, key) for key in keys]
    for key in keys:  # a full disk or a copy cut short
        path = first.cache._path(key)
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 2])

    again = Latents(vae, LatentCache(str(tmp_path), "vae"), "cpu")
    got = [again.posterior(pixels, key) for key in keys]
    for (mean, std), (mean2, std2) in zip(expected, got):
        assert torch.equal(mean, mean2) and torch.equal(std, std2)
    assert again.cache.stats()["damaged"] == 2 and again.cache.stats()["misses"] == 2
    messages = [line for line in capsys.readouterr().err.splitlines() if "latent cache" in line]
    assert len(messages) == 1 and "is damaged; recomputing it" in messages[0]
    # The recomputed entries are whole: a third run reads them.
    third = LatentCache(str(tmp_path), "vae")
    assert all(third.get(key, "cpu") is not None for key in keys) and third.damaged == 0


def test_json_files_are_strict_json(tmp_path):
    from waveft.io.files import write_json_atomic

    path = tmp_path / "run_info.json"
    write_json_atomic(path, {"final_loss": 0.5})
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="JSON compliant"):
            write_json_atomic(path, {"final_loss": bad})
    assert json.loads(path.read_text()) == {"final_loss": 0.5}
    assert os.listdir(tmp_path) == ["run_info.json"]


WRITER = """
import sys, time
from waveft.io.files import write_atomic

def write(f):
    f.write(b"half an export")
    f.flush()
    print("writing", flush=True)
    time.sleep(600)

write_atomic(sys.argv[1], write)
"""


def _writer_mid_write(target):
    """A process stopped in the middle of write_atomic(target) (its temporary written, not yet moved)."""
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], stdout=subprocess.PIPE, text=True,
                              cwd=REPO, env={**os.environ, "PYTHONPATH": REPO})
    assert writer.stdout.readline().strip() == "writing"
    return writer


def test_a_killed_writer_leaves_no_temporary_behind_the_next_write(tmp_path):
    from waveft.io.files import write_atomic

    target = tmp_path / "toy_lora.safetensors"
    killed, live = _writer_mid_write(target), _writer_mid_write(target)
    try:
        killed.kill()  # SIGKILL: no cleanup runs
        killed.wait()
        temporaries = lambda: sorted(n for n in os.listdir(tmp_path) if n.endswith(".tmp"))  # noqa: E731
        assert len(temporaries()) == 2
        write_atomic(target, lambda f: f.write(b"whole export"))
        assert target.read_bytes() == b"whole export"
        (left,) = temporaries()  # the live writer's temporary is its own business
        assert f"-{live.pid}." in left
    finally:
        live.kill()
        live.wait()
