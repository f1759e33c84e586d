"""A sweep's runs: the expansion of a sweep into (method, budget, subject, seed) runs, their folders, and the
work on one run (train -> generate -> score, then done.json), which a local worker and a Slurm task both do.

    runs/<method>/budget-<b>/<subject>/seed-<s>/
        train/          the trainer's output_dir (config.yaml, adapter/, run_info.json, checkpoint-N/)
        bench/train/    benchmark images and manifest.jsonl
        metrics/        metrics.json, .csv, .md
        logs/           train.log, generate.log, score.log (appended by every attempt)
        done.json       written last, atomically: the run is finished and is skipped from then on
        failed.json     the last attempt's failure (stage, exit status, log); a later attempt removes it
        lock            held (flock) while a sweep process works on the run
"""
import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

from eval.files import json_field, read_json
from eval.layout import metrics_file
from eval.protocol import Subject
from eval.sweep.runner import INTERRUPTED, Children, Outcome, device_env, error_line, exclusive
from eval.sweep.schema import MethodSpec, SweepConfig, benchmark_dataset
from eval.sweep.stages import generate_argv, score_argv, train_argv
from waveft.config import load_config
from waveft.errors import UserError
from waveft.io.files import write_json_atomic
from waveft.io.run_folder import RunFolder

DONE = "done.json"
FAILED = "failed.json"


@dataclass(frozen=True)
class Run:
    method: MethodSpec
    budget: float
    subject: Subject
    seed: int
    dir: Path
    base_config: str
    train_overrides: tuple[str, ...]

    @property
    def id(self) -> str:
        return "/".join(run_name_parts(self.method, self.budget, self.subject, self.seed))

    @property
    def train_dir(self) -> Path:
        return self.dir / "train"

    @property
    def bench_dir(self) -> Path:
        return self.dir / "bench"

    @property
    def images_dir(self) -> Path:
        return self.bench_dir / self.train_dir.name  # eval.generate_benchmark names it after the run folder

    @property
    def metrics_dir(self) -> Path:
        return self.dir / "metrics"

    @property
    def done(self) -> bool:
        return (self.dir / DONE).is_file()

    def state(self) -> str:
        if self.done:
            return "done"
        if (self.dir / FAILED).is_file():
            return "failed"
        return "partial" if os.path.isfile(RunFolder(self.train_dir).config) else "todo"


def override_arg(key: str, value) -> str:
    """A run-config override as the trainer's CLI takes it (it reads the value as YAML). Strings that read back
    as themselves go as they are; anything else as JSON, which is YAML that reads back unchanged."""
    try:
        plain = isinstance(value, str) and yaml.safe_load(value) == value
    except yaml.YAMLError:
        plain = False
    return f"{key}={value if plain else json.dumps(value)}"


def run_name_parts(method, budget: float, subject: Subject, seed: int) -> tuple[str, ...]:
    """What names a sweep's run: its folder's path under runs/, its id, its wandb name and tags."""
    return method.name, f"budget-{budget:g}", subject.name, f"seed-{seed}"


def wandb_grouping(sweep: SweepConfig, parts: tuple[str, ...]) -> dict:
    """With train.report_to=wandb, a sweep's runs are one group (the sweep folder's name: the paper sweeps share
    it, as they share runs), each tagged with its method, budget, subject and seed: one table in a workspace."""
    return {"train.wandb.group": Path(sweep.output_dir).name, "train.wandb.name": "-".join(parts),
            "train.wandb.tags": list(parts)}


def expand_runs(sweep: SweepConfig, subjects: list[Subject], source: str) -> list[Run]:
    """Every (method, budget, subject, seed), each with its training config validated."""
    dataset = benchmark_dataset(sweep)
    runs = []
    for method in sweep.methods:
        base_config = method.base_config or sweep.base_config
        for budget in method.budgets if method.budgets is not None else sweep.budgets:
            for subject in subjects:
                for seed in sweep.seeds:
                    parts = run_name_parts(method, budget, subject, seed)
                    run_dir = Path(sweep.output_dir, "runs", *parts)
                    owned = {
                        "output_dir": str(run_dir / "train"), "seed": seed, "train.resume": "latest",
                        "data.instance_dir": str(dataset / subject.name), "data.subject": subject.name,
                        "data.class_noun": subject.class_noun, "data.identifier": sweep.benchmark.identifier,
                        "adapter.type": method.adapter, "adapter.label": method.name, "adapter.budget": budget,
                        **wandb_grouping(sweep, parts),
                    }
                    overrides = tuple(override_arg(k, v) for k, v in
                                      [*sweep.overrides.items(), *method.overrides.items(), *owned.items()])
                    run = Run(method, budget, subject, seed, run_dir, base_config, overrides)
                    try:
                        load_config(base_config, overrides)
                    except UserError as exc:
                        raise UserError(f"{source}: run {run.id} (its config: {base_config} with the sweep's "
                                        f"overrides): {exc}") from None
                    runs.append(run)
    return runs


