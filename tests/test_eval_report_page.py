"""The tiny sweep's report page, opened in a real headless Chromium: drift in every table, the qualitative grid,
the scaling-lambda plot, every image loaded, the numbers of report.csv, a screenshot."""
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from eval.tables import METRICS, format_mean_se
from tests.helpers import REPO

pytestmark = pytest.mark.slow  # a whole tiny sweep in subprocesses, then a browser
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# As root in a container: no sandbox, no GPU, nothing fetched from the network.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# Two WaveFT runs that differ only in their scaling lambda: the smallest sweep with a lambda plot.
METHODS = ("methods=[{name: waveft, adapter: waveft}, "
           "{name: waveft-scaling-5, adapter: waveft, overrides: {adapter.peft.scaling: 5.0}}]")


def run(*args, timeout=900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1"})


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, tiny_sdxl_dir) -> Path:
    out = tmp_path_factory.mktemp("report_page")
    result = run("scripts/sweep.py", "--sweep", "configs/sweeps/tiny.yaml", f"output_dir={out / 'sweep'}",
                 f"benchmark.dir={out / 'bench'}", "subjects=[toy_dog]", METHODS,
                 f"scoring.tiny_encoders={out / 'encoders'}", f"scoring.cache_dir={out / 'cache'}",
                 f"overrides.model.pretrained={tiny_sdxl_dir}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out / "sweep"


def render(page_path: Path, screenshot: Path, profile: Path) -> dict:
    """Open the page in Chromium (Playwright driving Debian's binary) and read back what it shows."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (requirements.txt)")
    if not os.path.isfile(CHROMIUM):
        pytest.skip("no chromium binary (apt-get install -y chromium; .ci/run installs it)")
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(str(profile), executable_path=CHROMIUM, headless=True,
                                                                args=CHROMIUM_FLAGS, viewport={"width": 1400,
                                                                                               "height": 900})
        page = context.new_page()
        failed = []
        page.on("requestfailed", lambda request: failed.append(request.url))
        page.goto(page_path.resolve().as_uri(), wait_until="load")
        images = page.evaluate("""() => [...document.images].map(i => ({src: i.getAttribute('src'),
                                    complete: i.complete, width: i.naturalWidth, height: i.naturalHeight}))""")
        cells = page.evaluate("""() => [...document.querySelectorAll('table#all tbody tr')].map(tr => ({
                                    method: tr.dataset.method,
                                    budget: tr.querySelector('[data-budget]').dataset.budget,
                                    metrics: Object.fromEntries([...tr.querySelectorAll('[data-key]')].map(td =>
                                        [td.dataset.key, {mean: td.dataset.mean, se: td.dataset.se,
                                                          text: td.innerText}]))}))""")
        text = page.inner_text("body")
        links = page.evaluate("() => [...document.querySelectorAll('table.grid a')].map(a => a.getAttribute('href'))")
        page.screenshot(path=str(screenshot), full_page=True)
        context.close()
    return {"images": images, "rows": cells, "text": text, "grid_links": links, "failed": failed}


def test_tiny_sweep_report_page_in_chromium(sweep, tmp_path):
    report = sweep / "report"
    page = report / "index.html"
    assert page.is_file()
    assert "http://" not in page.read_text() and "https://" not in page.read_text()  # no CDN, no server
    assert (report / "metrics_vs_scaling.png").is_file() and (report / "qualitative.png").is_file()

    shown = render(page, report / "screenshot.png", tmp_path / "chromium-profile")

    assert shown["failed"] == []
    assert len(shown["images"]) >= 4 + 2  # tradeoff, budget, scaling, cost plots; a grid thumbnail per run
    for image in shown["images"]:
        assert image["complete"] and image["width"] > 0 and image["height"] > 0, image
        assert (report / image["src"]).resolve().is_relative_to(report.resolve())  # all under the report folder
    sources = {image["src"] for image in shown["images"]}
    assert {"metrics_vs_scaling.png", "cost.png", "tradeoff.png"} <= sources
    assert len(shown["grid_links"]) == 2 and all((report / link).is_file() for link in shown["grid_links"])
    assert "SMOKE TEST" in shown["text"] and "Qualitative grid" in shown["text"]
    assert (report / "screenshot.png").stat().st_size > 10_000

    with open(report / "report.csv") as f:
        expected = list(csv.DictReader(f))
    assert len(expected) == len(shown["rows"]) == 2
    for row, cells in zip(expected, shown["rows"]):
        assert cells["method"] == row["method"] and float(cells["budget"]) == float(row["budget"])
        for key in METRICS:
            mean, se = row[f"{key}_mean"], row[f"{key}_se"]
            assert (float(cells["metrics"][key]["mean"]) if cells["metrics"][key]["mean"] else None) == (
                float(mean) if mean else None)
            assert cells["metrics"][key]["text"] == format_mean_se(key, float(mean) if mean else None,
                                                                   float(se) if se else None)
    # Drift is a column of every table, and measured: the adapters were trained, the base images shared.
    assert all(row["drift_mean"] for row in expected)
    assert "Drift" in (report / "report.md").read_text() and "Drift" in shown["text"]
    assert len(list((sweep / "drift-base").glob("*/*.png"))) == 10  # one seed x the default ten drift prompts
    assert {float(row["scaling"]) for row in expected} == {5.0, 25.0}


def test_report_bad_inputs_and_allow_mixed(sweep, tmp_path):
    empty = tmp_path / "nothing"
    empty.mkdir()
    result = run("-m", "eval.report", empty, "--out", tmp_path / "r")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: no metrics.json under {empty} (score images with: python -m eval.score)")

    (first, second) = sorted(sweep.glob("runs/*/budget-*/*/seed-*/metrics/metrics.json"))
    other = json.loads(second.read_text())
    other["settings"]["dino"] = "dino (dinov2) facebook/dinov2-base"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "metrics.json").write_text(json.dumps(other))
    result = run("-m", "eval.report", first, tmp_path / "other", "--out", tmp_path / "r")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "facebook/dinov2-base" in last and str(first) in last and "--allow-mixed" in last
    result = run("-m", "eval.report", first, tmp_path / "other", "--out", tmp_path / "r", "--allow-mixed")
    assert result.returncode == 0, result.stderr
    assert "Mixed settings" in (tmp_path / "r" / "index.html").read_text() and "warning:" in result.stdout
