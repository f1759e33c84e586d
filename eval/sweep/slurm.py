"""The Slurm launcher: the same `Work` as a local worker, as the tasks of one Slurm job array (submitit).

One task per item. A task that Slurm preempts or that reaches its time limit is requeued by submitit
(`Checkpointable`) and does its item again, which resumes where the item left off (a sweep run resumes
training from its last checkpoint and keeps the images it has). The launching command follows the tasks with
`squeue` (without an accounting database `sacct`, which submitit would ask, is unavailable) and collects each
task's `Outcome` from submitit's result file; a task that ended without one (cancelled, killed, out of time
too often: out of squeue's active states for 30 s) is recorded as failed through `Work.failed`. submitit's
files (pickles, each task's stdout) go to `<folder>/<array id>_<task>/`.
"""
import math
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import submitit
from submitit.slurm.slurm import _make_sbatch_string  # the script submitit submits, for `sbatch --test-only`
from tqdm.auto import tqdm

from eval.sweep.runner import INTERRUPTED, Children, Outcome, Work, report_outcome
from eval.sweep.schema import LauncherSettings
from waveft.errors import UserError

REQUEUE_GRACE_SECONDS = 30.0
POLL_SECONDS = 2.0
# squeue states of a task that has not ended (a requeued task is PENDING again).
ACTIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_HOLD",
                 "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "PREEMPTED"}


class SlurmTask(submitit.helpers.Checkpointable):
    """What one array task runs: `work` on its item, on the GPUs Slurm gave it. Requeued as it is (checkpoint)."""

    def __init__(self, work: Work):
        self.work = work

    def __call__(self, item) -> Outcome:
        # A requeued task starts again beside the result its interrupted attempt may have left: drop it, so that
        # the waiting command never reads that attempt's "interrupted" as this one's end.
        submitit.JobEnvironment().paths.result_pickle.unlink(missing_ok=True)
        children = Children()
        # Slurm signals every process of a cancelled or preempted task: a stage killed then has not failed.
        signal.signal(signal.SIGTERM, lambda signum, frame: children.stopping.set())
        return self.work(item, None, children)


def sbatch_parameters(settings: LauncherSettings) -> dict:
    """submitit's SlurmExecutor parameters for `settings` (one task per run; its GPUs, CPUs, memory, time)."""
    parameters = {"job_name": "sweep", "time": settings.time_minutes, "cpus_per_task": settings.cpus_per_run,
                  "stderr_to_stdout": True, "additional_parameters": dict(settings.extra_sbatch)}
    for key in ("partition", "account", "qos"):
        if getattr(settings, key):
            parameters[key] = getattr(settings, key)
    if settings.gpus_per_run:
        parameters["gpus_per_node"] = settings.gpus_per_run
    if settings.mem_gb:
        parameters["mem"] = f"{math.ceil(settings.mem_gb * 1024)}M"
    if settings.max_parallel:
        parameters["array_parallelism"] = settings.max_parallel
    return parameters


