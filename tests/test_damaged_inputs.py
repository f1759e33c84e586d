"""Damaged or foreign inputs: a truncated file, a JSON file of the wrong shape, an encoder of another
architecture. Each is refused in one `error:` line naming the file (or, for a cache, recomputed and said once)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO, write_generated
from tests.test_sweep import benchmark, sweep_args  # noqa: F401 (a fixture)
from waveft.errors import UserError
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


FOLDER_WRITER = """
import os, sys, time
from waveft.io.files import atomic_directory

with atomic_directory(sys.argv[1]) as staging:
    open(os.path.join(staging, "adapter_model.safetensors"), "wb").write(b"half a checkpoint")
    print("writing", flush=True)
    time.sleep(600)
"""


def test_a_killed_folder_writer_leaves_no_staging_folder_behind_the_next_write(tmp_path):
    from waveft.io.files import atomic_directory

    target = tmp_path / "checkpoint-4"
    writer = subprocess.Popen([sys.executable, "-c", FOLDER_WRITER, str(target)], stdout=subprocess.PIPE, text=True,
                              cwd=REPO, env={**os.environ, "PYTHONPATH": REPO})
    assert writer.stdout.readline().strip() == "writing"
    writer.kill()
    writer.wait()
    assert len(os.listdir(tmp_path)) == 1 and not target.exists()  # its staging folder, nothing else
    with atomic_directory(target) as staging:
        (Path(staging) / "adapter_model.safetensors").write_bytes(b"whole checkpoint")
    assert os.listdir(tmp_path) == ["checkpoint-4"]
    assert (target / "adapter_model.safetensors").read_bytes() == b"whole checkpoint"


def test_a_folder_writer_killed_between_its_two_renames_loses_nothing(tmp_path):
    """The window where the previous folder sits in the writer's temporary and `path` does not exist: the next
    writer of `path` puts it back before anything else (and then replaces it whole, as usual)."""
    from waveft.io.files import _temporary_prefix, atomic_directory

    target = tmp_path / "adapter"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    left = tmp_path / f"{_temporary_prefix(target)}{int(dead.stdout)}.abc.tmp"
    (left / "previous").mkdir(parents=True)
    (left / "previous" / "adapter_config.json").write_text("{}")
    with pytest.raises(RuntimeError), atomic_directory(target):
        raise RuntimeError("the new version fails")
    assert os.listdir(tmp_path) == ["adapter"] and (target / "adapter_config.json").read_text() == "{}"


@pytest.fixture(scope="module")
def tiny_encoders(tmp_path_factory):
    from eval.tiny_encoders import write_tiny_encoders

    folder = tmp_path_factory.mktemp("encoders")
    write_tiny_encoders(folder)
    return folder


def test_an_encoder_of_another_architecture_is_refused(tiny_encoders, tmp_path):
    from safetensors.torch import load_file, save_file

    from eval.encoders import ClipEncoder, DinoEncoder

    assert DinoEncoder.load(str(tiny_encoders / "dino"), "cpu").architecture == "vit"
    with pytest.raises(UserError, match="given as the DINO encoder is a 'clip' model"):
        DinoEncoder.load(str(tiny_encoders / "clip"), "cpu")
    with pytest.raises(UserError, match="given as the CLIP encoder is a 'vit' model"):
        ClipEncoder.load(str(tiny_encoders / "dino"), "cpu")
    # A checkpoint of the right type that lacks weights would score with randomly initialised ones.
    partial = tmp_path / "dino"
    shutil.copytree(tiny_encoders / "dino", partial)
    weights = load_file(partial / "model.safetensors")
    dropped = sorted(weights)[-1]
    save_file({k: v for k, v in weights.items() if k != dropped}, partial / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(UserError, match="given as the DINO encoder lacks 1 of the ViTModel's weights"):
        DinoEncoder.load(str(partial), "cpu")


@pytest.mark.parametrize("content, message", [
    ("[1, 2]", "expected a JSON object, found list"),
    ('{"settings": {}, "per_subject": [], "smoke_test": false}', "key 'per_subject' must be a dict, found list"),
    ('{"settings": {}, "per_subject": {}, "smoke_test": false, "run": {"method": "lora"}}', "key 'run': missing keys"),
    ("{not json", "cannot read"),
])
def test_report_refuses_a_metrics_file_of_the_wrong_shape(content, message, tmp_path, capsys):
    from eval.report import main

    (tmp_path / "metrics.json").write_text(content)
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "metrics.json"), "--out", str(tmp_path / "report")])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert exit_info.value.code == 2 and len(errors) == 1 and message in errors[0]
    assert str(tmp_path / "metrics.json") in errors[0]
    assert not (tmp_path / "report").exists()


def test_score_refuses_a_run_info_of_the_wrong_shape(tmp_path, tiny_encoders, capsys):
    from eval.score import main

    write_generated(tmp_path / "images", run_info=None)
    (tmp_path / "images" / "run_info.json").write_text('["waveft"]')
    encoders = ["--dino", str(tiny_encoders / "dino"), "--clip", str(tiny_encoders / "clip"),
                "--cmmd-clip", str(tiny_encoders / "clip")]  # local: the run record is what is refused
    with pytest.raises(SystemExit) as exit_info:
        main(["--images", str(tmp_path / "images"), "--real", str(tmp_path), "--out", str(tmp_path / "metrics"),
              *encoders])
    (error,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert exit_info.value.code == 2 and "run_info.json" in error and "not a run record" in error


@pytest.mark.parametrize("override, message", [
    ("generation.drift_prompts={tmp}/drift.txt", "key 'generation.drift_prompts': cannot read prompts file"),
    ("scoring.tiny_encoders={swapped}", "key 'scoring.tiny_encoders': encoder '{swapped}/dino' given as the DINO "
                                        "encoder is a 'clip' model"),
])
def test_a_dry_run_opens_what_later_stages_read(override, message, tmp_path, tiny_encoders, benchmark,  # noqa: F811
                                                tiny_sdxl_dir, monkeypatch, capsys):
    from eval.sweep.cli import main

    swapped = tmp_path / "swapped"  # dino/ holds a CLIP checkpoint
    shutil.copytree(tiny_encoders / "clip", swapped / "dino")
    shutil.copytree(tiny_encoders / "clip", swapped / "clip")
    monkeypatch.chdir(REPO)
    args = sweep_args(tmp_path, benchmark, tiny_sdxl_dir, override.format(tmp=tmp_path, swapped=swapped), "--dry-run")
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert exit_info.value.code == 2 and len(errors) == 1
    assert message.format(swapped=swapped) in errors[0]


def test_a_sweep_refuses_a_dino_folder_that_is_missing(tmp_path, benchmark, tiny_sdxl_dir, monkeypatch,  # noqa: F811
                                                       capsys):
    from eval.sweep.cli import main

    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit):
        main(sweep_args(tmp_path, benchmark, tiny_sdxl_dir, "scoring.tiny_encoders=null",
                        f"scoring.dino={tmp_path}/dino", "scoring.lpips=null", "--dry-run"))
    assert f"key 'scoring.dino': DINO encoder folder not found: {tmp_path}/dino" in capsys.readouterr().err


@pytest.mark.parametrize("content, message", [("[]", "expected a JSON object, found list"),
                                              ('{"settings": "fp16"}', "key 'settings' must be a dict, found str")])
def test_a_sweep_refuses_a_done_record_of_the_wrong_shape(content, message, tmp_path, benchmark, tiny_sdxl_dir,  # noqa: F811
                                                          monkeypatch, capsys):
    from eval.sweep.cli import main

    monkeypatch.chdir(REPO)
    done = tmp_path / "sweep" / "runs" / "waveft" / "budget-1" / "puppy" / "seed-42" / "done.json"
    done.parent.mkdir(parents=True)
    done.write_text(content)
    with pytest.raises(SystemExit) as exit_info:
        main(sweep_args(tmp_path, benchmark, tiny_sdxl_dir, "--dry-run"))
    (error,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert exit_info.value.code == 2 and f"{done}: {message}" in error
