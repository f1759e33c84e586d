"""One-command sweeps: subjects x methods x budgets x seeds, each run trained, generated and scored, then reported.

    python scripts/sweep.py --sweep configs/sweeps/budget.yaml [--dry-run] [--gpus N] [key.sub=value ...]

The sweep file (schema: `SweepConfig` below) names everything the runs depend on; it is read, type-checked and
every run's training config is validated before any work starts. Each run is three subprocesses, with
`CUDA_VISIBLE_DEVICES` set to the worker's GPU: the trainer, `eval.generate_benchmark` and `eval.score`.
Then `eval.report` compares all finished runs. Layout under `output_dir`:

    runs/<method>/budget-<b>/<subject>/seed-<s>/
        train/          the trainer's output_dir (config.yaml, adapter/, run_info.json, checkpoint-N/)
        bench/train/    benchmark images and manifest.jsonl
        metrics/        metrics.json, .csv, .md
        logs/           train.log, generate.log, score.log (appended by every attempt)
        done.json       written last, atomically: the run is finished and is skipped from then on
        failed.json     the last attempt's failure (stage, exit status, log); a later attempt removes it
        lock            held (flock) while a sweep process works on the run
    report/             `report.dir`: eval.report over every finished run (table, metrics vs budget), sweep.yaml
                        (the resolved sweep, rewritten at every start) and report.log
    report/budget-<b>/  eval.report over the runs at `report.comparison_budget` (the method comparison)

Sweeps may share an output_dir (with their own `report.dir`): a run that two sweeps name (same method name,
budget, subject and seed) is trained once; its config, generation and scoring settings must then agree.

An interrupted run resumes: training with `train.resume=latest` (from its last checkpoint, or from scratch if
none was written), generation skips the images it already has, scoring is redone. A failed run is recorded
and the others go on; the sweep then reports the finished runs, lists the failures and exits 1.
"""
import argparse
import dataclasses
import fcntl
import importlib.util
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import typing
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from queue import Queue
from typing import Literal, Optional, Union

import yaml
from tqdm.auto import tqdm

from eval.encoders import DEFAULT_CLIP, DEFAULT_CMMD_CLIP, DEFAULT_DINO
from eval.files import read_json
from eval.generate_benchmark import PAPER_NEGATIVE_PROMPT, PAPER_SEEDS
from eval.protocol import DEFAULT_IDENTIFIER, PROMPTS_FILE, Subject, dataset_folder, load_benchmark, real_image_paths
from eval.score import CLIP_T_PROMPTS, LPIPS_NETS
from eval.tiny_benchmark import write_tiny_benchmark
from waveft.config import load_config
from waveft.errors import UserError, cli_entry
from waveft.files import write_text_atomic
from waveft.schema import coerce_value, read_yaml_mapping

REPO = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = REPO / "train_dreambooth_waveft.py"
DONE = "done.json"
FAILED = "failed.json"
METHOD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")  # it names a folder
# Run-config keys the sweep sets for each run; overrides may not set them.
SWEEP_OWNED_KEYS = ("output_dir", "overwrite_output_dir", "seed", "data.instance_dir", "data.subject",
                    "data.class_noun", "data.identifier", "adapter.type", "adapter.label", "adapter.budget",
                    "train.resume")


# ---- schema ----------------------------------------------------------------------------------------------


@dataclass
class BenchmarkSettings:
    dir: str = ""  # DreamBooth benchmark folder (holding dataset/ or prompts_and_classes.txt itself)
    identifier: str = DEFAULT_IDENTIFIER  # the rare token in "a <identifier> <class>"
    build_tiny_if_missing: bool = False  # write eval.tiny_benchmark's synthetic benchmark to `dir` if none is there


@dataclass
class MethodSpec:
    name: str = ""  # the row label in the report and the folder under runs/
    adapter: str = ""  # adapter.type
    base_config: Optional[str] = None  # default: the sweep's base_config
    budgets: Optional[list[float]] = None  # default: the sweep's budgets
    overrides: dict = field(default_factory=dict)  # run-config keys, applied after the sweep's overrides


@dataclass
class GenerationSettings:
    """eval.generate_benchmark's settings; defaults are the paper's."""

    seeds: list[int] = field(default_factory=lambda: list(PAPER_SEEDS))  # images per prompt, one per seed
    scheduler: str = "dpmpp_2m"
    steps: int = 30
    guidance_scale: float = 7.5
    negative_prompt: str = PAPER_NEGATIVE_PROMPT
    resolution: int = 1024
    batch_size: int = 4
    dtype: Literal["fp32", "fp16", "bf16"] = "bf16"