def check_with_slurm(parameters: dict, folder: Path, tasks: int) -> None:
    """Ask Slurm whether it would run this job array (`sbatch --test-only`: nothing is submitted or written);
    if not, its own message is the error (an unknown partition, more GPUs or CPUs than a node has, ...)."""
    script = _make_sbatch_string(command="true", folder=folder / "%j", map_count=max(tasks, 1), **parameters)
    try:
        answer = subprocess.run(["sbatch", "--test-only"], input=script, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        raise UserError("launcher.type=slurm: sbatch --test-only did not answer within 60 s (is slurmctld up?)"
                        ) from None
    if answer.returncode != 0:
        message = "; ".join(line.strip() for line in answer.stderr.splitlines() if line.strip())
        raise UserError(f"Slurm refuses the launcher settings: {message or f'sbatch exit status {answer.returncode}'}")


def active_tasks(array_id: str) -> Optional[set[str]]:
    """The ids (`<array>_<task>`) of the array's tasks that have not ended; None if squeue did not answer."""
    try:
        answer = subprocess.run(["squeue", "-h", "-r", "-j", array_id, "-o", "%i %T"], capture_output=True,
                                text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return None
    if answer.returncode != 0:
        # squeue forgets a job some minutes after its last task ended, and then calls its id invalid.
        return set() if "Invalid job id" in answer.stderr else None
    active = set()
    for line in answer.stdout.splitlines():
        task, _, state = line.strip().partition(" ")
        if state in ACTIVE_STATES:
            active.add(task)
    return active


def _ask(question: str) -> bool:
    if not sys.stdin.isatty():
        return False
    try:
        return input(f"{question} [y/N] ").strip().lower() in ("y", "yes")
    except (EOFError, KeyboardInterrupt):
        return False


class SlurmLauncher:
    def __init__(self, settings: LauncherSettings, folder: Path, tasks: int, wait: bool = True,
                 cancel_on_interrupt: bool = False):
        if shutil.which("sbatch") is None or shutil.which("srun") is None:
            raise UserError("launcher.type is slurm, but sbatch/srun are not on PATH (no Slurm client on this "
                            "machine); run on this machine instead with launcher.type=local")
        self.settings, self.folder, self.wait, self.cancel_on_interrupt = settings, folder, wait, cancel_on_interrupt
        self.parameters = sbatch_parameters(settings)
        check_with_slurm(self.parameters, folder, tasks)

    def describe(self) -> str:
        s = self.settings
        memory = f"{s.mem_gb:g} GB" if s.mem_gb else "default memory"
        return (f"Slurm: one job array, a task per pending run, on partition {s.partition or '(default)'}, each "
                f"{s.gpus_per_run} GPU(s), {s.cpus_per_run} CPUs, {memory}, {s.time_minutes} min; at most "
                f"{s.max_parallel or 'all'} at once; submitit files in {self.folder}")

    def launch(self, items: Sequence, work: Work, children: Children, progress: tqdm) -> Optional[list[Outcome]]:
        """Submit the array; unless told not to wait, follow it to the end. Returns None when not waiting."""
        if not items:
            return []
        executor = submitit.SlurmExecutor(folder=self.folder / "%j")
        executor.update_parameters(**self.parameters)
        jobs = executor.map_array(SlurmTask(work), list(items))
        array_id = jobs[0].job_id.split("_")[0]
        progress.write(f"submitted Slurm job array {array_id}: {len(jobs)} task(s); submitit files in {self.folder}")
        if not self.wait:
            print(f"job {array_id}")
            print(f"follow it with: squeue -j {array_id}; when it has ended, report with --report-only")
            return None
        try:
            return self._follow(array_id, dict(zip(jobs, items)), work, progress)
        except KeyboardInterrupt:
            progress.close()
            question = f"\ncancel Slurm job {array_id} (its runs resume when submitted again)?"
            if self.cancel_on_interrupt or _ask(question):
                subprocess.run(["scancel", array_id], check=False)
                print(f"cancelled Slurm job {array_id}", file=sys.stderr)
            else:
                print(f"Slurm job {array_id} goes on (scancel {array_id} stops it); report it later with "
                      "--report-only", file=sys.stderr)
            raise

    def _follow(self, array_id: str, remaining: dict, work: Work, progress: tqdm) -> list[Outcome]:
        outcomes = []
        inactive_since: dict = {}  # job -> when squeue first stopped listing it as active
        while remaining:
            active = active_tasks(array_id)
            for job, item in list(remaining.items()):
                if active is None or job.job_id in active:
                    inactive_since.pop(job, None)
                    continue
                # A task being requeued (preempted, or signalled before its time limit) can drop out of squeue's
                # active states for a moment: unless it left a final result, it has ended only once that lasts.
                since = inactive_since.setdefault(job, time.time())
                if not self._has_final_result(job) and time.time() - since < REQUEUE_GRACE_SECONDS:
                    continue
                outcomes.append(self._collect(job, item, work))
                del remaining[job]
                progress.update(1)
                report_outcome(progress, outcomes[-1])
            if remaining:
                time.sleep(POLL_SECONDS)
        return outcomes

    @staticmethod
    def _has_final_result(job) -> bool:
        """Whether the task's result file holds its end: an Outcome or an error, not an interrupted attempt."""
        if not Path(job.paths.result_pickle).is_file():
            return False
        try:
            outcome = job.result()
        except Exception:  # the task raised: that is its end
            return True
        return outcome.ok or outcome.message != INTERRUPTED

    @staticmethod
    def _collect(job, item, work: Work) -> Outcome:
        """The ended task's Outcome (from submitit's result file); a task that raised, was stopped or ended
        without a result is recorded as failed."""
        log = Path(job.paths.stdout)
        if not SlurmLauncher._has_final_result(job):
            return work.failed(item, Outcome(item.id, False, "slurm", f"Slurm task {job.job_id} ended before its "
                                             "run finished (cancelled, preempted, killed or out of time)", log))
        try:
            return job.result()
        except Exception as exc:  # the task raised: submitit stored the traceback
            last = [line for line in str(exc).splitlines() if line.strip()][-1:] or [type(exc).__name__]
            return work.failed(item, Outcome(item.id, False, "slurm", f"Slurm task {job.job_id}: {last[0]}", log))
