"""Metric names, number formatting and table rendering (Markdown, CSV, LaTeX) shared by score and report."""
import csv
import io
import json
import math

# key in metrics.json -> column label, decimals; the order is the tables' column order.
METRICS = {
    "dino": ("DINO", 3),
    "clip_i": ("CLIP-I", 3),
    "clip_t": ("CLIP-T", 2),
    "lpips_div": ("LPIPS-div", 3),
    "dino_div": ("DINO-div", 3),
    "cmmd": ("CMMD", 3),
    "drift": ("Drift", 4),  # 1: the adapter leaves prompts without the subject untouched; differences are small
}
# What a run cost, where it was recorded: run_info.json key (images_per_second: generation.json's) ->
# label, factor from the recorded unit, shown unit.
COSTS = {
    "train_seconds": ("train time", 1 / 60, "min"),
    "peak_memory_bytes": ("peak memory", 1 / 2**30, "GiB"),
    "adapter_bytes": ("adapter size", 1 / 2**20, "MiB"),
    "images_per_second": ("benchmark generation", 1.0, "images/s"),
}
SMOKE_TEST_BANNER = ("SMOKE TEST: tiny random-weight encoders (eval.tiny_encoders); "
                     "these numbers check that the evaluation runs, not image quality")


def is_missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def format_metric(key: str, value) -> str:
    return "n/a" if is_missing(value) else f"{value:.{METRICS[key][1]}f}"


def format_budget(budget: float | None) -> str:
    return "-" if budget is None else f"{budget:g}"


def format_cost(key: str, value) -> str:
    return "-" if is_missing(value) else f"{value * COSTS[key][1]:.3g} {COSTS[key][2]}"


def format_mean_se(key: str, mean, se) -> str:
    if is_missing(mean):
        return "n/a"
    return format_metric(key, mean) + ("" if is_missing(se) else f" ± {format_metric(key, se)}")


def json_text(obj) -> str:
    """JSON with NaN written as null (JSON has no NaN)."""

    def clean(value):
        if isinstance(value, float) and math.isnan(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    return json.dumps(clean(obj), indent=2, allow_nan=False) + "\n"


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell).replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def csv_text(header: list[str], rows: list[list]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([["" if is_missing(cell) else cell for cell in row] for row in rows])
    return buffer.getvalue()


_LATEX_SPECIALS = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                   "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "±": r"$\pm$"}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIALS.get(char, char) for char in text)


def latex_table(header: list[str], rows: list[list], caption: str) -> str:
    """A booktabs tabular inside a table float; `caption` is plain text."""
    lines = [r"\begin{table}[t]", r"\centering", r"\begin{tabular}{l" + "r" * (len(header) - 1) + "}", r"\toprule",
             " & ".join(latex_escape(h) for h in header) + r" \\", r"\midrule"]
    lines += [" & ".join(latex_escape(str(cell)) for cell in row) + r" \\" for row in rows]
    lines += [r"\bottomrule", r"\end{tabular}", r"\caption{" + latex_escape(caption) + "}", r"\end{table}"]
    return "\n".join(lines) + "\n"