@dataclass
class ScoringSettings:
    """eval.score's settings; None means eval.score's default."""

    dino: Optional[str] = None
    clip: Optional[str] = None  # CLIP-I and CLIP-T
    cmmd_clip: Optional[str] = None
    # Smoke-test encoders: built here with eval.tiny_encoders if missing, used for DINO, CLIP and CMMD.
    tiny_encoders: Optional[str] = None
    clip_t_prompt: str = "without-identifier"  # one of eval.score's CLIP_T_PROMPTS
    lpips: Optional[str] = None  # LPIPS diversity's network (alex, vgg, squeeze); null: not computed
    batch_size: int = 32
    device: Optional[str] = None
    cache_dir: Optional[str] = None  # real-image embedding cache


@dataclass
class ReportSettings:
    dir: Optional[str] = None  # default: <output_dir>/report
    # Also report the runs at this budget alone (the paper's method comparison); null: no such report.
    comparison_budget: Optional[float] = 1.0


@dataclass
class SweepConfig:
    output_dir: str = ""
    base_config: str = ""  # the run config every run starts from
    overrides: dict = field(default_factory=dict)  # run-config keys (dotted) -> values, applied to every run
    benchmark: BenchmarkSettings = field(default_factory=BenchmarkSettings)
    subjects: Union[Literal["all"], list[str]] = "all"
    methods: list[MethodSpec] = field(default_factory=list)
    budgets: list[float] = field(default_factory=list)  # adapter.budget, in LoRA-rank-1 units
    seeds: list[int] = field(default_factory=lambda: [42])  # training seeds
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    scoring: ScoringSettings = field(default_factory=ScoringSettings)
    report: ReportSettings = field(default_factory=ReportSettings)


def _apply_override(tree: dict, override: str) -> None:
    """`key.sub=value` on the sweep file. Inside a mapping of run-config keys (`overrides`), the rest of the
    dotted name is one key: `overrides.model.pretrained=X` sets overrides["model.pretrained"]."""
    dotted, sep, raw = override.partition("=")
    if not sep or not dotted.strip():
        raise UserError(f"override '{override}' must look like key.sub=value")
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw  # as the trainer's overrides: what is not YAML is a string
    parts = dotted.strip().split(".")
    node, schema = tree, SweepConfig
    for index, part in enumerate(parts[:-1]):
        hint = _field_type(schema, part)
        if hint is dict:
            node.setdefault(part, {})[".".join(parts[index + 1:])] = value
            return
        if not dataclasses.is_dataclass(hint):
            raise UserError(f"override '{override}': '{'.'.join(parts[:index + 1])}' is not a section")
        node, schema = node.setdefault(part, {}), hint
        if not isinstance(node, dict):
            raise UserError(f"override '{override}': '{'.'.join(parts[:index + 1])}' is not a section")
    node[parts[-1]] = value


def _field_type(schema, name: str):
    hints = typing.get_type_hints(schema) if dataclasses.is_dataclass(schema) else {}
    return hints.get(name)


def load_sweep(path: str, overrides: tuple[str, ...] = ()) -> SweepConfig:
    """Read, override and type-check a sweep file; unknown keys are refused by name."""
    tree = read_yaml_mapping(path, "sweep file")
    for override in overrides:
        _apply_override(tree, override)
    return coerce_value(tree, SweepConfig, "", path)


# ---- the runs --------------------------------------------------------------------------------------------


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
        return f"{self.method.name}/budget-{self.budget:g}/{self.subject.name}/seed-{self.seed}"

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
        return "partial" if (self.train_dir / "config.yaml").is_file() else "todo"


def override_arg(key: str, value) -> str:
    """A run-config override as the trainer's CLI takes it (it reads the value as YAML). Strings that read back
    as themselves go as they are; anything else as JSON, which is YAML that reads back unchanged."""
    try:
        plain = isinstance(value, str) and yaml.safe_load(value) == value
    except yaml.YAMLError:
        plain = False
    return f"{key}={value if plain else json.dumps(value)}"


def _check_overrides(overrides: dict, where: str, source: str) -> None:
    for key in overrides:
        if not isinstance(key, str) or not key:
            raise UserError(f"{source}: {where} keys must be dotted run-config keys, got {key!r}")
        owned = [k for k in SWEEP_OWNED_KEYS if k == key or k.startswith(key + ".")]
        if owned:
            raise UserError(f"{source}: {where} sets '{key}', which the sweep sets for each run ({', '.join(owned)})")


