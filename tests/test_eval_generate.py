"""eval.generate_benchmark on the tiny SDXL: the subject's prompt list x seeds, resumable, with a full manifest."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from eval.encoders import EmbeddingCache
from eval.generate_benchmark import main
from eval.layout import GENERATION_TIMING, PART_MANIFEST
from eval.score import ScoreSettings, score_images
from eval.tiny_encoders import write_tiny_encoders
from tests.helpers import LIVE_TEMPLATES, run_info, run_tiny_training, write_benchmark

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # tiny SDXL pipelines, torchrun and CLI subprocesses
SEEDS = ("7", "8")


def write_trained_run(run_dir: Path, tiny_sdxl_dir: str, subject: str = "dog") -> None:
    """What the trainer leaves behind, with an untrained LoRA adapter (the plumbing is what is tested)."""
    from diffusers import UNet2DConditionModel

    from waveft.adapters.attach import attach_adapter
    from waveft.config import AdapterConfig
    from waveft.io.adapter_folder import save_adapter

    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl_dir, subfolder="unet")
    attach_adapter(unet, AdapterConfig(type="lora"))
    save_adapter(unet, str(run_dir / "adapter"))
    info = run_info("lora", 1.0, subject)
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"model": {"pretrained": tiny_sdxl_dir, "vae": None},
                                                         "data": {"subject": subject, "identifier": "zjw",
                                                                  "class_noun": info["class_noun"]}}))
    (run_dir / "run_info.json").write_text(json.dumps(info))


def generate(run_dir: Path, bench: Path, out: Path, *extra: str) -> None:
    main(["--runs", str(run_dir), "--benchmark", str(bench), "--out", str(out), "--seeds", *SEEDS, "--steps", "2",
          "--resolution", "64", "--batch-size", "3", "--dtype", "fp32", *extra])


def test_generation_is_complete_resumable_and_scorable(tiny_sdxl_dir, tmp_path):
    bench = write_benchmark(tmp_path / "bench")
    run_dir = tmp_path / "runs" / "lora_dog"
    write_trained_run(run_dir, tiny_sdxl_dir)
    out = tmp_path / "out"
    generate(run_dir, bench, out)

    folder = out / "lora_dog"
    rows = [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == len(LIVE_TEMPLATES) * len(SEEDS)  # dog: the live prompt list
    assert rows[0]["prompt"] == "a zjw dog in the jungle" and rows[0]["prompt_index"] == 0 and rows[0]["seed"] == 7
    for row in rows:
        assert (folder / row["file"]).is_file()
        assert row["subject"] == "dog" and row["identifier"] == "zjw" and row["run"] == "lora_dog"
        assert row["steps"] == 2 and row["height"] == row["width"] == 64 and row["scheduler"] == "dpmpp_2m"
        assert row["negative_prompt"].startswith("low quality, bad anatomy")
    assert json.loads((folder / "run_info.json").read_text())["method"] == "lora"
    assert not list(folder.glob(PART_MANIFEST.format(rank="*")))

    # Resume: a deleted image is made again; the others are kept untouched, including one that an interrupted
    # run listed only in its process's part manifest.
    mtimes = {row["file"]: os.stat(folder / row["file"]).st_mtime_ns for row in rows}
    (folder / rows[3]["file"]).unlink()
    (folder / PART_MANIFEST.format(rank=5)).write_text(json.dumps(rows[0]) + "\n")
    (folder / "manifest.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows[1:]))
    generate(run_dir, bench, out)
    assert (folder / rows[3]["file"]).is_file()
    assert all(os.stat(folder / f).st_mtime_ns == t for f, t in mtimes.items() if f != rows[3]["file"])
    assert [json.loads(line)["file"] for line in (folder / "manifest.jsonl").read_text().splitlines()] == [
        row["file"] for row in rows]
    assert not list(folder.glob(PART_MANIFEST.format(rank="*")))

    # Other settings into the same folder are refused, not mixed.
    with pytest.raises(SystemExit) as exit_info:
        generate(run_dir, bench, out, "--guidance-scale", "3")
    assert exit_info.value.code == 2

    encoders = tmp_path / "encoders"
    write_tiny_encoders(encoders)
    settings = ScoreSettings(str(encoders / "dino"), str(encoders / "clip"), str(encoders / "clip"), device="cpu")
    scores = score_images(folder, bench, settings, EmbeddingCache(tmp_path / "cache"))
    assert scores.overall["images"] == len(rows) and scores.run.subject == "dog"


def test_two_processes_split_one_run_and_merge_their_manifests(tiny_sdxl_dir, tmp_path):
    bench = write_benchmark(tmp_path / "bench")
    run_dir = tmp_path / "runs" / "lora_backpack"
    write_trained_run(run_dir, tiny_sdxl_dir, "backpack")
    out = tmp_path / "out"
    # torchrun on CPU: the same launch as accelerate's on several GPUs, with the gloo backend.
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "eval.generate_benchmark", "--runs", str(run_dir), "--benchmark", str(bench),
                             "--out", str(out), "--seeds", *SEEDS, "--steps", "2", "--resolution", "64",
                             "--dtype", "fp32"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "6 to generate on 2 process(es)" in result.stdout
    folder = out / run_dir.name
    rows = [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]
    assert [row["file"] for row in rows] == sorted(f"p{p:03d}_s{s}.png" for p in range(3) for s in SEEDS)
    assert rows[0]["prompt"] == "a zjw backpack in the jungle"  # an object: the object prompt list
    assert all((folder / row["file"]).is_file() for row in rows)
    assert not list(folder.glob(PART_MANIFEST.format(rank="*")))
    # Each image made once: the processes' own counts add up to the 6, not to 2 x 6.
    timing = json.loads((folder / GENERATION_TIMING).read_text())
    assert timing["processes"] == 2 and timing["images"] == 6


def test_bad_run_folder_is_a_one_line_error(tmp_path):
    bench = write_benchmark(tmp_path / "bench")
    (tmp_path / "not_a_run").mkdir()
    result = subprocess.run([sys.executable, "-m", "eval.generate_benchmark", "--runs", str(tmp_path / "not_a_run"),
                             "--benchmark", str(bench), "--out", str(tmp_path / "out")],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'not_a_run'} is not a finished training run: config.yaml is missing")


def train_tiny_run(run_dir: Path, tiny_sdxl_dir: str, subject_dir: str, *overrides: str) -> None:
    """A few real training steps of WaveFT on the tiny SDXL, at a learning rate that moves the weights."""
    result = run_tiny_training(tiny_sdxl_dir, subject_dir, run_dir, "data.subject=dog", "data.class_noun=dog",
                               "data.resolution=32", "train.max_steps=3", "train.learning_rate=0.05",
                               "train.checkpointing_steps=0", "train.report_to=none", "validation.final=false",
                               "validation.every_steps=0", *overrides, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def test_drift_is_one_for_a_zero_adapter_and_lower_for_a_trained_one(tiny_sdxl_dir, subject_dir, tmp_path):
    bench = write_benchmark(tmp_path / "bench")
    zero, trained = tmp_path / "runs" / "zero", tmp_path / "runs" / "trained"
    write_trained_run(zero, tiny_sdxl_dir)  # LoRA as initialised: B = 0, the base model's weights exactly
    train_tiny_run(trained, tiny_sdxl_dir, subject_dir)
    prompts = tmp_path / "drift.txt"
    prompts.write_text("a bowl of fruit on a table\n\na lighthouse at dusk\n")
    base_dir = tmp_path / "drift-base"
    drift_args = ("--drift-prompts", str(prompts), "--drift-base-dir", str(base_dir))
    generate(zero, bench, tmp_path / "out", *drift_args)
    (base,) = base_dir.iterdir()  # one folder per base model and settings
    made = {p.name: p.stat().st_mtime_ns for p in base.glob("*.png")}
    assert len(made) == 2 * len(SEEDS)
    generate(trained, bench, tmp_path / "out", *drift_args)  # another call, another run: the same base images
    assert {p.name: p.stat().st_mtime_ns for p in base.glob("*.png")} == made and list(base_dir.iterdir()) == [base]
    rows = [json.loads(line) for line in (tmp_path / "out/trained/drift/manifest.jsonl").read_text().splitlines()]
    assert {(r["prompt"], r["seed"]) for r in rows} == {(p, int(s)) for p in ("a bowl of fruit on a table",
                                                                             "a lighthouse at dusk") for s in SEEDS}
    timing = json.loads((tmp_path / "out/trained/generation.json").read_text())
    assert timing["images"] == len(LIVE_TEMPLATES) * len(SEEDS) and timing["images_per_second"] > 0

    encoders = tmp_path / "encoders"
    write_tiny_encoders(encoders)
    settings = ScoreSettings(str(encoders / "dino"), str(encoders / "clip"), str(encoders / "clip"), device="cpu")
    cache = EmbeddingCache(tmp_path / "cache")
    unchanged = score_images(tmp_path / "out/zero", bench, settings, cache)
    changed = score_images(tmp_path / "out/trained", bench, settings, cache)
    assert unchanged.per_subject["dog"]["drift"] == pytest.approx(1.0, abs=1e-6)
    assert unchanged.overall["drift"] == pytest.approx(1.0, abs=1e-6)
    assert len(changed.per_drift_image) == 2 * len(SEEDS)
    assert changed.overall["drift"] < 1.0 - 1e-4 and "2 prompts without the subject" in changed.settings["drift"]
    assert changed.run.scaling == 25.0 and changed.run.adapter_bytes > 0


def test_adapter_size_is_its_weights_file_in_the_run_and_in_the_benchmark_copy(tiny_sdxl_dir, subject_dir, tmp_path):
    """One definition of a run's adapter size, the adapter's weights file: the exports written beside it (and
    PEFT's config, the model card) are not counted, by the trainer or in the copy beside the benchmark images,
    whatever an older trainer recorded."""
    run_dir = tmp_path / "runs" / "exported"
    train_tiny_run(run_dir, tiny_sdxl_dir, subject_dir, "export.formats=[full-diff]")
    weights = (run_dir / "adapter" / "adapter_model.safetensors").stat().st_size
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["adapter_bytes"] == weights
    info["adapter_bytes"] = weights + 12345  # as a run trained before this definition recorded it
    (run_dir / "run_info.json").write_text(json.dumps(info))
    generate(run_dir, write_benchmark(tmp_path / "bench"), tmp_path / "out", "--no-drift")
    assert json.loads((tmp_path / "out" / "exported" / "run_info.json").read_text())["adapter_bytes"] == weights


def test_bad_drift_prompt_files_are_one_line_errors(tmp_path):
    bench = write_benchmark(tmp_path / "bench")
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00bad")
    for name, message in (("empty.txt", "holds no prompts"), ("binary.txt", "cannot read prompts file"),
                          ("absent.txt", "cannot read prompts file")):
        result = subprocess.run([sys.executable, "-m", "eval.generate_benchmark", "--runs", str(tmp_path),
                                 "--benchmark", str(bench), "--out", str(tmp_path / "out"),
                                 "--drift-prompts", str(tmp_path / name)],
                                cwd=REPO, capture_output=True, text=True, timeout=300)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and message in last and name in last
