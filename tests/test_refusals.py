"""Refusals that touch nothing: a run or command refused for bad input leaves what it would have written
byte-identical (or absent), and says so in one `error:` line naming the setting, file or value."""
import hashlib
import os
import shutil

import pytest

from tests.helpers import tiny_cfg, write_benchmark
from waveft.config import load_config
from waveft.errors import UserError


def tree_digest(folder) -> dict | None:
    """{relative path: sha256 of the file, or 'folder'} for everything under `folder`; None if it is absent."""
    if not os.path.exists(folder):
        return None
    digest = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            digest[os.path.relpath(os.path.join(root, name), folder)] = "folder"
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                digest[os.path.relpath(os.path.join(root, name), folder)] = hashlib.sha256(f.read()).hexdigest()
    return digest


@pytest.fixture(scope="module")
def finished_run(tiny_sdxl_dir, subject_dir, tmp_path_factory):
    """A finished two-step run with its checkpoints: what a refused `overwrite_output_dir=true` must not delete."""
    from waveft.train.loop import train

    out = tmp_path_factory.mktemp("refusals") / "run"
    train(tiny_cfg(tiny_sdxl_dir, subject_dir, out, "train.max_steps=2", "train.checkpointing_steps=1"))
    return out


# Each class of refusal a training run can meet, with the message naming its culprit. `{tmp}` is a scratch
# folder; `{file}` a regular file there (a folder path through it cannot be created).
TRAINING_REFUSALS = {
    "missing validation images": (("validation.loss.every_steps=1", "validation.loss.images={tmp}/held_out"),
                                  "validation.loss.images folder not found"),
    "mistyped instance folder": (("data.instance_dir={tmp}/toy_bal",), "instance folder not found: .*toy_bal"),
    "missing VAE folder": (("model.vae={tmp}/vae",), "model.vae: folder not found"),
    "missing checkpoint": (("train.resume={tmp}/checkpoint-9",), "train.resume: .* is not a checkpoint folder"),
    "adapter that does not fit": (("adapter.peft.n_frequency=5000",), "adapter.peft.n_frequency=5000 is out of range"),
    "buckets no image fits": (("data.buckets.enabled=true", "data.buckets.area=12288", "data.buckets.max_ratio=1"),
                              r"data.buckets: no bucket .*data.buckets.max_ratio"),
    "unwritable latent cache": (("data.latent_cache_dir={file}/latents",), "data.latent_cache_dir: .* not writable"),
    "optimizer beta": (("train.adam_beta2=1.0",), r"key 'train.adam_beta2' must be in \[0, 1\)"),
    "NaN learning rate": (("train.learning_rate=nan",), "key 'train.learning_rate' must be a finite number"),
    "text-encoder targets that match nothing": (
        ("adapter.text_encoders.enabled=true", "adapter.text_encoders.target_modules=[to_q]"),
        "adapter.text_encoders.target_modules entry 'to_q' matches no module of the text_encoder"),
}


def _refuse(tiny_sdxl_dir, subject_dir, out, tmp_path, overrides, message):
    from waveft.train.loop import train

    (tmp_path / "a_file").write_text("")
    overrides = [o.format(tmp=tmp_path, file=tmp_path / "a_file") for o in overrides]
    with pytest.raises(UserError, match=message):
        train(tiny_cfg(tiny_sdxl_dir, subject_dir, out, *overrides))


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(TRAINING_REFUSALS))
def test_a_refused_run_leaves_a_finished_run_byte_identical(case, finished_run, tiny_sdxl_dir, subject_dir,
                                                            tmp_path):
    before = tree_digest(finished_run)
    assert any(name.startswith("checkpoint-") for name in before)
    overrides, message = TRAINING_REFUSALS[case]
    _refuse(tiny_sdxl_dir, subject_dir, finished_run, tmp_path, ("overwrite_output_dir=true", *overrides), message)
    assert tree_digest(finished_run) == before


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(TRAINING_REFUSALS))
def test_a_refused_run_creates_no_output_folder(case, tiny_sdxl_dir, subject_dir, tmp_path):
    out = tmp_path / "fresh" / "run"
    overrides, message = TRAINING_REFUSALS[case]
    _refuse(tiny_sdxl_dir, subject_dir, out, tmp_path, overrides, message)
    assert not (tmp_path / "fresh").exists()
    assert not (tmp_path / "toy_bal").exists()  # a mistyped folder is not filled with toy images


