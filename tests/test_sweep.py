"""scripts/sweep.py on configs/sweeps/tiny.yaml over a synthetic benchmark: end to end, killed and resumed, a
failing run recorded while the others finish, and bad sweep files refused before any work."""
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from eval.sweep.cli import main
from tests.helpers import prompts_file_text

REPO = Path(__file__).resolve().parents[1]
SWEEP = REPO / "scripts" / "sweep.py"
TINY_SWEEP = "configs/sweeps/tiny.yaml"
# puppy is the subject the tiny sweep runs; broken's images cannot be read (its runs fail); teddy makes the
# benchmark hold an object subject too (the paper sweeps are validated on all three).
SUBJECTS = {"puppy": "dog", "teddy": "toy", "broken": "toy"}


@pytest.fixture(scope="module")
def benchmark(tmp_path_factory) -> Path:
    """<root>/dataset/<subject>/NN.jpg and prompts_and_classes.txt in the published layout, one prompt per list."""
    root = tmp_path_factory.mktemp("dreambooth")
    dataset = root / "dataset"
    dataset.mkdir()
    (dataset / "prompts_and_classes.txt").write_text(
        prompts_file_text(SUBJECTS, ["a {0} {1} on the beach"], ["a {0} {1} in the snow"]))
    rng = np.random.default_rng(0)
    for subject in SUBJECTS:
        (dataset / subject).mkdir()
        for i in range(3):
            path = dataset / subject / f"{i:02d}.jpg"
            if subject == "broken":
                path.write_bytes(b"not a jpeg")
                continue
            image = Image.new("RGB", (80, 72), tuple(int(c) for c in rng.integers(0, 256, 3)))
            x, y = rng.integers(8, 32, 2)
            ImageDraw.Draw(image).ellipse([x, y, x + 36, y + 30], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
            image.save(path)
    return root


def sweep_args(tmp_path: Path, benchmark: Path, tiny_sdxl_dir: str, *extra: str) -> list[str]:
    """The tiny sweep (2 methods) on one subject of the synthetic benchmark: 2 runs, the fewest that show resuming."""
    return ["--sweep", TINY_SWEEP, f"output_dir={tmp_path / 'sweep'}", f"benchmark.dir={benchmark}", "subjects=[puppy]",
            f"scoring.tiny_encoders={tmp_path.parent / 'tiny-encoders'}", f"scoring.cache_dir={tmp_path / 'cache'}",
            f"overrides.model.pretrained={tiny_sdxl_dir}", *extra]


def run_sweep(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SWEEP), *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def done_markers(out: Path) -> list[Path]:
    return sorted(out.glob("runs/*/budget-*/*/seed-*/done.json"))


@pytest.mark.slow
def test_sweep_survives_a_kill_resumes_and_records_failures(tmp_path, benchmark, tiny_sdxl_dir):
    out = tmp_path / "sweep"
    args = sweep_args(tmp_path, benchmark, tiny_sdxl_dir)

    # 1. Start the sweep and kill its whole process group (the stage subprocesses too) once a run is finished.
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen([sys.executable, str(SWEEP), *args], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        deadline = time.time() + 240
        while not done_markers(out):
            assert first.poll() is None, (f"the sweep ended before finishing a run:\n"
                                          f"{(tmp_path / 'first.log').read_text()}")
            assert time.time() < deadline, "no run finished in time"
            time.sleep(0.5)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    (finished,) = done_markers(out)
    finished_run = finished.parent
    before = snapshot(finished_run)

    # 2. Restart with a subject whose images are unreadable added: its runs fail, the others resume and finish.
    result = run_sweep(args + ["subjects=[puppy, broken]"])
    assert result.returncode == 1, result.stdout + result.stderr
    assert snapshot(finished_run) == before  # the finished run was skipped, not redone
    good_runs = [p.parent for p in done_markers(out)]
    assert [p.relative_to(out / "runs").as_posix() for p in good_runs] == ["lora/budget-1/puppy/seed-42",
                                                                         "waveft/budget-1/puppy/seed-42"]
    failed = sorted(out.glob("runs/*/budget-1/broken/seed-42/failed.json"))
    assert len(failed) == 2
    failure = json.loads(failed[0].read_text())
    assert failure["stage"] == "train" and "cannot read image" in failure["error"] and Path(failure["log"]).is_file()
    assert "2 failure(s)" in result.stderr and "broken/seed-42 at train" in result.stderr

    # Every finished run went through all three stages, and its scores carry the sweep's method name.
    for run in good_runs:
        done = json.loads((run / "done.json").read_text())
        metrics = json.loads((run / done["metrics"]).read_text())
        assert metrics["run"]["method"] == done["method"] == run.parts[-4]
        assert metrics["run"]["subject"] == run.parts[-2] and metrics["overall"]["images"] == 1
        assert (run / "train" / "adapter" / "adapter_config.json").is_file()
    report = (out / "report" / "report.md").read_text()
    assert "| waveft | 1 |" in report and "| lora | 1 |" in report
    for name in ("report.csv", "report.tex", "tradeoff.png", "metrics_vs_budget.png"):
        assert (out / "report" / name).is_file()

    # 3. The same sweep again: nothing left to do, the report is rewritten, and it succeeds.
    before_all = {run: snapshot(run) for run in good_runs}
    result = run_sweep(args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 of 2 runs finished" in result.stdout
    assert {run: snapshot(run) for run in good_runs} == before_all


@pytest.mark.slow
def test_missing_sweep_file_is_refused_in_one_line():
    result = run_sweep(["--sweep", "configs/sweeps/missing.yaml"])
    assert result.returncode == 2
    assert result.stderr.strip() == "error: sweep file not found: configs/sweeps/missing.yaml"


@pytest.mark.slow
def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, benchmark, tiny_sdxl_dir):
    result = run_sweep(sweep_args(tmp_path, benchmark, tiny_sdxl_dir, "--dry-run"))
    assert result.returncode == 0, result.stderr
    assert "2 runs" in result.stdout and "todo     lora/budget-1/puppy/seed-42" in result.stdout
    assert "train_dreambooth_waveft.py --config configs/tiny.yaml" in result.stdout
    assert "data.class_noun=dog" in result.stdout and "adapter.budget=1.0" in result.stdout
    assert not (tmp_path / "sweep").exists()


@pytest.mark.parametrize("override, message", [
    ("methods=[{name: mine, adapter: nosuch}]", "unknown method 'nosuch'"),
    ("subjects=[teddy, ghost, phantom]", "subjects not in the benchmark"),
    ("base_config=configs/missing.yaml", "base config not found: configs/missing.yaml"),
    ("colour=red", "unknown key 'colour'"),
    ("generation.sead=[1]", "unknown key 'generation.sead'"),
    ("methods=[{name: mine, adapter: lora, budget: 2}]", "unknown key 'methods[0].budget'"),
    ("overrides.train.max_stepz=3", "unknown key 'train.max_stepz'"),
    ("overrides.seed=3", "sets 'seed', which the sweep sets for each run"),
    ("budgets=[1, 1]", "distinct budgets"),
])
def test_bad_sweep_is_refused_in_one_line(tmp_path, benchmark, tiny_sdxl_dir, override, message, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as exit_info:
        main(sweep_args(tmp_path, benchmark, tiny_sdxl_dir, override))
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert exit_info.value.code == 2 and len(errors) == 1
    assert message in errors[0]
    if "ghost" in override:
        assert errors[0].endswith("ghost, phantom")
    assert not (tmp_path / "sweep").exists()


@pytest.mark.parametrize("sweep_file, runs", [("budget", (6 + 6 + 3) * 3), ("methods", 8 * 3), ("scaling", 5 * 3)])
def test_paper_sweeps_validate(tmp_path, benchmark, sweep_file, runs, monkeypatch, capsys):
    """Every run of the paper's sweeps has a valid config (here on the 3 synthetic subjects; LPIPS off, as its
    package is not installed)."""
    monkeypatch.chdir(REPO)
    main(["--sweep", f"configs/sweeps/{sweep_file}.yaml", "--dry-run", f"benchmark.dir={benchmark}",
          f"output_dir={tmp_path / 'sweep'}", "scoring.lpips=null"])
    assert f": {runs} runs -> " in capsys.readouterr().out
    assert not (tmp_path / "sweep").exists()


@pytest.mark.slow
def test_a_run_another_sweep_is_working_on_is_left_alone(tmp_path, benchmark, tiny_sdxl_dir, monkeypatch):
    from eval.sweep.runner import Children, device_env
    from eval.sweep.runs import execute_run, expand_runs
    from eval.sweep.schema import load_sweep, validate_sweep

    monkeypatch.chdir(REPO)
    sweep = load_sweep(TINY_SWEEP, tuple(sweep_args(tmp_path, benchmark, tiny_sdxl_dir)[2:]))
    run = expand_runs(sweep, validate_sweep(sweep, TINY_SWEEP), TINY_SWEEP)[0]
    run.dir.mkdir(parents=True)
    with open(run.dir / "lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        outcome = execute_run(sweep, run, device_env(None), Children())
    assert not outcome.ok and "another sweep process" in outcome.message
    assert sorted(p.name for p in run.dir.iterdir()) == ["lock"]  # nothing started, nothing recorded


def test_tiny_sweep_plans_on_its_benchmark_and_writes_it_at_launch(tmp_path, monkeypatch, capsys):
    from eval.protocol import load_benchmark
    from eval.sweep.cli import write_inputs
    from eval.sweep.runner import Children
    from eval.sweep.schema import load_sweep
    from eval.tiny_benchmark import tiny_benchmark

    monkeypatch.chdir(REPO)
    args = [f"benchmark.dir={tmp_path / 'bench'}", f"output_dir={tmp_path / 'sweep'}",
            f"scoring.tiny_encoders={tmp_path.parent / 'tiny-encoders'}"]
    main(["--sweep", TINY_SWEEP, "--dry-run", *args])
    assert ": 4 runs -> " in capsys.readouterr().out  # 2 methods x its 2 subjects
    assert not (tmp_path / "bench").exists() and not (tmp_path / "sweep").exists()  # a dry run writes nothing
    write_inputs(load_sweep(TINY_SWEEP, tuple(args)), Children())  # what the launch writes first
    assert load_benchmark(tmp_path / "bench") == tiny_benchmark()  # the benchmark it planned on
    assert (tmp_path / "sweep" / "report" / "sweep.yaml").is_file()


def test_a_sweeps_runs_are_one_wandb_group_each_tagged(tmp_path, benchmark, monkeypatch):
    from eval.sweep.runs import expand_runs
    from eval.sweep.schema import load_sweep, validate_sweep
    from waveft.config import load_config

    monkeypatch.chdir(REPO)
    sweep = load_sweep(TINY_SWEEP, tuple(sweep_args(tmp_path, benchmark, "tiny-sdxl", "subjects=[puppy, teddy]")[2:]))
    configs = [load_config(run.base_config, run.train_overrides).train.wandb
               for run in expand_runs(sweep, validate_sweep(sweep, TINY_SWEEP), TINY_SWEEP)]
    assert len(configs) == 4 and {w.group for w in configs} == {"sweep"}  # the sweep folder's name
    assert sorted(tuple(w.tags) for w in configs) == [
        (method, "budget-1", subject, "seed-42") for method in ("lora", "waveft") for subject in ("puppy", "teddy")]
    assert len({w.name for w in configs}) == 4
