"""The sweep's Slurm launcher against a real Slurm (`bash scripts/slurm_local_cluster.sh start`, which .ci/run
does): the tiny sweep through a job array reports what the local launcher reports; a task cancelled mid-run
is resumed from its checkpoint when the sweep is submitted again, finished runs untouched; --no-wait then
--report-only; and bad launcher settings refused in one line before anything is submitted."""
import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from eval.sweep.cli import main
from tests.test_sweep import REPO, SWEEP, benchmark, done_markers, run_sweep, snapshot, sweep_args  # noqa: F401

START_CLUSTER = "start one with: bash scripts/slurm_local_cluster.sh start"


def slurm_unreachable() -> str | None:
    """Why these tests cannot reach a Slurm controller here, or None: client tools alone (sbatch on PATH) do not
    make a cluster, so the controller is asked (`scontrol ping`, as scripts/slurm_local_cluster.sh does)."""
    if shutil.which("sbatch") is None or shutil.which("scontrol") is None:
        return f"no Slurm here (sbatch or scontrol not on PATH); {START_CLUSTER}"
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        return f"the Slurm controller does not answer (scontrol ping timed out); {START_CLUSTER}"
    if "is UP" not in ping.stdout:
        answer = (ping.stdout.strip() or ping.stderr.strip()).splitlines()
        return f"no reachable Slurm controller (scontrol ping: {answer[0] if answer else 'no answer'}); {START_CLUSTER}"
    return None


UNREACHABLE = slurm_unreachable()
pytestmark = pytest.mark.skipif(UNREACHABLE is not None, reason=UNREACHABLE or "")
# One CPU per task, so that the local cluster (this machine's cores) runs tasks side by side.
SLURM = ["launcher.type=slurm", "launcher.gpus_per_run=0", "launcher.cpus_per_run=1", "launcher.time_minutes=20"]
# The tiny sweep reduced to one run (WaveFT on one subject), where one run shows what is compared.
ONE_RUN = ["methods=[{name: waveft, adapter: waveft}]"]


def report_table(out: Path) -> str:
    """report.md's table: the runs and their numbers (the rest names folders, which differ between sweeps)."""
    return (out / "report" / "report.md").read_text().split("\nSettings:")[0]


def wait_for_job(job_id: str, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True).stdout.strip():
        assert time.time() < deadline, f"Slurm job {job_id} did not end in time"
        time.sleep(1)


