"""Cost per run, as PEFT's method comparison reports it: train seconds, peak accelerator memory (peak RSS on
CPU), adapter size on disk and images per second of benchmark generation, averaged per (method, budget).

The trainer records the first two in run_info.json and eval.generate_benchmark the last in its images
folder; a value a run did not record (runs made before it was recorded) shows as n/a.
"""
import json
import math
from pathlib import Path

from eval.sweep.runs import Run
from eval.tables import csv_text, markdown_table
from waveft.files import write_text_atomic
from waveft.run_folder import RunFolder

COLUMNS = ("method", "budget", "runs", "train s", "peak memory GiB", "adapter MiB", "images/s")
GENERATION_RECORD = "generation.json"  # eval.generate_benchmark's throughput, beside manifest.jsonl


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def run_cost(run: Run) -> dict:
    """One finished run's cost: {"train_seconds", "peak_memory_bytes", "adapter_bytes", "images_per_second"}
    (None where not recorded), as the trainer (run_info.json) and benchmark generation (generation.json) wrote."""
    info = _read(Path(RunFolder(run.train_dir).run_info))
    generation = _read(run.images_dir / GENERATION_RECORD)
    return {
        "train_seconds": info.get("train_seconds"),
        "peak_memory_bytes": info.get("peak_memory_bytes"),
        "adapter_bytes": info.get("adapter_bytes"),
        "images_per_second": generation.get("images_per_second"),
    }


def _mean(values: list, scale: float = 1.0) -> float:
    known = [v / scale for v in values if isinstance(v, (int, float))]
    return sum(known) / len(known) if known else math.nan


def cost_rows(runs: list[Run]) -> list[list]:
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault((run.method.name, run.budget), []).append(run_cost(run))
    rows = []
    for (method, budget), costs in groups.items():
        values = {key: [cost[key] for cost in costs] for key in costs[0]}
        rows.append([method, f"{budget:g}", len(costs), _mean(values["train_seconds"]),
                     _mean(values["peak_memory_bytes"], 2 ** 30), _mean(values["adapter_bytes"], 2 ** 20),
                     _mean(values["images_per_second"])])
    return rows


def write_cost_table(runs: list[Run], out: Path) -> str:
    """Write cost.md and cost.csv to `out`; returns the Markdown table."""
    rows = cost_rows(runs)
    shown = [[*row[:3], *("n/a" if math.isnan(v) else f"{v:.{d}f}" for v, d in zip(row[3:], (1, 2, 2, 2)))]
             for row in rows]
    table = markdown_table(list(COLUMNS), shown)
    write_text_atomic(out / "cost.md", "Cost per run (mean over the runs of each method and budget)\n\n" + table)
    write_text_atomic(out / "cost.csv", csv_text(list(COLUMNS), rows))
    return table
