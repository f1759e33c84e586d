"""eval.score and eval.report end to end, in subprocesses, on tiny random encoders and synthetic images."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eval.encoders import EmbeddingCache
from eval.score import ScoreSettings, score_images
from eval.tiny_encoders import write_tiny_encoders
from tests.helpers import run_info, write_benchmark, write_generated

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # every test here starts CLI subprocesses


def run_cli(module: str, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


def assert_user_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ")
    for fragment in fragments:
        assert fragment in last


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_cli")
    write_tiny_encoders(root / "encoders")
    write_benchmark(root / "bench")
    write_generated(root / "images", run_info=run_info("waveft", 1.0))
    return root


def encoder_args(root: Path) -> list:
    return ["--dino", root / "encoders/dino", "--clip", root / "encoders/clip", "--cmmd-clip", root / "encoders/clip",
            "--cache-dir", root / "cache", "--device", "cpu"]


def score_cli(root: Path, images: Path, out: Path, bench: Path | None = None) -> subprocess.CompletedProcess:
    return run_cli("eval.score", "--images", images, "--real", bench or root / "bench", "--out", out,
                   *encoder_args(root))


@pytest.fixture(scope="module")
def scored(workspace):
    result = score_cli(workspace, workspace / "images", workspace / "scores")
    assert result.returncode == 0, result.stderr
    return workspace / "scores", result


def test_score_writes_labelled_tables(scored):
    out, result = scored
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["smoke_test"] is True and "SMOKE TEST" in metrics["smoke_test_note"]
    assert metrics["run"]["method"] == "waveft"
    assert metrics["overall"]["subjects"] == 2 and metrics["overall"]["images"] == 8
    assert sorted(metrics["per_subject"]) == ["backpack", "dog"]
    assert len(metrics["per_prompt"]) == 4 and all(p["images"] == 2 for p in metrics["per_prompt"])
    assert metrics["overall"]["lpips_div"] is None and "pip install lpips" in metrics["settings"]["lpips_div"]
    for key in ("dino", "clip_i", "clip_t", "dino_div", "cmmd"):
        per_subject = [s[key] for s in metrics["per_subject"].values()]
        assert metrics["overall"][key] == pytest.approx(np.mean(per_subject))
    assert metrics["settings"]["clip_t_prompt"] == "without-identifier"
    markdown = (out / "metrics.md").read_text()
    assert "SMOKE TEST" in markdown and "| backpack | 4 |" in markdown and "n/a" in markdown
    csv_lines = (out / "metrics.csv").read_text().splitlines()
    assert csv_lines[0].startswith("scope,subject,prompt_index,prompt,images,dino,clip_i,clip_t")
    assert len(csv_lines) == 1 + 1 + 2 + 4 and all(line.endswith(",True") for line in csv_lines[1:])
    assert "SMOKE TEST" in result.stdout and "| DINO | CLIP-I | CLIP-T | LPIPS-div | DINO-div | CMMD |" in result.stdout


def test_copies_of_the_only_real_image_score_perfectly(workspace, tmp_path):
    """Generated images identical to a subject's single real image: DINO = CLIP-I = 1, diversity 0, CMMD 0."""
    bench = tmp_path / "bench"
    shutil.copytree(workspace / "bench", bench)
    for extra in sorted((bench / "dataset/dog").glob("*.jpg"))[1:]:
        extra.unlink()
    rows = write_generated(tmp_path / "images", subjects=("dog",), prompts=2, seeds=(1, 2, 3))
    real = Image.open(bench / "dataset/dog/00.jpg")
    for row in rows:
        real.save(tmp_path / "images" / row["file"])
    settings = ScoreSettings(str(workspace / "encoders/dino"), str(workspace / "encoders/clip"),
                             str(workspace / "encoders/clip"), device="cpu")
    dog = score_images(tmp_path / "images", bench, settings, EmbeddingCache(tmp_path / "cache")).per_subject["dog"]
    assert dog["dino"] == pytest.approx(1.0, abs=1e-5) and dog["clip_i"] == pytest.approx(1.0, abs=1e-5)
    assert dog["dino_div"] == pytest.approx(0.0, abs=1e-5) and dog["cmmd"] == pytest.approx(0.0, abs=1e-3)


