"""The report as one static page, index.html: no server, no CDN, no script; everything it shows lies in its folder.

Sections: SMOKE TEST banner (when a smoke-test encoder scored any run), settings, tables (method comparison at the
comparison budget, budget sweep, scaling, all groups, cost per run), plots, qualitative grid. Every number cell
carries its exact value in data-* attributes (data-key, data-mean, data-se), the numbers report.csv holds.
"""
import html
import math

from eval.tables import (
    COSTS,
    METRICS,
    SMOKE_TEST_BANNER,
    format_budget,
    format_cost,
    format_mean_se,
    is_missing,
)

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1400px; }
.banner { background: #ffe08a; border: 2px solid #c90; padding: 0.7em 1em; font-weight: bold; margin: 1em 0; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
thead th { background: #f0f0f0; }
img.plot { max-width: 100%; border: 1px solid #ddd; margin: 0.5em 0; }
table.grid td { text-align: center; vertical-align: top; }
table.grid img { width: 160px; height: auto; display: block; }
.prompt { font-size: 0.8em; color: #555; max-width: 14em; }
"""


def _e(text) -> str:
    return html.escape(str(text))


def _number(value) -> str:
    return "" if is_missing(value) else repr(float(value))


def metrics_table(groups, caption: str, table_id: str, scaling: bool = False) -> str:
    header = ["method", "budget"] + (["scaling"] if scaling else []) + ["trainable params", "subjects"]
    header += [label for label, _ in METRICS.values()]
    lines = [f'<table id="{table_id}"><caption>{_e(caption)}</caption><thead><tr>'
             + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr></thead><tbody>"]
    for g in groups:
        cells = [f"<td>{_e(g.method)}</td>", f'<td data-budget="{_number(g.budget)}">{format_budget(g.budget)}</td>']
        if scaling:
            cells.append(f"<td>{'-' if g.scaling is None else f'{g.scaling:g}'}</td>")
        cells += [f"<td>{_e(g.trainable_parameters())}</td>", f"<td>{g.subjects}</td>"]
        for key in METRICS:
            mean, se = g.mean_se(key)
            cells.append(f'<td data-key="{key}" data-mean="{_number(mean)}" data-se="{_number(se)}">'
                         f"{_e(format_mean_se(key, mean, se))}</td>")
        lines.append(f'<tr data-method="{_e(g.method)}">' + "".join(cells) + "</tr>")
    return "\n".join(lines) + "</tbody></table>"


def cost_table(groups) -> str:
    keys = [key for key in COSTS if any(g.run_mean(key) is not None for g in groups)]
    if not keys:
        return "<p>No run recorded its cost (train time, peak memory, adapter size, images per second).</p>"
    lines = ['<table id="costs"><caption>Cost per run (mean over the runs that recorded it)</caption><thead><tr>'
             "<th>method</th><th>budget</th>" + "".join(f"<th>{_e(COSTS[k][0])}</th>" for k in keys)
             + "</tr></thead><tbody>"]
    for g in groups:
        cells = "".join(f'<td data-key="{k}" data-mean="{_number(g.run_mean(k))}">{_e(format_cost(k, g.run_mean(k)))}'
                        "</td>" for k in keys)
        lines.append(f'<tr data-method="{_e(g.method)}"><td>{_e(g.method)}</td><td>{format_budget(g.budget)}</td>'
                     f"{cells}</tr>")
    return "\n".join(lines) + "</tbody></table>"


def grid_table(rows, labels: list[str], seed) -> str:
    if not rows:
        return "<p>No images to show (the scored image folders are not where metrics.json says).</p>"
    lines = [f'<table class="grid" id="qualitative"><caption>Seed {_e(seed)}; click an image for full size'
             "</caption><thead><tr><th>subject, prompt</th>" + "".join(f"<th>{_e(label)}</th>" for label in labels)
             + "</tr></thead><tbody>"]
    for row in rows:
        cells = "".join("<td>n/a</td>" if cell is None else
                        f'<td><a href="{_e(cell.full)}"><img src="{_e(cell.thumb)}" alt="{_e(label)}, '
                        f'{_e(row.subject)}"></a></td>' for cell, label in zip(row.cells, labels))
        lines.append(f'<tr><td>{_e(row.subject)}<div class="prompt">{_e(row.prompt)}</div></td>{cells}</tr>')
    return "\n".join(lines) + "</tbody></table>"


def tables_section(groups, comparison_budget) -> str:
    """The method comparison at the comparison budget, the budget sweep, the scaling sweep, then every group."""
    parts = []
    at_budget = [g for g in groups if g.budget == comparison_budget]
    if comparison_budget is not None and at_budget:
        parts.append(metrics_table(at_budget, f"Method comparison at budget {comparison_budget:g}", "comparison"))
    swept = {g.method for g in groups if sum(h.method == g.method and h.budget is not None for h in groups) > 1}
    if swept:
        parts.append(metrics_table([g for g in groups if g.method in swept], "Budget sweep", "budget-sweep"))
    scaled = [g for g in groups if g.scaling is not None]
    if len({g.scaling for g in scaled}) > 1:
        parts.append(metrics_table(sorted(scaled, key=lambda g: (g.budget or 0.0, g.scaling)), "Scaling lambda",
                                   "scaling", scaling=True))
    parts.append(metrics_table(groups, "Every method and budget", "all"))
    return "\n".join(parts)


def render_page(groups, runs, smoke_test: bool, plots: list[tuple[str, str]], grid, comparison_budget,
                mixed: list[str]) -> str:
    """index.html's text. `plots`: (file, title); `grid`: (rows, column labels, seed) from eval.qualitative."""
    rows, labels, seed = grid
    banner = f'<div class="banner">{_e(SMOKE_TEST_BANNER)}</div>' if smoke_test else ""
    mixed_note = ("<div class=\"banner\">Mixed settings (--allow-mixed):<ul>"
                  + "".join(f"<li>{_e(m)}</li>" for m in mixed) + "</ul></div>") if mixed else ""
    settings = "".join(f"<li><b>{_e(k)}</b>: {_e(v)}</li>" for k, v in runs[0].settings.items())
    figures = "".join(f'<h3>{_e(title)}</h3><img class="plot" src="{_e(file)}" alt="{_e(title)}">'
                      for file, title in plots)
    subjects = len({s for r in runs for s in r.per_subject})
    budget = "" if comparison_budget is None or math.isnan(comparison_budget) else f"{comparison_budget:g}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>WaveFT evaluation report</title>
<style>{STYLE}</style></head><body>
<h1>WaveFT evaluation report</h1>
{banner}{mixed_note}
<p>{len(runs)} scored runs, {subjects} subjects, {len(groups)} method and budget groups; mean ± standard error over
subjects. Files: <a href="report.csv">report.csv</a>, <a href="report.md">report.md</a>,
<a href="report.tex">report.tex</a>, <a href="qualitative.png">qualitative.png</a>.</p>
<h2>Settings</h2><ul>{settings}</ul>
<h2>Tables</h2>
{tables_section(groups, comparison_budget)}
<h2>Cost</h2>
{cost_table(groups)}
<h2>Plots</h2>
{figures}
<h2 id="grid">Qualitative grid{f" (budget {budget})" if budget else ""}</h2>
{grid_table(rows, labels, seed)}
</body></html>
"""
