"""Running many independent jobs, each a few subprocesses, on this machine: nothing here knows what a job does.

A job is any item with an `id`; the work on it is a `Work`: a picklable callable that does one item on one
device and returns an `Outcome`, and records a failure the runner itself detected. `LocalLauncher` is a worker
pool, one worker per GPU (or one CPU worker); `eval.sweep.slurm.SlurmLauncher` runs the same `Work` as the
tasks of one Slurm job array. Both return one `Outcome` per item, or raise KeyboardInterrupt.
"""
import contextlib
import fcntl
import os
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from queue import Queue
from typing import Optional, Protocol

from tqdm.auto import tqdm

from waveft.errors import UserError

INTERRUPTED = "interrupted"  # an Outcome's message when its item was stopped from outside (Ctrl-C, SIGTERM)


@dataclass
class Outcome:
    name: str  # the item's id, or "report"
    ok: bool
    stage: Optional[str] = None  # the stage that failed
    message: str = ""
    log: Optional[Path] = None


class Work(Protocol):
    def __call__(self, item, device: Optional[str], children: "Children") -> Outcome:
        """Do `item`; `device` is CUDA_VISIBLE_DEVICES for it (None: leave the variable as it is)."""

    def failed(self, item, outcome: Outcome) -> Outcome:
        """Record a failure the runner saw (an exception, a Slurm task that ended without a result)."""


class Children:
    """The subprocesses now running, so that an interrupted run can stop them."""

    def __init__(self):
        self._lock = threading.Lock()
        self._running: set[subprocess.Popen] = set()
        self.stopping = threading.Event()

    def run(self, command: list[str], log_path: Path, env: dict) -> int:
        """Run `command` with its output appended to `log_path`; returns its exit status."""
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "a") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')}: {shlex.join(command)}\n")
            log.flush()
            with self._lock:
                if self.stopping.is_set():
                    return -signal.SIGTERM
                process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
                self._running.add(process)
            try:
                return process.wait()
            finally:
                with self._lock:
                    self._running.discard(process)

    def stop(self) -> None:
        with self._lock:
            self.stopping.set()
            for process in self._running:
                process.terminate()


@contextlib.contextmanager
def exclusive(lock_path: Path) -> Iterator[bool]:
    """flock `lock_path` without waiting; yields whether this process holds it. The lock goes when the process
    ends, however it ends, so a killed sweep never leaves an item locked."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True


def error_line(log_path: Path) -> str:
    """The `error: ...` line the project's CLIs print, if there is one, else the log's last line."""
    text = log_path.read_text(errors="replace") if log_path.is_file() else ""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or ["(empty log)"])[-1][-300:]


def device_env(device: Optional[str]) -> dict:
    env = dict(os.environ)
    if device is not None:
        env["CUDA_VISIBLE_DEVICES"] = device
    return env


def worker_devices(gpus: Optional[int]) -> list[Optional[str]]:
    """CUDA_VISIBLE_DEVICES for each worker: one per GPU, or one CPU worker (None: leave the variable as is)."""
    import torch

    available = torch.cuda.device_count()
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    ids = (visible if "CUDA_VISIBLE_DEVICES" in os.environ else [str(i) for i in range(available)])[:available]
    if gpus is None:
        return ids or [None]
    if gpus > len(ids):
        raise UserError(f"--gpus {gpus}, but {len(ids)} GPU(s) are visible")
    return ids[:gpus] if gpus else [""]  # --gpus 0: hide the GPUs, one CPU worker


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM stops the subprocesses as Ctrl-C does


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def report_outcome(progress: tqdm, outcome: Outcome) -> None:
    if outcome.ok:
        progress.write(f"done    {outcome.name}")
    else:
        progress.write(f"FAILED  {outcome.name} at {outcome.stage}: {outcome.message}")


class LocalLauncher:
    """A worker pool on this machine: each worker owns one device and does one item at a time."""

    def __init__(self, devices: list[Optional[str]], max_parallel: Optional[int] = None):
        self.devices = devices[:max_parallel] if max_parallel else devices

    def describe(self) -> str:
        return "workers: " + ", ".join(f"GPU {d}" if d else "CPU" for d in self.devices)

    def launch(self, items: Sequence, work: Work, children: Children, progress: tqdm) -> list[Outcome]:
        free_devices: Queue = Queue()
        for device in self.devices:
            free_devices.put(device)

        def on_a_free_device(item) -> Outcome:
            device = free_devices.get()
            try:
                return work(item, device, children)
            except Exception as exc:  # one item's unexpected trouble must not end the others
                return work.failed(item, Outcome(item.id, False, "sweep", f"{type(exc).__name__}: {exc}"))
            finally:
                free_devices.put(device)

        outcomes = []
        with ThreadPoolExecutor(max_workers=len(self.devices)) as pool:
            try:
                for future in as_completed([pool.submit(on_a_free_device, item) for item in items]):
                    outcomes.append(future.result())
                    progress.update(1)
                    report_outcome(progress, outcomes[-1])
            except KeyboardInterrupt:
                children.stop()
                pool.shutdown(cancel_futures=True)
                raise
        return outcomes
