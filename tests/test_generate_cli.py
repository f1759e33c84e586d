"""The user's path end to end: train with the CLI, then generate with the CLI from the saved adapter."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.helpers import REPO
from waveft.infer.cli import main as generate

pytestmark = pytest.mark.slow  # the training and generation CLIs in subprocesses


def run(*args):
    result = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True)
    return result


@pytest.fixture(scope="module")
def trained_run(tiny_sdxl_dir, subject_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    result = run("train_dreambooth_waveft.py", "--config", "configs/tiny.yaml", f"output_dir={out}",
                 f"model.pretrained={tiny_sdxl_dir}", f"data.instance_dir={subject_dir}", "data.resolution=32",
                 "train.max_steps=4", "train.checkpointing_steps=2", "validation.every_steps=2", "validation.steps=2")
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_training_cli_writes_the_documented_layout(trained_run):
    for path in ["config.yaml", "adapter/adapter_config.json", "adapter/adapter_model.safetensors", "run_info.json",
                 "checkpoint-2", "checkpoint-4", "validation/step-000002/grid.png", "validation/step-000004/grid.png",
                 "samples/grid.png", "samples/manifest.jsonl", "logs"]:
        assert (trained_run / path).exists(), path
    info = json.loads((trained_run / "run_info.json").read_text())
    assert info["method"] == "waveft" and info["steps"] == 4 and info["trainable_parameters"] == 64 * 64
    card = (trained_run / "adapter" / "README.md").read_text()
    assert "library_name: peft" in card and "instance_prompt: a zjw ball" in card and "4,096 trainable" in card
    assert Image.open(trained_run / "loss.png").size[0] > 100  # saved without validation.loss
    # 2 validation prompts x 2 seeds, 32 px each, each over its caption (tests/test_grid.py)
    assert Image.open(trained_run / "samples" / "grid.png").size[0] == 2 * 32


def test_generate_cli_images_manifest_and_resume(trained_run, tmp_path):
    out = tmp_path / "gen"
    args = ("-m", "waveft.generate", "--adapter", str(trained_run / "adapter"), "--prompt", "a zjw ball",
            "--prompt", "a zjw ball in the snow", "--seeds", "3", "4", "--out", str(out), "--steps", "2",
            "--height", "32", "--width", "48", "--scheduler", "euler", "--negative-prompt", "blurry",
            "--guidance-scale", "4.0", "--batch-size", "3")
    first = run(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    rows = [json.loads(l) for l in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and {(r["prompt"], r["seed"]) for r in rows} == {
        (p, s) for p in ("a zjw ball", "a zjw ball in the snow") for s in (3, 4)}
    for row in rows:
        assert Image.open(out / row["file"]).size == (48, 32)
        settings = (row["steps"], row["scheduler"], row["negative_prompt"], row["guidance_scale"])
        assert settings == (2, "euler", "blurry", 4.0)
        assert row["base_model"] == str(json.loads((trained_run / "run_info.json").read_text())["base_model"])
    assert (out / "grid.png").exists()
    # Resumable: a missing image is regenerated, existing ones are kept.
    kept = out / rows[0]["file"]
    mtime = os.path.getmtime(kept)
    (out / rows[1]["file"]).unlink()
    assert run(*args).returncode == 0
    assert os.path.getmtime(kept) == mtime and (out / rows[1]["file"]).exists()


def image(folder, name="p000_s3.png"):
    return np.asarray(Image.open(folder / name), dtype=np.int16)


def test_each_generation_setting_changes_the_image(trained_run, tmp_path):
    """The manifest records the settings; the images must show them: changing any one changes the picture."""
    common = ["--adapter", str(trained_run), "--prompt", "a zjw ball", "--seeds", "3", "--steps", "2",
              "--height", "32", "--width", "32"]
    reference = ["--scheduler", "euler", "--negative-prompt", "blurry", "--guidance-scale", "4.0"]
    generate([*common, *reference, "--out", str(tmp_path / "reference")])
    unchanged = []
    for name, change in [("scheduler", ["--scheduler", "ddim"]), ("negative prompt", ["--negative-prompt", "red"]),
                         ("guidance", ["--guidance-scale", "9.0"])]:
        generate([*common, *reference, *change, "--out", str(tmp_path / name)])
        if np.abs(image(tmp_path / name) - image(tmp_path / "reference")).max() <= 8:
            unchanged.append(name)
    assert unchanged == []  # settings that do not reach the pipeline


def test_same_seed_gives_same_image_whatever_the_batch(trained_run, tmp_path, monkeypatch):
    from diffusers import StableDiffusionXLPipeline

    batches = []  # prompts per pipeline call, seen by a spy that then runs the real pipeline
    real_call = StableDiffusionXLPipeline.__call__
    monkeypatch.setattr(StableDiffusionXLPipeline, "__call__",
                        lambda pipe, **kwargs: batches.append(len(kwargs["prompt"])) or real_call(pipe, **kwargs))
    common = ["--adapter", str(trained_run / "adapter"), "--prompt", "a zjw ball", "--seeds", "7", "8", "--steps",
              "2", "--height", "32", "--width", "32"]
    generate([*common, "--out", str(tmp_path / "a"), "--batch-size", "1"])
    generate([*common, "--out", str(tmp_path / "b"), "--batch-size", "2"])
    assert batches == [1, 1, 2]
    for name in ("p000_s7.png", "p000_s8.png"):
        assert np.abs(image(tmp_path / "a", name) - image(tmp_path / "b", name)).max() <= 1


def test_generate_cli_bad_input(tmp_path):
    for args, message in [
        (("--adapter", str(tmp_path), "--base", "x", "--prompt", "p", "--out", str(tmp_path / "o")),
         f"--adapter {tmp_path} is neither an adapter folder"),
        (("--adapter", str(tmp_path / "typo"), "--prompt", "p", "--out", str(tmp_path / "o")),
         f"--adapter {tmp_path / 'typo'}: no such folder"),
        (("--out", str(tmp_path / "o"), "--base", "x"), "no prompts"),
        (("--prompt", "p", "--out", str(tmp_path / "o")), "no base model"),
    ]:
        result = run("-m", "waveft.generate", *args)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert message in result.stderr.strip().splitlines()[-1]