@pytest.mark.parametrize("override, message", [
    ("train.adam_beta1=1.0", r"key 'train.adam_beta1' must be in \[0, 1\)"),
    ("train.adam_beta2=-0.5", r"key 'train.adam_beta2' must be in \[0, 1\)"),
    ("train.adam_epsilon=0", "key 'train.adam_epsilon' must be > 0"),
    ("train.adam_weight_decay=-1", "key 'train.adam_weight_decay' must be >= 0"),
    ("train.prodigy_d_coef=0", "key 'train.prodigy_d_coef' must be > 0"),
    ("train.max_grad_norm=0", "key 'train.max_grad_norm' must be > 0"),
    ("train.snr_gamma=-5", "key 'train.snr_gamma' must be > 0"),
    ("data.prior_preservation.loss_weight=-1", "key 'data.prior_preservation.loss_weight' must be >= 0"),
    ("train.learning_rate=.nan", "key 'train.learning_rate' must be a finite number, got nan"),
    ("train.noise_offset=inf", "key 'train.noise_offset' must be a finite number, got inf"),
    ("data.buckets.max_ratio=-.inf", "key 'data.buckets.max_ratio' must be a finite number"),
    ("adapter.peft.scaling=.nan", "key 'adapter.peft.scaling' must be a finite number"),
])
def test_optimizer_settings_and_non_finite_numbers_are_refused_naming_the_key(override, message):
    with pytest.raises(UserError, match=message):
        load_config(None, ("output_dir=out", "data.instance_dir=imgs", override))


def test_the_toy_subject_is_made_only_in_its_own_folder(tmp_path):
    from waveft.train.data import DreamBoothDataset, ensure_instance_images

    def data(folder):
        return load_config(None, ("output_dir=out", f"data.instance_dir={folder}",
                                  "data.synthetic_if_missing=true")).data

    ensure_instance_images(data(tmp_path / "toy_ball"))
    assert len(os.listdir(tmp_path / "toy_ball")) == 4
    for typo in (tmp_path / "my_dog", tmp_path / "toy_bal"):
        ensure_instance_images(data(typo))
        with pytest.raises(UserError, match=f"instance folder not found: {typo}"):
            DreamBoothDataset(data(typo), seed=0)
    assert sorted(os.listdir(tmp_path)) == ["toy_ball"]


def refused_in_one_line(main, argv, capsys) -> str:
    """Run a CLI's main(argv) in this process; it must exit 2 with one `error:` line, which is returned."""
    with pytest.raises(SystemExit) as exit_info:
        main([str(arg) for arg in argv])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert exit_info.value.code == 2 and len(errors) == 1, errors
    return errors[0]


def _commands():
    from eval.generate_benchmark import main as benchmark
    from eval.report import main as report
    from eval.score import main as score
    from waveft.export.cli import main as export
    from waveft.infer.cli import main as generate

    return {"generate": generate, "export": export, "benchmark": benchmark, "score": score, "report": report}


def _argv(command, run, out, tiny_sdxl_dir, tmp_path):
    """Each writing command on `run` (a trained run), writing to `out`."""
    bench = tmp_path / "bench"
    if not bench.exists():
        write_benchmark(bench)
    return {
        "generate": ["--adapter", run / "adapter", "--base", tiny_sdxl_dir, "--prompt", "a zjw ball", "--out", out,
                     "--steps", "1", "--height", "32", "--width", "32"],
        "export": ["--adapter", run / "adapter", "--format", "lora", "--base", tiny_sdxl_dir,
                   "--out", out / "toy_lora.safetensors"],
        "benchmark": ["--runs", run, "--benchmark", bench, "--out", out],
        "score": ["--images", run, "--real", bench, "--out", out],
        "report": [run, "--out", out],
    }[command]


@pytest.mark.slow
@pytest.mark.parametrize("command", ["generate", "export", "benchmark", "score", "report"])
def test_a_destination_that_cannot_be_written_is_refused_before_any_work(command, finished_run, tiny_sdxl_dir,
                                                                         tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    out = tmp_path / "a_file" / "out"  # a folder under a file: no user can write there
    error = refused_in_one_line(_commands()[command], _argv(command, finished_run, out, tiny_sdxl_dir, tmp_path),
                                capsys)
    assert "--out" in error and "cannot be written" in error and "a_file is a file" in error


@pytest.mark.slow
@pytest.mark.parametrize("command", ["generate", "export", "benchmark"])
def test_truncated_adapter_weights_are_refused_by_every_reader(command, finished_run, tiny_sdxl_dir, tmp_path,
                                                               capsys):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    weights = run / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    out = tmp_path / "out"
    error = refused_in_one_line(_commands()[command], _argv(command, run, out, tiny_sdxl_dir, tmp_path), capsys)
    assert f"{weights}: damaged adapter weights" in error
    assert not out.exists()


@pytest.mark.parametrize("command, argv, flag", [
    ("generate", ["--prompt", "p", "--base", "b", "--out", "{tmp}/out", "--guidance-scale", "nan"], "--guidance-scale"),
    ("export", ["--adapter", "a", "--format", "lora", "--out", "{tmp}/x.safetensors", "--energy", "inf"], "--energy"),
    ("report", ["{tmp}", "--out", "{tmp}/out", "--comparison-budget", "nan"], "--comparison-budget"),
])
def test_non_finite_numeric_flags_are_refused_naming_the_flag(command, argv, flag, tmp_path, capsys):
    error = refused_in_one_line(_commands()[command], [a.format(tmp=tmp_path) for a in argv], capsys)
    assert error.startswith(f"error: {flag} must be a finite number")
    assert os.listdir(tmp_path) == []
