"""Compare scored runs: a paper-style table and plots, grouped by (method, budget).

    python -m eval.report RUN_OR_METRICS... --out DIR

Each argument is a metrics.json written by `eval.score`, or a folder searched recursively for them (a run
folder, a sweep's output folder). Runs of the same method and budget (typically one per subject) form one
row: each subject's scores are averaged over its runs, then the row gives the mean and the standard error
over subjects. Writes report.md, report.csv, report.tex, tradeoff.png (DINO vs CLIP-T) and
metrics_vs_budget.png (each metric vs budget, one line per method) to DIR, and prints the table.
All inputs must have been scored with the same settings (encoders, CLIP-T prompt, LPIPS), or the report stops.
"""
import argparse
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from eval.files import read_json
from eval.tables import METRICS, SMOKE_TEST_BANNER, csv_text, format_mean_se, is_missing, latex_table, markdown_table
from waveft.errors import UserError, cli_entry
from waveft.files import write_atomic, write_text_atomic

METRICS_FILE = "metrics.json"


@dataclass
class ScoredRun:
    path: Path
    method: str
    budget: float | None
    trainable_parameters: int | None
    per_subject: dict[str, dict]
    settings: dict
    smoke_test: bool


def load_scored_run(path: Path) -> ScoredRun:
    result = read_json(path)
    missing = [key for key in ("settings", "per_subject", "smoke_test") if key not in result]
    if missing:
        raise UserError(f"{path} is not a metrics.json from eval.score (missing {', '.join(missing)})")
    run = result.get("run") or {}
    # Images scored without a run_info.json (e.g. hand-made folders) are named after their folder.
    method = run.get("method") or Path(result.get("images_dir", path.parent)).name
    return ScoredRun(path, method, run.get("budget"), run.get("trainable_parameters"), result["per_subject"],
                     result["settings"], result["smoke_test"])


def find_metrics_files(inputs: list[Path]) -> list[Path]:
    found = []
    for item in inputs:
        if item.is_file():
            found.append(item)
        elif item.is_dir():
            matches = sorted(item.rglob(METRICS_FILE))
            if not matches:
                raise UserError(f"no {METRICS_FILE} under {item} (score images with: python -m eval.score)")
            found += matches
        else:
            raise UserError(f"{item} does not exist")
    return sorted(set(p.resolve() for p in found))


def check_same_settings(runs: list[ScoredRun]) -> None:
    first = runs[0]
    for run in runs[1:]:
        for key in sorted(set(first.settings) | set(run.settings)):
            if first.settings.get(key) != run.settings.get(key):
                raise UserError(f"{run.path} was scored with other settings than {first.path} ({key}: "
                                f"{run.settings.get(key)!r} vs {first.settings.get(key)!r}); "
                                "metrics from different settings cannot share one table")


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


def _format_budget(budget: float | None) -> str:
    return "-" if budget is None else f"{budget:g}"


TABLE_HEADER = ["method", "budget", "trainable params", "subjects"] + [label for label, _ in METRICS.values()]


def table_rows(groups: list[Group]) -> list[list[str]]:
    return [[g.method, _format_budget(g.budget), g.trainable_parameters(), str(g.subjects)]
            + [format_mean_se(key, *g.mean_se(key)) for key in METRICS] for g in groups]


def report_csv(groups: list[Group], smoke_test: bool) -> str:
    header = ["method", "budget", "trainable_parameters", "subjects", "runs"]
    header += [f"{key}_{stat}" for key in METRICS for stat in ("mean", "se")] + ["smoke_test"]
    rows = []
    for g in groups:
        stats = [value for key in METRICS for value in g.mean_se(key)]
        rows.append([g.method, g.budget, g.trainable_parameters(False), g.subjects, len(g.runs)] + stats + [smoke_test])
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


def _save_figure(figure, path: Path) -> None:
    write_atomic(path, lambda f: figure.savefig(f, format="png", dpi=150, bbox_inches="tight"))


def plot_tradeoff(groups: list[Group], path: Path, smoke_test: bool) -> None:
    """DINO (subject fidelity) against CLIP-T (prompt fidelity), one line per method through its budgets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4.5))
    for method in sorted({g.method for g in groups}):
        points = [(g, g.mean_se("clip_t"), g.mean_se("dino")) for g in groups if g.method == method]
        xs, xerr = [p[1][0] for p in points], [p[1][1] for p in points]
        ys, yerr = [p[2][0] for p in points], [p[2][1] for p in points]
        axes.errorbar(xs, ys, xerr=np.nan_to_num(xerr), yerr=np.nan_to_num(yerr), marker="o", capsize=3,
                      label=method)
        for (g, _, _), x, y in zip(points, xs, ys):
            if g.budget is not None:
                axes.annotate(_format_budget(g.budget), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    axes.set_xlabel("CLIP-T (prompt fidelity)")
    axes.set_ylabel("DINO (subject fidelity)")
    axes.set_title("Fidelity trade-off" + (" [SMOKE TEST]" if smoke_test else ""))
    axes.legend()
    _save_figure(figure, path)
    plt.close(figure)


def plot_metrics_vs_budget(groups: list[Group], path: Path, smoke_test: bool) -> bool:
    """One panel per metric, one line per method; returns False (and writes nothing) when no run has a budget."""
    budgeted = [g for g in groups if g.budget is not None]
    keys = [key for key in METRICS if any(not math.isnan(g.mean_se(key)[0]) for g in budgeted)]
    if not budgeted or not keys:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.4), squeeze=False)
    for axis, key in zip(axes[0], keys):
        for method in sorted({g.method for g in budgeted}):
            line = [g for g in budgeted if g.method == method]
            stats = [g.mean_se(key) for g in line]
            axis.errorbar([g.budget for g in line], [s[0] for s in stats], yerr=np.nan_to_num([s[1] for s in stats]),
                          marker="o", capsize=3, label=method)
        axis.set_xlabel("budget (LoRA rank-1 units)")
        axis.set_title(METRICS[key][0])
    axes[0][0].legend()
    figure.suptitle("Metrics vs budget" + (" [SMOKE TEST]" if smoke_test else ""))
    figure.tight_layout()
    _save_figure(figure, path)
    plt.close(figure)
    return True


@cli_entry
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", type=Path, metavar="RUN_OR_METRICS",
                        help="metrics.json files, or folders searched recursively for them")
    parser.add_argument("--out", type=Path, required=True, help="folder for report.md/.csv/.tex and the plots")
    args = parser.parse_args(argv)
    runs = [load_scored_run(path) for path in find_metrics_files(args.inputs)]
    check_same_settings(runs)
    groups = group_runs(runs)
    smoke_test = any(r.smoke_test for r in runs)

    plots = ["tradeoff.png"]
    plot_tradeoff(groups, args.out / "tradeoff.png", smoke_test)
    if plot_metrics_vs_budget(groups, args.out / "metrics_vs_budget.png", smoke_test):
        plots.append("metrics_vs_budget.png")
    else:
        print("no run has a budget: metrics_vs_budget.png not drawn")
    markdown = report_markdown(groups, runs, smoke_test, plots)
    write_text_atomic(args.out / "report.md", markdown)
    write_text_atomic(args.out / "report.csv", report_csv(groups, smoke_test))
    write_text_atomic(args.out / "report.tex", report_latex(groups, runs, smoke_test))
    print(markdown)
    print(f"wrote {args.out}/report.md, report.csv, report.tex, plots")


if __name__ == "__main__":
    main()