def _check_budgets(budgets: list[float], key: str, source: str) -> None:
    if any(b <= 0 for b in budgets) or len(set(budgets)) != len(budgets):
        raise UserError(f"{source}: key '{key}' must list distinct budgets > 0, got {budgets}")


def validate_sweep(sweep: SweepConfig, source: str) -> list[Subject]:
    """Model-free checks of the sweep as a whole; returns the subjects it runs on."""
    from waveft.adapters.methods import METHODS

    for key in ("output_dir", "base_config"):
        if not getattr(sweep, key):
            raise UserError(f"{source}: key '{key}' is required")
    if not sweep.benchmark.dir:
        raise UserError(f"{source}: key 'benchmark.dir' is required")
    if not sweep.methods:
        raise UserError(f"{source}: key 'methods' must list at least one method")
    if not sweep.seeds or len(set(sweep.seeds)) != len(sweep.seeds):
        raise UserError(f"{source}: key 'seeds' must list distinct training seeds, got {sweep.seeds}")
    _check_budgets(sweep.budgets, "budgets", source)
    _check_overrides(sweep.overrides, "'overrides'", source)
    names = set()
    for index, method in enumerate(sweep.methods):
        where = f"methods[{index}]"
        if not METHOD_NAME.match(method.name):
            raise UserError(f"{source}: key '{where}.name' must be a folder-safe name (letters, digits, _.+-), "
                            f"got {method.name!r}")
        if method.name in names:
            raise UserError(f"{source}: method name {method.name!r} is used twice")
        names.add(method.name)
        if method.adapter not in METHODS:
            raise UserError(f"{source}: key '{where}.adapter' names an unknown method {method.adapter!r} "
                            f"(known: {', '.join(METHODS)})")
        budgets = method.budgets if method.budgets is not None else sweep.budgets
        if not budgets:
            raise UserError(f"{source}: no budgets for method {method.name!r}: set 'budgets' or '{where}.budgets'")
        _check_budgets(budgets, f"{where}.budgets", source)
        _check_overrides(method.overrides, f"'{where}.overrides'", source)
    for config in {sweep.base_config} | {m.base_config for m in sweep.methods if m.base_config}:
        if not os.path.isfile(config):
            raise UserError(f"{source}: base config not found: {config}")

    g = sweep.generation
    if not g.seeds or len(set(g.seeds)) != len(g.seeds):
        raise UserError(f"{source}: key 'generation.seeds' must list distinct seeds, got {g.seeds}")
    if g.steps <= 0 or g.batch_size <= 0 or g.resolution <= 0 or g.resolution % 8:
        raise UserError(f"{source}: keys 'generation.steps' and 'generation.batch_size' must be > 0 and "
                        f"'generation.resolution' a positive multiple of 8")
    s = sweep.scoring
    if s.tiny_encoders and (s.dino or s.clip or s.cmmd_clip):
        raise UserError(f"{source}: key 'scoring.tiny_encoders' replaces 'scoring.dino', 'scoring.clip' and "
                        "'scoring.cmmd_clip': set either")
    if s.batch_size <= 0:
        raise UserError(f"{source}: key 'scoring.batch_size' must be > 0")
    if s.clip_t_prompt not in CLIP_T_PROMPTS:
        raise UserError(f"{source}: key 'scoring.clip_t_prompt' must be one of {', '.join(CLIP_T_PROMPTS)}, "
                        f"got {s.clip_t_prompt!r}")
    if s.lpips is not None:
        networks = [net for net in LPIPS_NETS if net != "off"]
        if s.lpips not in networks:
            raise UserError(f"{source}: key 'scoring.lpips' must be one of {', '.join(networks)} or null, "
                            f"got {s.lpips!r}")
        if importlib.util.find_spec("lpips") is None:
            raise UserError(f"{source}: key 'scoring.lpips' is {s.lpips!r}, which needs the lpips package "
                            "(pip install lpips==0.1.4; it pulls torchvision); or set scoring.lpips=null")

    if sweep.benchmark.build_tiny_if_missing and not any(
            (Path(sweep.benchmark.dir) / sub / PROMPTS_FILE).is_file() for sub in ("dataset", ".")):
        write_tiny_benchmark(sweep.benchmark.dir)
    benchmark = load_benchmark(sweep.benchmark.dir)
    if sweep.subjects == "all":
        subjects = list(benchmark.subjects)
    else:
        known = {subject.name for subject in benchmark.subjects}
        unknown = [name for name in sweep.subjects if name not in known]
        if unknown:
            raise UserError(f"{source}: subjects not in the benchmark {sweep.benchmark.dir}: {', '.join(unknown)}")
        if not sweep.subjects or len(set(sweep.subjects)) != len(sweep.subjects):
            raise UserError(f"{source}: key 'subjects' must list distinct subjects (or be 'all')")
        subjects = [benchmark.subject(name) for name in sweep.subjects]
    for subject in subjects:
        real_image_paths(sweep.benchmark.dir, subject.name)
    return subjects


