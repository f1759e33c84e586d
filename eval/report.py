"""Compare scored runs: a paper-style table and plots, grouped by (method, budget).

    python -m eval.report RUN_OR_METRICS... --out DIR [--allow-mixed] [--comparison-budget B]

Each argument is a metrics.json written by `eval.score`, or a folder searched recursively for them (a run
folder, a sweep's output folder). Runs of the same method and budget (typically one per subject) form one
row: each subject's scores are averaged over its runs, then the row gives the mean and the standard error
over subjects. Writes to DIR: index.html (the page to open: settings, tables, plots, qualitative grid; see
eval.report_page), report.md, report.csv, report.tex, tradeoff.png (DINO vs CLIP-T), metrics_vs_budget.png,
metrics_vs_scaling.png (each metric vs the adapter's scaling lambda), cost.png (train time, peak memory, adapter
size, images/s, where recorded), qualitative.png and the grid's images/ and thumbs/; and prints the table.
All inputs must have been scored with the same settings (encoders, CLIP-T prompt, LPIPS, drift prompts), or the
report stops, naming both (--allow-mixed reports them together and lists the differences).
"""
import argparse
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from eval.files import json_field, read_json
from eval.layout import GENERATION_TIMING, METRICS_JSON, REPORT_CSV, REPORT_MD, REPORT_PAGE, REPORT_TEX
from eval.qualitative import grid_rows, save_qualitative_png, write_grid_images
from eval.report_page import render_page
from eval.report_plots import (
    plot_costs,
    plot_metrics_vs_budget,
    plot_metrics_vs_scaling,
    plot_tradeoff,
)
from eval.tables import (
    COSTS,
    METRICS,
    SMOKE_TEST_BANNER,
    csv_text,
    format_budget,
    format_mean_se,
    is_missing,
    latex_table,
    markdown_table,
)
from waveft.errors import UserError, cli_entry
from waveft.io.cli_settings import refuse_non_finite
from waveft.io.files import check_can_write, write_text_atomic
from waveft.io.run_folder import RunInfo


@dataclass
class ScoredRun:
    path: Path
    method: str
    budget: float | None
    trainable_parameters: int | None
    per_subject: dict[str, dict]
    settings: dict
    smoke_test: bool
    images_dir: Path | None = None  # the scored images (for the qualitative grid), if still there
    run: RunInfo | None = None  # run_info.json as eval.generate_benchmark copied it
    generation: dict = field(default_factory=dict)  # generation.json: benchmark images per second

    @property
    def scaling(self) -> float | None:
        return self.run.scaling if self.run else None

    def cost(self, key: str):
        """A cost (tables.COSTS) as recorded: generation.json's images per second, else the run record's."""
        if key == "images_per_second":
            return self.generation.get(key)
        return getattr(self.run, key) if self.run else None


def load_scored_run(path: Path) -> ScoredRun:
    result = read_json(path)
    missing = [key for key in ("settings", "per_subject", "smoke_test") if key not in result]
    if missing:
        raise UserError(f"{path} is not a metrics.json from eval.score (missing {', '.join(missing)})")
    for key, kind in (("settings", dict), ("per_subject", dict), ("smoke_test", bool)):
        json_field(result, key, kind, path)
    run = RunInfo.from_dict(result["run"], f"{path}: key 'run'") if result.get("run") else None
    # Images scored without a run_info.json (e.g. hand-made folders) are named after their folder.
    method = run.method if run else Path(result.get("images_dir", path.parent)).name
    images_dir = Path(result["images_dir"]) if result.get("images_dir") else None
    images_dir = images_dir if images_dir and images_dir.is_dir() else None
    timing = images_dir / GENERATION_TIMING if images_dir else None
    budget, trainable = (run.budget, run.trainable_parameters) if run else (None, None)
    return ScoredRun(path, method, budget, trainable, result["per_subject"],
                     result["settings"], result["smoke_test"], images_dir, run,
                     read_json(timing) if timing and timing.is_file() else {})


def find_metrics_files(inputs: list[Path]) -> list[Path]:
    found = []
    for item in inputs:
        if item.is_file():
            found.append(item)
        elif item.is_dir():
            matches = sorted(item.rglob(METRICS_JSON))
            if not matches:
                raise UserError(f"no {METRICS_JSON} under {item} (score images with: python -m eval.score)")
            found += matches
        else:
            raise UserError(f"{item} does not exist")
    return sorted(set(p.resolve() for p in found))


def mixed_settings(runs: list[ScoredRun]) -> list[str]:
    """One line per setting on which some run differs from the first: both values, both files."""
    first, found = runs[0], []
    for run in runs[1:]:
        for key in sorted(set(first.settings) | set(run.settings)):
            if first.settings.get(key) != run.settings.get(key):
                found.append(f"{run.path} was scored with other settings than {first.path} ({key}: "
                             f"{run.settings.get(key)!r} vs {first.settings.get(key)!r})")
    return found


