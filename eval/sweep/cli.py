"""One-command sweeps: subjects x methods x budgets x seeds, each run trained, generated and scored, then reported.

    python scripts/sweep.py --sweep configs/sweeps/budget.yaml [--dry-run] [--gpus N] [key.sub=value ...]
    python scripts/sweep.py --sweep X launcher.type=slurm launcher.partition=gpu [--no-wait] [--cancel-on-interrupt]
    python scripts/sweep.py --sweep X --report-only

The sweep file (schema: `eval.sweep.schema.SweepConfig`) names everything the runs depend on; it is read,
type-checked and every run's training config is validated before any work starts (nothing is written before
then, and `--dry-run` writes nothing at all). Each run is three subprocesses: the trainer,
`eval.generate_benchmark` and `eval.score` (see `eval.sweep.runs` for the run folders). `launcher.type: local`
(the default) runs them on this machine, one worker per GPU; `launcher.type: slurm` submits one Slurm job array,
one task per unfinished run (`eval.sweep.slurm`). Then `eval.report` compares all finished runs:

    report/             `report.dir`: eval.report over every finished run (tables with each method's cost per run:
                        train time, peak memory, adapter size, images/s; plots; index.html), sweep.yaml (the
                        resolved sweep, rewritten at every start) and report.log
    report/budget-<b>/  eval.report over the runs at `report.comparison_budget` (the method comparison)

Sweeps may share an output_dir (with their own `report.dir`): a run that two sweeps name (same method name,
budget, subject and seed) is trained once; its config, generation and scoring settings must then agree.

An interrupted run resumes: training with `train.resume=latest` (from its last checkpoint, or from scratch if
none was written), generation skips the images it already has, scoring is redone. A failed run is recorded
and the others go on; the sweep then reports the finished runs, lists the failures and exits 1.
"""
import argparse
import dataclasses
import shlex
import sys
from pathlib import Path

import yaml
from tqdm.auto import tqdm

from eval.layout import REPORT_MD, metrics_file
from eval.sweep.runner import (
    Children,
    LocalLauncher,
    Outcome,
    device_env,
    error_line,
    sigterm_as_interrupt,
    worker_devices,
)
from eval.sweep.runs import (
    Run,
    RunWork,
    check_finished_runs,
    expand_runs,
    generate_command,
    result_settings,
    score_command,
    train_command,
)
from eval.sweep.schema import SweepConfig, benchmark_is_to_be_built, load_sweep, validate_sweep
from eval.sweep.stages import report_argv
from eval.tiny_benchmark import write_tiny_benchmark
from waveft.errors import UserError, cli_entry
from waveft.io.files import check_can_write, write_text_atomic


def report_dir(sweep: SweepConfig) -> Path:
    return Path(sweep.report.dir or Path(sweep.output_dir, "report"))


def ensure_tiny_encoders(sweep: SweepConfig, children: Children) -> None:
    tiny = Path(sweep.scoring.tiny_encoders)
    if all((tiny / name / "config.json").is_file() for name in ("dino", "clip")):
        return
    log = Path(sweep.output_dir, "logs", "tiny_encoders.log")
    if children.run([sys.executable, "-m", "eval.tiny_encoders", str(tiny)], log, device_env(None)) != 0:
        raise UserError(f"could not build the tiny encoders in {tiny}: {error_line(log)} (log: {log})")


def write_inputs(sweep: SweepConfig, children: Children) -> None:
    """What the launch writes before any run: the tiny benchmark and encoders if asked for, the resolved sweep."""
    if benchmark_is_to_be_built(sweep):
        write_tiny_benchmark(sweep.benchmark.dir)
    if sweep.scoring.tiny_encoders:
        ensure_tiny_encoders(sweep, children)
    write_text_atomic(report_dir(sweep) / "sweep.yaml", yaml.safe_dump(dataclasses.asdict(sweep), sort_keys=False))


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
        status = children.run(report_argv([metrics_file(run.metrics_dir) for run in runs], folder), log,
                              device_env(None))
        if status != 0:
            failures.append(Outcome("report", False, "report", f"exit status {status}: {error_line(log)}", log))
        else:
            print(f"report: {folder / REPORT_MD}")
            print((folder / REPORT_MD).read_text().split("\nSettings:")[0])
    return failures


def finish(sweep: SweepConfig, runs: list[Run], failures: list[Outcome], children: Children) -> int:
    """Report the finished runs and list the failures; returns the exit status (1 if anything failed)."""
    finished = [run for run in runs if run.done]
    if finished:
        failures = failures + write_reports(sweep, finished, children)
    print(f"{len(finished)} of {len(runs)} runs finished")
    if failures:
        print(f"{len(failures)} failure(s):", file=sys.stderr)
        for outcome in failures:
            print(f"  {outcome.name} at {outcome.stage}: {outcome.message} (log: {outcome.log})", file=sys.stderr)
        return 1
    return 0