def test_score_bad_inputs_fail_cleanly_and_leave_earlier_results(workspace, scored, tmp_path):
    out, _ = scored
    before = {name: (out / name).read_bytes() for name in ("metrics.json", "metrics.csv", "metrics.md")}

    empty = tmp_path / "empty"
    empty.mkdir()
    assert_user_error(score_cli(workspace, empty, out), "no manifest.jsonl in")

    missing = tmp_path / "missing"
    shutil.copytree(workspace / "images", missing)
    (missing / "dog/p001_s43.png").unlink()
    assert_user_error(score_cli(workspace, missing, out), "missing image file", "p001_s43.png")

    broken = tmp_path / "broken"
    shutil.copytree(workspace / "images", broken)
    (broken / "backpack/p000_s42.png").write_bytes(b"\x89PNG truncated")
    assert_user_error(score_cli(workspace, broken, out), "cannot read image", "p000_s42.png")

    no_real = tmp_path / "no_real"
    shutil.copytree(workspace / "bench", no_real)
    shutil.rmtree(no_real / "dataset/dog")
    assert_user_error(score_cli(workspace, workspace / "images", out, no_real), "no real images for subject 'dog'")

    bad_prompts = tmp_path / "bad_prompts"
    shutil.copytree(workspace / "bench", bad_prompts)
    prompts = bad_prompts / "dataset/prompts_and_classes.txt"
    prompts.write_text(prompts.read_text().replace("Object Prompts", "Objects"))
    assert_user_error(score_cli(workspace, workspace / "images", out, bad_prompts),
                      f"{prompts}:11:", "expected 'Object Prompts'")

    assert {name: (out / name).read_bytes() for name in before} == before


def write_scored_run(folder: Path, scored_metrics: dict, method: str, budget, subject: str, dino: float) -> None:
    metrics = json.loads(json.dumps(scored_metrics))
    metrics["run"] = run_info(method, budget, subject)
    metrics["per_subject"] = {subject: {**metrics["per_subject"]["dog"], "dino": dino}}
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps(metrics))


def test_report_groups_runs_by_method_and_budget(scored, tmp_path):
    out, _ = scored
    base = json.loads((out / "metrics.json").read_text())
    sweep = tmp_path / "sweep"
    write_scored_run(sweep / "w1_dog", base, "waveft", 1.0, "dog", 0.4)
    write_scored_run(sweep / "w1_backpack", base, "waveft", 1.0, "backpack", 0.6)
    write_scored_run(sweep / "w2_dog", base, "waveft", 2.0, "dog", 0.7)
    write_scored_run(sweep / "l1_dog", base, "lora", 1.0, "dog", 0.3)
    report = tmp_path / "report"
    result = run_cli("eval.report", sweep / "w1_dog" / "metrics.json", sweep, "--out", report)
    assert result.returncode == 0, result.stderr
    assert "SMOKE TEST" in result.stdout
    # waveft at budget 1: two subjects, DINO 0.4 and 0.6 -> mean 0.5, standard error 0.1
    assert "| waveft | 1 | 1,451,520 | 2 | 0.500 ± 0.100 |" in result.stdout
    assert "| waveft | 2 | 2,903,040 | 1 | 0.700 |" in result.stdout
    markdown = (report / "report.md").read_text()
    assert "SMOKE TEST" in markdown and "4 scored runs" in markdown
    csv_lines = (report / "report.csv").read_text().splitlines()
    assert [line.split(",")[:2] for line in csv_lines[1:]] == [["lora", "1.0"], ["waveft", "1.0"], ["waveft", "2.0"]]
    latex = (report / "report.tex").read_text()
    assert r"\begin{tabular}" in latex and r"0.500 $\pm$ 0.100" in latex and "SMOKE TEST" in latex
    for plot in ("tradeoff.png", "metrics_vs_budget.png"):
        assert Image.open(report / plot).format == "PNG"


def test_report_bad_inputs(scored, tmp_path):
    out, _ = scored
    assert_user_error(run_cli("eval.report", tmp_path, "--out", tmp_path / "r"), "no metrics.json under")
    other = json.loads((out / "metrics.json").read_text())
    other["settings"]["clip_t_prompt"] = "as-generated"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "metrics.json").write_text(json.dumps(other))
    assert_user_error(run_cli("eval.report", out, tmp_path / "other", "--out", tmp_path / "r"),
                      "scored with other settings", "clip_t_prompt")