def check_same_settings(runs: list[ScoredRun], allow_mixed: bool = False) -> list[str]:
    """Refuse runs scored with different settings in one table (unless allowed: then the differences are
    returned, for the report to print)."""
    found = mixed_settings(runs)
    if found and not allow_mixed:
        raise UserError(f"{found[0]}; metrics from different settings cannot share one table "
                        "(--allow-mixed to report them together anyway)")
    return found


@dataclass
class Group:
    """One table row: every run of one method at one budget."""

    method: str
    budget: float | None
    runs: list[ScoredRun] = field(default_factory=list)

    def trainable_parameters(self, thousands_separator: bool = True) -> str:
        """The runs' count, or its range if they differ (they should not within one method and budget)."""
        counts = sorted({r.trainable_parameters for r in self.runs if r.trainable_parameters is not None})
        text = [f"{c:,}" if thousands_separator else str(c) for c in counts]
        return "-" if not counts else text[0] if len(counts) == 1 else f"{text[0]} to {text[-1]}"

    def subject_values(self, key: str) -> list[float]:
        """Per subject, the metric averaged over that subject's runs (missing values left out)."""
        by_subject: dict[str, list[float]] = {}
        for run in self.runs:
            for subject, scores in run.per_subject.items():
                if not is_missing(scores.get(key)):
                    by_subject.setdefault(subject, []).append(scores[key])
        return [float(np.mean(values)) for values in by_subject.values()]

    @property
    def subjects(self) -> int:
        return len({s for r in self.runs for s in r.per_subject})

    @property
    def label(self) -> str:
        return self.method if self.budget is None else f"{self.method} (budget {self.budget:g})"

    def run_mean(self, key: str) -> float | None:
        """A cost (COSTS) averaged over the runs that recorded it: run_info.json's, or generation.json's."""
        values = [r.cost(key) for r in self.runs]
        values = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        return float(np.mean(values)) if values else None

    @property
    def scaling(self) -> float | None:
        """The adapter's scaling lambda, when every run of the group recorded the same one."""
        values = {r.scaling for r in self.runs}
        return values.pop() if len(values) == 1 else None

    def mean_se(self, key: str) -> tuple[float, float]:
        values = self.subject_values(key)
        if not values:
            return math.nan, math.nan
        se = float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1 else math.nan
        return float(np.mean(values)), se


def group_runs(runs: list[ScoredRun]) -> list[Group]:
    groups: dict[tuple, Group] = {}
    for run in runs:
        groups.setdefault((run.method, run.budget), Group(run.method, run.budget)).runs.append(run)
    # Methods alphabetically, budgets ascending, runs without a budget first.
    return sorted(groups.values(), key=lambda g: (g.method, g.budget is not None, g.budget or 0.0))



TABLE_HEADER = ["method", "budget", "trainable params", "subjects"] + [label for label, _ in METRICS.values()]


def table_rows(groups: list[Group]) -> list[list[str]]:
    return [[g.method, format_budget(g.budget), g.trainable_parameters(), str(g.subjects)]
            + [format_mean_se(key, *g.mean_se(key)) for key in METRICS] for g in groups]


def report_csv(groups: list[Group], smoke_test: bool) -> str:
    header = ["method", "budget", "trainable_parameters", "subjects", "runs"]
    header += [f"{key}_{stat}" for key in METRICS for stat in ("mean", "se")]
    header += ["scaling"] + list(COSTS) + ["smoke_test"]
    rows = []
    for g in groups:
        stats = [value for key in METRICS for value in g.mean_se(key)]
        costs = [g.run_mean(key) for key in COSTS]
        rows.append([g.method, g.budget, g.trainable_parameters(False), g.subjects, len(g.runs)] + stats
                    + [g.scaling] + costs + [smoke_test])
    return csv_text(header, rows)


def report_markdown(groups: list[Group], runs: list[ScoredRun], smoke_test: bool, plots: list[str]) -> str:
    parts = ["# Method comparison\n"]
    if smoke_test:
        parts.append(f"> **{SMOKE_TEST_BANNER}**\n")
    parts.append(f"{len(runs)} scored runs; mean ± standard error over subjects.\n")
    parts.append(markdown_table(TABLE_HEADER, table_rows(groups)))
    parts.append("\nSettings:\n\n" + "".join(f"- {k}: {v}\n" for k, v in runs[0].settings.items()))
    parts.append("\n" + "\n\n".join(f"![{Path(plot).stem}]({plot})" for plot in plots) + "\n")
    return "\n".join(parts)