def print_plan(sweep: SweepConfig, source: str, runs: list[Run], launcher) -> None:
    print(f"sweep {source}: {len(runs)} runs -> {sweep.output_dir}; {launcher.describe()}")
    for run in runs:
        print(f"  {run.state():8} {run.id}")
    pending = [run for run in runs if not run.done]
    if pending:
        run = pending[0]
        print(f"commands of the first pending run ({run.id}):")
        for command in (train_command(run), generate_command(sweep, run), score_command(sweep, run)):
            print("  " + shlex.join(command))
    print(f"then: {shlex.join(report_argv([metrics_file('<each run>/metrics')], report_dir(sweep)))}")


def make_launcher(sweep: SweepConfig, args, pending: int):
    """The launcher the sweep asks for, with its checks against the machine or cluster made (nothing submitted)."""
    if sweep.launcher.type == "slurm":
        from eval.sweep.slurm import SlurmLauncher

        if args.gpus is not None:
            raise UserError("--gpus is for launcher.type=local; on Slurm set launcher.gpus_per_run")
        return SlurmLauncher(sweep.launcher, Path(sweep.output_dir, "slurm").resolve(), pending,
                             wait=not args.no_wait,
                             cancel_on_interrupt=args.cancel_on_interrupt)
    if args.no_wait or args.cancel_on_interrupt:
        raise UserError("--no-wait and --cancel-on-interrupt are for launcher.type=slurm")
    return LocalLauncher(worker_devices(args.gpus), sweep.launcher.max_parallel)


def run_sweep(sweep: SweepConfig, runs: list[Run], launcher) -> int:
    """Run every unfinished run through the launcher, then report; returns the exit status."""
    children = Children()
    with sigterm_as_interrupt():
        write_inputs(sweep, children)
        pending = [run for run in runs if not run.done]
        progress = tqdm(total=len(runs), initial=len(runs) - len(pending), unit="run", desc="sweep", dynamic_ncols=True)
        outcomes = launcher.launch(pending, RunWork(sweep), children, progress)
        progress.close()
        if outcomes is None:  # submitted, not waited for
            return 0
        return finish(sweep, runs, [outcome for outcome in outcomes if not outcome.ok], children)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", required=True, help="sweep YAML (see configs/sweeps/)")
    parser.add_argument("--dry-run", action="store_true", help="validate and print the plan; run or write nothing")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: report the runs finished so far (e.g. after --no-wait)")
    parser.add_argument("--gpus", type=int, default=None,
                        help="local workers, one per GPU (default: every visible GPU, or one CPU worker); 0: CPU only")
    parser.add_argument("--no-wait", action="store_true",
                        help="Slurm: submit, print the job id and return (then --report-only builds the report)")
    parser.add_argument("--cancel-on-interrupt", action="store_true",
                        help="Slurm: Ctrl-C while waiting cancels the jobs without asking")
    parser.add_argument("overrides", nargs="*", help="key.sub=value settings applied on top of the sweep file")
    args = parser.parse_args(argv)
    if args.gpus is not None and args.gpus < 0:
        raise UserError(f"--gpus must be >= 0, got {args.gpus}")
    if args.report_only and (args.dry_run or args.no_wait):
        raise UserError("--report-only runs nothing: it does not go with --dry-run or --no-wait")
    return args


@cli_entry
def main(argv=None) -> None:
    args = parse_args(argv)
    sweep = load_sweep(args.sweep, tuple(args.overrides))
    subjects = validate_sweep(sweep, args.sweep)
    runs = expand_runs(sweep, subjects, args.sweep)
    check_finished_runs(runs, result_settings(sweep))
    check_can_write(sweep.output_dir, f"{args.sweep}: key 'output_dir'")
    check_can_write(report_dir(sweep), f"{args.sweep}: key 'report.dir'")
    if args.report_only:
        sys.exit(finish(sweep, runs, [], Children()))
    launcher = make_launcher(sweep, args, sum(not run.done for run in runs))
    if args.dry_run:
        print_plan(sweep, args.sweep, runs, launcher)
        return
    try:
        status = run_sweep(sweep, runs, launcher)
    except KeyboardInterrupt:
        print("\ninterrupted: finished runs are kept; run the same command again to resume", file=sys.stderr)
        sys.exit(130)
    sys.exit(status)