def expand_runs(sweep: SweepConfig, subjects: list[Subject], source: str) -> list[Run]:
    """Every (method, budget, subject, seed), each with its training config validated."""
    dataset = dataset_folder(sweep.benchmark.dir)
    runs = []
    for method in sweep.methods:
        base_config = method.base_config or sweep.base_config
        for budget in method.budgets if method.budgets is not None else sweep.budgets:
            for subject in subjects:
                for seed in sweep.seeds:
                    run_dir = Path(sweep.output_dir, "runs", method.name, f"budget-{budget:g}", subject.name,
                                   f"seed-{seed}")
                    owned = {
                        "output_dir": str(run_dir / "train"), "seed": seed, "train.resume": "latest",
                        "data.instance_dir": str(dataset / subject.name), "data.subject": subject.name,
                        "data.class_noun": subject.class_noun, "data.identifier": sweep.benchmark.identifier,
                        "adapter.type": method.adapter, "adapter.label": method.name, "adapter.budget": budget,
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
        recorded = read_json(run.dir / DONE).get("settings", {})
        for section, values in settings.items():
            for key, value in values.items():
                found = recorded.get(section, {}).get(key)
                if found != value:
                    raise UserError(f"finished run {run.dir} was made with {section}.{key}={found!r}, this sweep "
                                    f"asks {value!r}; delete that run folder or choose another output_dir")


# ---- commands --------------------------------------------------------------------------------------------


def train_command(run: Run) -> list[str]:
    return [sys.executable, str(TRAIN_SCRIPT), "--config", run.base_config, *run.train_overrides]


def generate_command(sweep: SweepConfig, run: Run) -> list[str]:
    g = sweep.generation
    return [sys.executable, "-m", "eval.generate_benchmark", "--runs", str(run.train_dir),
            "--benchmark", sweep.benchmark.dir, "--out", str(run.bench_dir),
            "--seeds", *map(str, g.seeds), "--scheduler", g.scheduler, "--steps", str(g.steps),
            "--guidance-scale", str(g.guidance_scale), "--negative-prompt", g.negative_prompt,
            "--resolution", str(g.resolution), "--batch-size", str(g.batch_size), "--dtype", g.dtype]


def encoder_paths(scoring: ScoringSettings) -> dict[str, str]:
    if scoring.tiny_encoders:
        tiny = Path(scoring.tiny_encoders)
        return {"dino": str(tiny / "dino"), "clip": str(tiny / "clip"), "cmmd_clip": str(tiny / "clip")}
    return {"dino": scoring.dino or DEFAULT_DINO, "clip": scoring.clip or DEFAULT_CLIP,
            "cmmd_clip": scoring.cmmd_clip or DEFAULT_CMMD_CLIP}


def score_command(sweep: SweepConfig, run: Run) -> list[str]:
    s = sweep.scoring
    encoders = encoder_paths(s)
    command = [sys.executable, "-m", "eval.score", "--images", str(run.images_dir), "--real", sweep.benchmark.dir,
               "--out", str(run.metrics_dir), "--dino", encoders["dino"], "--clip", encoders["clip"],
               "--cmmd-clip", encoders["cmmd_clip"], "--clip-t-prompt", s.clip_t_prompt,
               "--identifier", sweep.benchmark.identifier, "--lpips", s.lpips or "off",
               "--batch-size", str(s.batch_size)]
    if s.device:
        command += ["--device", s.device]
    if s.cache_dir:
        command += ["--cache-dir", s.cache_dir]
    return command


def report_command(metrics_files: list[Path], out: Path) -> list[str]:
    return [sys.executable, "-m", "eval.report", *map(str, metrics_files), "--out", str(out)]


def subprocess_env(cuda_visible_devices: Optional[str]) -> dict:
    env = dict(os.environ)
    if cuda_visible_devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = cuda_visible_devices
    return env


# ---- execution -------------------------------------------------------------------------------------------


class Children:
    """The stage subprocesses now running, so that an interrupted sweep can stop them."""

    def __init__(self):
        self._lock = threading.Lock()
        self._running: set[subprocess.Popen] = set()
        self.stopping = threading.Event()

    def run(self, command: list[str], log_path: Path, env: dict) -> int:
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


@dataclass
class Outcome:
    name: str  # the run's id, or "report"
    ok: bool
    stage: Optional[str] = None  # the stage that failed
    message: str = ""
    log: Optional[Path] = None


def _error_line(log_path: Path) -> str:
    """The trainer's and eval's `error: ...` line if there is one, else the log's last line."""
    lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or ["(empty log)"])[-1][-300:]