@pytest.fixture(scope="module")
def local_report(tmp_path_factory, benchmark, tiny_sdxl_dir) -> str:  # noqa: F811
    tmp_path = tmp_path_factory.mktemp("local")
    result = run_sweep(sweep_args(tmp_path, benchmark, tiny_sdxl_dir, *ONE_RUN), timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    return report_table(tmp_path / "sweep")


@pytest.mark.slow
def test_no_wait_then_report_only_gives_the_local_report(tmp_path, benchmark, tiny_sdxl_dir, local_report):  # noqa: F811
    args = sweep_args(tmp_path, benchmark, tiny_sdxl_dir, *ONE_RUN, *SLURM)
    result = run_sweep(args + ["--no-wait"])
    assert result.returncode == 0, result.stdout + result.stderr
    (job_line,) = [line for line in result.stdout.splitlines() if line.startswith("job ")]
    job_id = job_line.split()[1]
    wait_for_job(job_id)
    out = tmp_path / "sweep"
    (done,) = done_markers(out)
    assert (done.parent / "logs" / "train.log").is_file() and (done.parent / "logs" / "score.log").is_file()
    assert list((out / "slurm").glob(f"{job_id}*/*_log.out"))  # submitit's files, the task's output among them

    result = run_sweep(args + ["--report-only"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 of 1 runs finished" in result.stdout
    assert report_table(out) == local_report
    (row,) = csv.DictReader(io.StringIO((out / "report" / "report.csv").read_text()))
    assert float(row["train_seconds"]) > 0 and float(row["images_per_second"]) > 0  # the task's cost, recorded


@pytest.mark.slow
def test_cancelled_task_resumes_from_its_checkpoint_when_submitted_again(tmp_path, benchmark, tiny_sdxl_dir):  # noqa: F811
    """The tiny sweep's two runs one task at a time; the second is cancelled (scancel) once it has written its
    first checkpoint, of 4 (time enough for scancel to land before it finishes)."""
    out = tmp_path / "sweep"
    args = sweep_args(tmp_path, benchmark, tiny_sdxl_dir, *SLURM, "launcher.max_parallel=1",
                      "overrides.train.max_steps=4")
    runs = [out / "runs" / method / "budget-1" / "puppy" / "seed-42" for method in ("waveft", "lora")]

    def second_run_checkpointed() -> bool:
        done = [run for run in runs if (run / "done.json").is_file()]
        return len(done) == 1 and any((set(runs) - set(done)).pop().glob("train/checkpoint-*"))

    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen([sys.executable, str(SWEEP), *args], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 400
        while not second_run_checkpointed():
            assert first.poll() is None, (tmp_path / "first.log").read_text()
            assert time.time() < deadline, "no run finished and no second run checkpointed in time"
            time.sleep(0.2)
        finished, cancelled = sorted(runs, key=lambda run: not (run / "done.json").is_file())
        (array_id,) = {p.name.split("_")[0] for p in (out / "slurm").glob("*_*") if p.is_dir()}  # <array>_<task>/
        subprocess.run(["scancel", f"{array_id}_1"], check=True)
        assert first.wait(timeout=120) == 1, (tmp_path / "first.log").read_text()
    assert not (cancelled / "done.json").exists()
    failure = json.loads((cancelled / "failed.json").read_text())
    assert failure["stage"] == "slurm" and f"Slurm task {array_id}_1 ended before" in failure["error"]
    before = snapshot(finished)

    result = run_sweep(args, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 task(s)" in result.stdout + result.stderr  # only the unfinished run was submitted
    assert snapshot(finished) == before
    assert not (cancelled / "failed.json").exists() and (cancelled / "done.json").is_file()
    assert "resumed from" in (cancelled / "logs" / "train.log").read_text()


def test_bad_launcher_settings_are_refused_before_anything_is_submitted(tmp_path, benchmark, tiny_sdxl_dir,  # noqa: F811
                                                                      monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    cases = [
        (["launcher.partition=nosuch"], "Slurm refuses the launcher settings: sbatch: error: invalid partition"),
        (["launcher.gpus_per_run=64"], "Slurm refuses the launcher settings: "),
        (["launcher.cpus_per_run=100000"], "Requested node configuration is not available"),
        (["launcher.colour=red"], "unknown key 'launcher.colour'"),
        (["launcher.extra_sbatch.array=0-3"], "'launcher.extra_sbatch.array' is set by the launcher itself"),
        (["launcher.type=pbs"], "key 'launcher.type' must be one of 'local', 'slurm'"),
    ]
    queued = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout
    for overrides, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(sweep_args(tmp_path, benchmark, tiny_sdxl_dir, *SLURM, *overrides))
        errors = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert exit_info.value.code == 2 and len(errors) == 1 and errors[0].startswith("error: "), (overrides, errors)
        assert message in errors[0], (overrides, errors)
    assert subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout == queued
    assert not (tmp_path / "sweep").exists()


def test_no_sbatch_says_how_to_run_locally(tmp_path, benchmark, tiny_sdxl_dir, monkeypatch, capsys):  # noqa: F811
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable))  # python, without Slurm's commands
    with pytest.raises(SystemExit) as exit_info:
        main(sweep_args(tmp_path, benchmark, tiny_sdxl_dir, *SLURM))
    (error,) = capsys.readouterr().err.splitlines()
    assert exit_info.value.code == 2
    assert error.startswith("error: launcher.type is slurm, but sbatch") and "launcher.type=local" in error


@pytest.mark.slow
@pytest.mark.parametrize("flag, cancelled", [("--cancel-on-interrupt", True), (None, False)])
def test_ctrl_c_while_waiting(tmp_path, benchmark, tiny_sdxl_dir, flag, cancelled):  # noqa: F811
    """Ctrl-C cancels the job with --cancel-on-interrupt; without it (and no terminal to ask on) the job goes on."""
    args = sweep_args(tmp_path, benchmark, tiny_sdxl_dir, *ONE_RUN, *SLURM) + ([flag] if flag else [])
    log_path = tmp_path / "sweep.log"
    with open(log_path, "w") as log:
        waiting = subprocess.Popen([sys.executable, str(SWEEP), *args], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL)
        deadline = time.time() + 300
        while "submitted Slurm job array" not in log_path.read_text():
            assert waiting.poll() is None and time.time() < deadline, log_path.read_text()
            time.sleep(0.2)
        job_id = log_path.read_text().split("submitted Slurm job array ")[1].split(":")[0]
        waiting.send_signal(signal.SIGINT)
        assert waiting.wait(timeout=60) == 130, log_path.read_text()
    try:
        text = log_path.read_text()
        if cancelled:
            assert f"cancelled Slurm job {job_id}" in text
            wait_for_job(job_id, timeout=60)
        else:
            assert f"Slurm job {job_id} goes on" in text
            assert subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True).stdout.strip()
    finally:
        subprocess.run(["scancel", job_id], check=False)
    assert not done_markers(tmp_path / "sweep")


@pytest.mark.slow
def test_task_signalled_for_its_time_limit_is_requeued_and_resumes(tmp_path, benchmark, tiny_sdxl_dir):  # noqa: F811
    """Slurm's warning before the time limit (USR2, as submitit asks for) mid-training: submitit requeues the
    task, which resumes the run from its checkpoint; the waiting command just goes on waiting."""
    out = tmp_path / "sweep"
    args = sweep_args(tmp_path, benchmark, tiny_sdxl_dir, *ONE_RUN, *SLURM, "overrides.train.max_steps=4")
    run = out / "runs" / "waveft" / "budget-1" / "puppy" / "seed-42"
    with open(tmp_path / "sweep.log", "w") as log:
        waiting = subprocess.Popen([sys.executable, str(SWEEP), *args], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 400
        while not any(run.glob("train/checkpoint-*")):
            assert waiting.poll() is None and time.time() < deadline, (tmp_path / "sweep.log").read_text()
            time.sleep(0.2)
        (job_id,) = [p.name for p in (out / "slurm").iterdir() if p.is_dir()]
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
        # Slurm holds a requeued job back for two minutes (its BeginTime); the test lets it start at once.
        while "BeginTime" not in subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%r"], capture_output=True,
                                                text=True).stdout:
            assert waiting.poll() is None and time.time() < deadline, (tmp_path / "sweep.log").read_text()
            time.sleep(0.2)
        # Slurm revokes the killed run's credential at one-second resolution, and refuses a restart within that same
        # second ("Killing non-startable batch JobId: Job credential revoked"): the job then really ends.
        time.sleep(1.1)
        subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True)
        status = waiting.wait(timeout=900)
    task_log = "".join(p.read_text() for p in (out / "slurm" / job_id).glob("*_log.out"))
    assert status == 0, (tmp_path / "sweep.log").read_text() + "\n--- Slurm task log ---\n" + task_log[-6000:]
    assert (run / "done.json").is_file() and not (run / "failed.json").exists()
    assert "resumed from" in (run / "logs" / "train.log").read_text()
    assert "Requeued job" in task_log