def result_settings(sweep: SweepConfig) -> dict:
    """The settings that change a finished run's images or scores (not batching, device or caches)."""
    skip = {"batch_size", "device", "cache_dir"}
    return {
        "benchmark": dataclasses.asdict(sweep.benchmark),
        "generation": {k: v for k, v in dataclasses.asdict(sweep.generation).items() if k not in skip},
        "scoring": {k: v for k, v in dataclasses.asdict(sweep.scoring).items() if k not in skip},
    }


def check_finished_runs(runs: list[Run], settings: dict) -> None:
    """A finished run made with other generation or scoring settings would mix into the report unnoticed."""
    for run in runs:
        if not run.done:
            continue
        recorded = json_field(read_json(run.dir / DONE), "settings", dict, run.dir / DONE)
        for section, values in settings.items():
            for key, value in values.items():
                found = recorded.get(section, {}).get(key)
                if found != value:
                    raise UserError(f"finished run {run.dir} was made with {section}.{key}={found!r}, this sweep "
                                    f"asks {value!r}; delete that run folder or choose another output_dir")


# ---- the stage commands (one spot for the stage CLIs' arguments) -------------------------------------------


def train_command(run: Run) -> list[str]:
    return train_argv(run.base_config, run.train_overrides)


def generate_command(sweep: SweepConfig, run: Run) -> list[str]:
    return generate_argv(sweep.generation, run.train_dir, sweep.benchmark.dir, run.bench_dir,
                         Path(sweep.output_dir, "drift-base"))


def score_command(sweep: SweepConfig, run: Run) -> list[str]:
    return score_argv(sweep.scoring, run.images_dir, sweep.benchmark.dir, run.metrics_dir, sweep.benchmark.identifier)


# ---- the work on one run -------------------------------------------------------------------------------


def execute_run(sweep: SweepConfig, run: Run, env: dict, children: Children) -> Outcome:
    """Train (unless done), generate, score, then write done.json; the run's lock keeps other sweeps out."""
    run.dir.mkdir(parents=True, exist_ok=True)
    with exclusive(run.dir / "lock") as held:
        if not held:
            return Outcome(run.id, False, "start", "another sweep process is working on this run; run again later")
        if run.done:  # finished by another sweep since this one started
            return Outcome(run.id, True)
        return _execute_locked(sweep, run, env, children)


def _execute_locked(sweep: SweepConfig, run: Run, env: dict, children: Children) -> Outcome:
    (run.dir / FAILED).unlink(missing_ok=True)
    logs = run.dir / "logs"
    stages = [("generate", generate_command(sweep, run)), ("score", score_command(sweep, run))]
    if not os.path.isfile(RunFolder(run.train_dir).run_info):  # written once the adapter is saved
        stages.insert(0, ("train", train_command(run)))
    seconds = {}
    for stage, command in stages:
        started = time.time()
        status = children.run(command, logs / f"{stage}.log", env)
        seconds[stage] = round(time.time() - started, 1)
        if status != 0:
            if children.stopping.is_set():
                return Outcome(run.id, False, stage, INTERRUPTED)
            log = logs / f"{stage}.log"
            return record_failure(run, Outcome(run.id, False, stage, f"exit status {status}: {error_line(log)}", log))
    metrics = read_json(metrics_file(run.metrics_dir))
    write_json_atomic(run.dir / DONE, {
        "metrics": str(metrics_file(run.metrics_dir).relative_to(run.dir)),
        "method": run.method.name, "adapter_type": run.method.adapter, "budget": run.budget,
        "subject": run.subject.name, "seed": run.seed, "settings": result_settings(sweep),
        "overall": metrics.get("overall"), "stage_seconds": seconds,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    })
    return Outcome(run.id, True)


def record_failure(run: Run, outcome: Outcome) -> Outcome:
    write_json_atomic(run.dir / FAILED,
                      {"stage": outcome.stage, "error": outcome.message, "log": outcome.log and str(outcome.log)})
    return outcome


@dataclass(frozen=True)
class RunWork:
    """The work on one run as the launchers call it (picklable: a Slurm task unpickles and calls it)."""

    sweep: SweepConfig

    def __call__(self, run: Run, device: Optional[str], children: Children) -> Outcome:
        return execute_run(self.sweep, run, device_env(device), children)

    def failed(self, run: Run, outcome: Outcome) -> Outcome:
        return record_failure(run, outcome)