def report_latex(groups: list[Group], runs: list[ScoredRun], smoke_test: bool) -> str:
    caption = (f"Mean and standard error over subjects. Encoders: DINO {runs[0].settings.get('dino')}; "
               f"CLIP {runs[0].settings.get('clip_i_and_clip_t')}; CMMD {runs[0].settings.get('cmmd')}.")
    if smoke_test:
        caption = f"{SMOKE_TEST_BANNER}. {caption}"
    return latex_table(TABLE_HEADER, table_rows(groups), caption)


def default_comparison_budget(groups: list[Group]) -> float | None:
    """The budget that most methods were run at (ties: the smallest); None when no run has a budget."""
    counts: dict[float, int] = {}
    for g in groups:
        if g.budget is not None:
            counts[g.budget] = counts.get(g.budget, 0) + 1
    return min(counts, key=lambda b: (-counts[b], b)) if counts else None


def write_plots(groups: list[Group], out: Path, smoke_test: bool) -> list[tuple[str, str]]:
    """Every plot that has something to show; returns (file, title) of those written."""
    plot_tradeoff(groups, out / "tradeoff.png", smoke_test)
    plots = [("tradeoff.png", "Fidelity trade-off: DINO vs CLIP-T")]
    for file, title, plot in (("metrics_vs_budget.png", "Metrics vs budget", plot_metrics_vs_budget),
                              ("metrics_vs_scaling.png", "Metrics vs scaling lambda", plot_metrics_vs_scaling),
                              ("cost.png", "Cost per run", plot_costs)):
        if plot(groups, out / file, smoke_test):
            plots.append((file, title))
        else:
            print(f"nothing to plot in {file} (no budgets, scalings or costs recorded for it)")
    return plots


def write_qualitative(groups: list[Group], out: Path, budget, prompt_indices: list[int], seed,
                      smoke_test: bool) -> tuple:
    """The qualitative grid's images under out/ and qualitative.png; returns (rows, labels, seed)."""
    columns = [g for g in groups if g.budget is None or budget is None or g.budget == budget]
    rows, seed = grid_rows(columns, prompt_indices, seed)
    labels = [g.label for g in columns]
    if rows:
        write_grid_images(rows, out)
        save_qualitative_png(rows, labels, out / "qualitative.png", seed, smoke_test)
    else:
        print("no scored images found where metrics.json says: qualitative grid not drawn")
    return rows, labels, seed


@cli_entry
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", type=Path, metavar="RUN_OR_METRICS",
                        help="metrics.json files, or folders searched recursively for them")
    parser.add_argument("--out", type=Path, required=True,
                        help="folder for index.html, report.md/.csv/.tex, the plots and the qualitative grid")
    parser.add_argument("--allow-mixed", action="store_true",
                        help="report runs scored with different settings together (the page lists the differences)")
    parser.add_argument("--comparison-budget", type=float, default=None,
                        help="budget of the method comparison table and the qualitative grid "
                             "(default: the budget most methods were run at)")
    parser.add_argument("--grid-prompts", type=int, nargs="+", default=[0],
                        help="prompt indices (in each subject's list) shown in the qualitative grid (default: 0)")
    parser.add_argument("--grid-seed", type=int, default=None, help="image seed of the grid (default: the lowest)")
    args = parser.parse_args(argv)
    refuse_non_finite(args.comparison_budget, "--comparison-budget")
    check_can_write(args.out, "--out")
    runs = [load_scored_run(path) for path in find_metrics_files(args.inputs)]
    mixed = check_same_settings(runs, args.allow_mixed)
    groups = group_runs(runs)
    smoke_test = any(r.smoke_test for r in runs)
    budget = args.comparison_budget if args.comparison_budget is not None else default_comparison_budget(groups)

    plots = write_plots(groups, args.out, smoke_test)
    grid = write_qualitative(groups, args.out, budget, args.grid_prompts, args.grid_seed, smoke_test)
    markdown = report_markdown(groups, runs, smoke_test, [file for file, _ in plots]
                               + (["qualitative.png"] if grid[0] else []))
    write_text_atomic(args.out / REPORT_MD, markdown)
    write_text_atomic(args.out / REPORT_CSV, report_csv(groups, smoke_test))
    write_text_atomic(args.out / REPORT_TEX, report_latex(groups, runs, smoke_test))
    write_text_atomic(args.out / REPORT_PAGE, render_page(groups, runs, smoke_test, plots, grid, budget, mixed))
    print(markdown)
    for line in mixed:
        print(f"warning: {line}")
    print(f"wrote {args.out}/index.html, report.md, report.csv, report.tex, plots")


if __name__ == "__main__":
    main()
