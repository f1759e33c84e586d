"""The report's plots, each a PNG: fidelity trade-off, metrics vs budget, metrics vs scaling lambda, cost per run.

Each takes the report's groups (one per method and budget) and writes nothing when it has nothing to show.
"""
import math
from pathlib import Path

import numpy as np

from eval.tables import COSTS, METRICS, format_budget
from waveft.io.files import write_atomic


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt



def save_figure(figure, path: Path) -> None:
    """A matplotlib figure as a PNG, written atomically."""
    write_atomic(path, lambda f: figure.savefig(f, format="png", dpi=150, bbox_inches="tight"))


def plot_tradeoff(groups, path: Path, smoke_test: bool) -> None:
    """DINO (subject fidelity) against CLIP-T (prompt fidelity), one line per method through its budgets."""
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(6, 4.5))
    for method in sorted({g.method for g in groups}):
        points = [(g, g.mean_se("clip_t"), g.mean_se("dino")) for g in groups if g.method == method]
        xs, xerr = [p[1][0] for p in points], [p[1][1] for p in points]
        ys, yerr = [p[2][0] for p in points], [p[2][1] for p in points]
        axes.errorbar(xs, ys, xerr=np.nan_to_num(xerr), yerr=np.nan_to_num(yerr), marker="o", capsize=3,
                      label=method)
        for (g, _, _), x, y in zip(points, xs, ys):
            if g.budget is not None:
                axes.annotate(format_budget(g.budget), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    axes.set_xlabel("CLIP-T (prompt fidelity)")
    axes.set_ylabel("DINO (subject fidelity)")
    axes.set_title("Fidelity trade-off" + (" [SMOKE TEST]" if smoke_test else ""))
    axes.legend()
    save_figure(figure, path)
    plt.close(figure)


def plot_metrics_vs_budget(groups, path: Path, smoke_test: bool) -> bool:
    """One panel per metric, one line per method; returns False (and writes nothing) when no run has a budget."""
    budgeted = [g for g in groups if g.budget is not None]
    lines = {method: [g for g in budgeted if g.method == method] for method in sorted({g.method for g in budgeted})}
    return _metric_panels(lines, lambda g: g.budget, "budget (LoRA rank-1 units)", "Metrics vs budget", path,
                          smoke_test)


def plot_metrics_vs_scaling(groups, path: Path, smoke_test: bool) -> bool:
    """One panel per metric against the adapter's scaling lambda, one line per adapter type and budget; drawn
    (True) only where some line has two scalings or more."""
    by_key: dict[tuple, list] = {}
    for g in groups:
        if g.scaling is not None:
            by_key.setdefault((g.runs[0].run.adapter_type if g.runs[0].run else g.method, g.budget), []).append(g)
    lines = {f"{adapter}, budget {format_budget(budget)}": sorted(line, key=lambda g: g.scaling)
             for (adapter, budget), line in sorted(by_key.items(), key=lambda item: str(item[0]))
             if len({g.scaling for g in line}) > 1}
    return _metric_panels(lines, lambda g: g.scaling, "scaling lambda", "Metrics vs scaling lambda", path, smoke_test)


def _plotted_metrics(groups) -> list[str]:
    return [key for key in METRICS if any(not math.isnan(g.mean_se(key)[0]) for g in groups)]


def _metric_panels(lines: dict[str, list], x_of, x_label: str, title: str, path: Path, smoke_test: bool) -> bool:
    """One panel per metric that some group has, one errorbar line per `lines` entry (label -> groups in x
    order); returns False (and writes nothing) when there is no line or no metric."""
    keys = _plotted_metrics([g for line in lines.values() for g in line])
    if not lines or not keys:
        return False
    plt = pyplot()
    figure, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.4), squeeze=False)
    for axis, key in zip(axes[0], keys):
        for label, line in lines.items():
            stats = [g.mean_se(key) for g in line]
            axis.errorbar([x_of(g) for g in line], [s[0] for s in stats], yerr=np.nan_to_num([s[1] for s in stats]),
                          marker="o", capsize=3, label=label)
        axis.set_xlabel(x_label)
        axis.set_title(METRICS[key][0])
    axes[0][0].legend()
    figure.suptitle(title + (" [SMOKE TEST]" if smoke_test else ""))
    figure.tight_layout()
    save_figure(figure, path)
    plt.close(figure)
    return True


def plot_costs(groups, path: Path, smoke_test: bool) -> bool:
    """One bar panel per recorded cost (train time, peak memory, adapter size, images/s), one bar per group."""
    keys = [key for key in COSTS if any(g.run_mean(key) is not None for g in groups)]
    if not keys:
        return False
    plt = pyplot()
    labels = [f"{g.method}\n{format_budget(g.budget)}" for g in groups]
    figure, axes = plt.subplots(1, len(keys), figsize=(max(3.6, 0.5 * len(groups) + 1.5) * len(keys), 3.6),
                                squeeze=False)
    for axis, key in zip(axes[0], keys):
        label, factor, unit = COSTS[key]
        values = [g.run_mean(key) for g in groups]
        axis.bar(range(len(groups)), [np.nan if v is None else v * factor for v in values], color="tab:blue")
        axis.set_xticks(range(len(groups)), labels, rotation=45, ha="right", fontsize=7)
        axis.set_title(f"{label} ({unit})")
    figure.suptitle("Cost per run" + (" [SMOKE TEST]" if smoke_test else ""))
    figure.tight_layout()
    save_figure(figure, path)
    plt.close(figure)
    return True