def execute_run(sweep: SweepConfig, run: Run, env: dict, children: Children) -> Outcome:
    """Train (unless done), generate, score, then write done.json; the run's lock keeps other sweeps out."""
    run.dir.mkdir(parents=True, exist_ok=True)
    with open(run.dir / "lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released when this process ends, however it ends
        except BlockingIOError:
            return Outcome(run.id, False, "start", "another sweep process is working on this run; run again later")
        if run.done:  # finished by another sweep since this one started
            return Outcome(run.id, True)
        return _execute_locked(sweep, run, env, children)


def _execute_locked(sweep: SweepConfig, run: Run, env: dict, children: Children) -> Outcome:
    (run.dir / FAILED).unlink(missing_ok=True)
    logs = run.dir / "logs"
    stages = [("generate", generate_command(sweep, run)), ("score", score_command(sweep, run))]
    if not (run.train_dir / "run_info.json").is_file():  # written once the adapter is saved
        stages.insert(0, ("train", train_command(run)))
    seconds = {}
    for stage, command in stages:
        started = time.time()
        status = children.run(command, logs / f"{stage}.log", env)
        seconds[stage] = round(time.time() - started, 1)
        if status != 0:
            if children.stopping.is_set():
                return Outcome(run.id, False, stage, "interrupted")
            log = logs / f"{stage}.log"
            return record_failure(run, Outcome(run.id, False, stage, f"exit status {status}: {_error_line(log)}", log))
    metrics = read_json(run.metrics_dir / "metrics.json")
    write_text_atomic(run.dir / DONE, json.dumps({
        "metrics": str((run.metrics_dir / "metrics.json").relative_to(run.dir)),
        "method": run.method.name, "adapter_type": run.method.adapter, "budget": run.budget,
        "subject": run.subject.name, "seed": run.seed, "settings": result_settings(sweep),
        "overall": metrics.get("overall"), "stage_seconds": seconds,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }, indent=2) + "\n")
    return Outcome(run.id, True)


def record_failure(run: Run, outcome: Outcome) -> Outcome:
    write_text_atomic(run.dir / FAILED, json.dumps(
        {"stage": outcome.stage, "error": outcome.message, "log": outcome.log and str(outcome.log)}, indent=2) + "\n")
    return outcome


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


def ensure_tiny_encoders(scoring: ScoringSettings, children: Children, log: Path) -> None:
    tiny = Path(scoring.tiny_encoders)
    if all((tiny / name / "config.json").is_file() for name in ("dino", "clip")):
        return
    command = [sys.executable, "-m", "eval.tiny_encoders", str(tiny)]
    if children.run(command, log, subprocess_env(None)) != 0:
        raise UserError(f"could not build the tiny encoders in {tiny}: {_error_line(log)} (log: {log})")


def report_dir(sweep: SweepConfig) -> Path:
    return Path(sweep.report.dir or Path(sweep.output_dir, "report"))


def write_reports(sweep: SweepConfig, finished: list[Run], children: Children) -> list[Outcome]:
    """eval.report over every finished run, and over those at the comparison budget when others exist."""
    out = report_dir(sweep)
    jobs = [(finished, out)]
    budget = sweep.report.comparison_budget
    at_budget = [run for run in finished if run.budget == budget]
    if at_budget and len(at_budget) < len(finished):
        jobs.append((at_budget, out / f"budget-{budget:g}"))
    failures = []
    for runs, folder in jobs:
        log = out / "report.log"
        status = children.run(report_command([run.metrics_dir / "metrics.json" for run in runs], folder), log,
                              subprocess_env(None))
        if status != 0:
            failures.append(Outcome("report", False, "report", f"exit status {status}: {_error_line(log)}", log))
        else:
            print(f"report: {folder / 'report.md'}")
            print((folder / "report.md").read_text().split("\nSettings:")[0])
    return failures


def print_plan(sweep: SweepConfig, source: str, runs: list[Run], devices: list[Optional[str]]) -> None:
    workers = ", ".join(f"GPU {d}" if d else "CPU" for d in devices)
    print(f"sweep {source}: {len(runs)} runs -> {sweep.output_dir}; workers: {workers}")
    for run in runs:
        print(f"  {run.state():8} {run.id}")
    pending = [run for run in runs if not run.done]
    if pending:
        run = pending[0]
        print(f"commands of the first pending run ({run.id}):")
        for command in (train_command(run), generate_command(sweep, run), score_command(sweep, run)):
            print("  " + shlex.join(command))
    print(f"then: {shlex.join(report_command([Path('<each run>/metrics/metrics.json')], report_dir(sweep)))}")


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM stops the stage subprocesses as Ctrl-C does


def run_sweep(sweep: SweepConfig, runs: list[Run], devices: list[Optional[str]]) -> int:
    """Run every unfinished run on the workers, then report; returns the exit status (1 if anything failed)."""
    write_text_atomic(report_dir(sweep) / "sweep.yaml", yaml.safe_dump(dataclasses.asdict(sweep), sort_keys=False))
    children = Children()
    previous_sigterm = signal.signal(signal.SIGTERM, _interrupt)
    try:
        if sweep.scoring.tiny_encoders:
            ensure_tiny_encoders(sweep.scoring, children, Path(sweep.output_dir, "logs", "tiny_encoders.log"))
        pending = [run for run in runs if not run.done]
        free_devices: Queue = Queue()
        for device in devices:
            free_devices.put(device)

        def on_a_free_device(run: Run) -> Outcome:
            device = free_devices.get()
            try:
                return execute_run(sweep, run, subprocess_env(device), children)
            except Exception as exc:  # one run's unexpected trouble must not end the others
                return record_failure(run, Outcome(run.id, False, "sweep", f"{type(exc).__name__}: {exc}"))
            finally:
                free_devices.put(device)

        failures = []
        progress = tqdm(total=len(runs), initial=len(runs) - len(pending), unit="run", desc="sweep", dynamic_ncols=True)
        with ThreadPoolExecutor(max_workers=len(devices)) as pool:
            try:
                for future in as_completed([pool.submit(on_a_free_device, run) for run in pending]):
                    outcome = future.result()
                    progress.update(1)
                    if outcome.ok:
                        progress.write(f"done    {outcome.name}")
                    else:
                        failures.append(outcome)
                        progress.write(f"FAILED  {outcome.name} at {outcome.stage}: {outcome.message}")
            except KeyboardInterrupt:
                children.stop()
                pool.shutdown(cancel_futures=True)
                raise
        progress.close()
        finished = [run for run in runs if run.done]
        if finished:
            failures += write_reports(sweep, finished, children)
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)
    print(f"{len(finished)} of {len(runs)} runs finished")
    if failures:
        print(f"{len(failures)} failure(s):", file=sys.stderr)
        for outcome in failures:
            print(f"  {outcome.name} at {outcome.stage}: {outcome.message} (log: {outcome.log})", file=sys.stderr)
        return 1
    return 0


@cli_entry
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", required=True, help="sweep YAML (see configs/sweeps/)")
    parser.add_argument("--dry-run", action="store_true", help="validate and print the plan; run nothing")
    parser.add_argument("--gpus", type=int, default=None,
                        help="workers, one per GPU (default: every visible GPU, or one CPU worker); 0: CPU only")
    parser.add_argument("overrides", nargs="*", help="key.sub=value settings applied on top of the sweep file")
    args = parser.parse_args(argv)
    if args.gpus is not None and args.gpus < 0:
        raise UserError(f"--gpus must be >= 0, got {args.gpus}")
    sweep = load_sweep(args.sweep, tuple(args.overrides))
    subjects = validate_sweep(sweep, args.sweep)
    runs = expand_runs(sweep, subjects, args.sweep)
    check_finished_runs(runs, result_settings(sweep))
    devices = worker_devices(args.gpus)
    if args.dry_run:
        print_plan(sweep, args.sweep, runs, devices)
        return
    try:
        status = run_sweep(sweep, runs, devices)
    except KeyboardInterrupt:
        print("\ninterrupted: finished runs are kept; run the same command again to resume", file=sys.stderr)
        sys.exit(130)
    sys.exit(status)


if __name__ == "__main__":
    main()
