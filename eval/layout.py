"""The evaluation folders' file names, in one place: what eval.generate_benchmark writes, eval.score reads and
writes, and eval.report reads. (A run folder's names are `waveft.io.run_folder.RunFolder`'s, an adapter folder's
`waveft.io.adapter_folder.AdapterFolder`'s; a sweep's per-run folders are `eval.sweep.runs.Run`'s.)

    <benchmark images>/            one per run (eval.generate_benchmark --out DIR/<run folder name>)
        manifest.jsonl             one row per image (waveft.infer.generation's manifest)
        manifest.part<rank>.jsonl  one per process while generating, merged into manifest.jsonl
        run_info.json              the run's RunInfo, with the adapter's scaling and weights size
        generation.json            images per second (generation.part<rank>.json while generating)
        drift/                     the drift prompts' images with the adapter; base.json names the base model's
    <base-model drift>/settings.json   what that folder's images depend on; `lock` while they are made
    <metrics>/metrics.json, metrics.csv, metrics.md   eval.score's result
    <report>/report.md, report.csv, report.tex, index.html   eval.report's tables and page
"""
from pathlib import Path

from waveft.infer.generation import MANIFEST_NAME
from waveft.io.run_folder import RunFolder

# ---- benchmark images (eval.generate_benchmark -> eval.score) ----------------------------------------------
MANIFEST = MANIFEST_NAME
PART_MANIFEST = "manifest.part{rank}.jsonl"  # one per process, merged into MANIFEST by the main process
RUN_INFO = RunFolder.RUN_INFO  # the run's record, copied beside its images (RunInfo, plus adapter facts)
GENERATION_TIMING = "generation.json"
TIMING_PART = "generation.part{rank}.json"
DRIFT_DIR = "drift"  # under each run's image folder
DRIFT_BASE = "base.json"  # in DRIFT_DIR: {"dir": the base-model drift folder, relative to DRIFT_DIR}
BASE_DRIFT_SETTINGS = "settings.json"  # in a base-model drift folder: what its images depend on
LOCK = "lock"  # held while a base-model drift folder's images are made

# ---- scores (eval.score -> eval.report) ----------------------------------------------------------------------
METRICS_JSON = "metrics.json"
METRICS_CSV = "metrics.csv"
METRICS_MD = "metrics.md"

# ---- the report (eval.report) ----------------------------------------------------------------------------------
REPORT_MD = "report.md"
REPORT_CSV = "report.csv"
REPORT_TEX = "report.tex"
REPORT_PAGE = "index.html"


def metrics_file(folder: str | Path) -> Path:
    return Path(folder) / METRICS_JSON
