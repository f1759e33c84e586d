"""The sweep file: its schema, command-line overrides and the model-free checks made before any work.

Nothing here writes to disk: `--dry-run` and a refused sweep leave the file system as they found it.
"""
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Union

from eval.generate_benchmark import BenchmarkGenerationSettings
from eval.protocol import (
    DEFAULT_IDENTIFIER,
    PROMPTS_FILE,
    Benchmark,
    Subject,
    dataset_folder,
    load_benchmark,
    real_image_paths,
)
from eval.sweep.stages import ScoringSettings, check_stage_settings
from eval.tiny_benchmark import tiny_benchmark
from waveft.errors import UserError
from waveft.io.schema import apply_override, coerce_value, read_yaml_mapping

METHOD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")  # it names a folder
# Run-config keys the sweep sets for each run; overrides may not set them.
SWEEP_OWNED_KEYS = ("output_dir", "overwrite_output_dir", "seed", "data.instance_dir", "data.subject",
                    "data.class_noun", "data.identifier", "adapter.type", "adapter.label", "adapter.budget",
                    "train.resume")
# sbatch options the Slurm launcher sets itself (the job array, its logs, the requeue signal).
LAUNCHER_OWNED_SBATCH = ("array", "output", "error", "open-mode", "signal", "job-name")


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


# ---- the sweep file -----------------------------------------------------------------------------------------


@dataclass
class ReportSettings:
    dir: Optional[str] = None  # default: <output_dir>/report
    # Also report the runs at this budget alone (the paper's method comparison); null: no such report.
    comparison_budget: Optional[float] = 1.0


@dataclass
class LauncherSettings:
    """Where the runs execute: `local` (this machine's GPUs, or one CPU worker) or `slurm` (one job array)."""

    type: Literal["local", "slurm"] = "local"
    partition: Optional[str] = None  # default: the cluster's default partition
    account: Optional[str] = None
    qos: Optional[str] = None
    time_minutes: int = 120  # per run (task); a task that reaches it is requeued and resumes its run
    gpus_per_run: int = 1
    cpus_per_run: int = 8
    mem_gb: Optional[float] = None  # default: the partition's
    max_parallel: Optional[int] = None  # runs at once (Slurm: the array's %limit; local: workers); null: no limit
    extra_sbatch: dict = field(default_factory=dict)  # more sbatch options, e.g. {constraint: a100}


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
    generation: BenchmarkGenerationSettings = field(default_factory=BenchmarkGenerationSettings)
    scoring: ScoringSettings = field(default_factory=ScoringSettings)
    report: ReportSettings = field(default_factory=ReportSettings)
    launcher: LauncherSettings = field(default_factory=LauncherSettings)


def load_sweep(path: str, overrides: tuple[str, ...] = ()) -> SweepConfig:
    """Read, override and type-check a sweep file; unknown keys are refused by name."""
    tree = read_yaml_mapping(path, "sweep file")
    for override in overrides:
        apply_override(tree, override, SweepConfig)
    return coerce_value(tree, SweepConfig, "", path)


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


def _check_methods(sweep: SweepConfig, source: str) -> None:
    from waveft.adapters.methods import METHODS

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


def check_launcher(launcher: LauncherSettings, source: str) -> None:
    """The launcher's own values; whether the cluster can run them is the launcher's check (eval.sweep.slurm)."""
    for key in ("time_minutes", "cpus_per_run"):
        if getattr(launcher, key) <= 0:
            raise UserError(f"{source}: key 'launcher.{key}' must be > 0, got {getattr(launcher, key)}")
    if launcher.gpus_per_run < 0:
        raise UserError(f"{source}: key 'launcher.gpus_per_run' must be >= 0, got {launcher.gpus_per_run}")
    if launcher.mem_gb is not None and launcher.mem_gb <= 0:
        raise UserError(f"{source}: key 'launcher.mem_gb' must be > 0 or null, got {launcher.mem_gb}")
    if launcher.max_parallel is not None and launcher.max_parallel <= 0:
        raise UserError(f"{source}: key 'launcher.max_parallel' must be > 0 or null, got {launcher.max_parallel}")
    for key, value in launcher.extra_sbatch.items():
        if not isinstance(key, str) or not re.fullmatch(r"[a-z][a-z0-9-]*", key):
            raise UserError(f"{source}: key 'launcher.extra_sbatch' names sbatch options without their dashes "
                            f"(e.g. constraint, mail-type), got {key!r}")
        if key in LAUNCHER_OWNED_SBATCH:
            raise UserError(f"{source}: key 'launcher.extra_sbatch.{key}' is set by the launcher itself")
        if not isinstance(value, (str, int, float, bool)):
            raise UserError(f"{source}: key 'launcher.extra_sbatch.{key}' must be a single value, got {value!r}")


def benchmark_is_to_be_built(sweep: SweepConfig) -> bool:
    """The tiny benchmark is asked for and not there yet (the launch writes it; validation only plans on it)."""
    return sweep.benchmark.build_tiny_if_missing and not any(
        (Path(sweep.benchmark.dir) / sub / PROMPTS_FILE).is_file() for sub in ("dataset", "."))


def benchmark_dataset(sweep: SweepConfig) -> Path:
    """The benchmark's dataset/ folder (where eval.tiny_benchmark will write it, if it is still to be built)."""
    if benchmark_is_to_be_built(sweep):
        return Path(sweep.benchmark.dir, "dataset")
    return dataset_folder(sweep.benchmark.dir)


def _subjects(sweep: SweepConfig, benchmark: Benchmark, source: str) -> list[Subject]:
    if sweep.subjects == "all":
        return list(benchmark.subjects)
    known = {subject.name for subject in benchmark.subjects}
    unknown = [name for name in sweep.subjects if name not in known]
    if unknown:
        raise UserError(f"{source}: subjects not in the benchmark {sweep.benchmark.dir}: {', '.join(unknown)}")
    if not sweep.subjects or len(set(sweep.subjects)) != len(sweep.subjects):
        raise UserError(f"{source}: key 'subjects' must list distinct subjects (or be 'all')")
    return [benchmark.subject(name) for name in sweep.subjects]


def validate_sweep(sweep: SweepConfig, source: str) -> list[Subject]:
    """Model-free checks of the sweep as a whole; returns the subjects it runs on. Writes nothing."""
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
    _check_methods(sweep, source)
    for config in {sweep.base_config} | {m.base_config for m in sweep.methods if m.base_config}:
        if not os.path.isfile(config):
            raise UserError(f"{source}: base config not found: {config}")
    check_stage_settings(sweep.generation, sweep.scoring, source)
    check_launcher(sweep.launcher, source)

    if benchmark_is_to_be_built(sweep):
        return _subjects(sweep, tiny_benchmark(), source)
    subjects = _subjects(sweep, load_benchmark(sweep.benchmark.dir), source)
    for subject in subjects:
        real_image_paths(sweep.benchmark.dir, subject.name)
    return subjects
