"""Generate the DreamBooth benchmark images for trained runs: every prompt of the subject's list x seeds.

    python -m eval.generate_benchmark --runs RUN_DIR... --benchmark DATASET_DIR --out DIR [settings]
    accelerate launch -m eval.generate_benchmark ...      (several GPUs: the pending images are split between them)

A run folder is what the trainer writes: config.yaml (model.pretrained, model.vae), run_info.json (subject,
class_noun, identifier, method, budget, ...) and adapter/ (PEFT files). The adapter is merged into the base
model through `waveft.generate`. Each run's images go to DIR/<run folder name>/ with manifest.jsonl (one row
per image: file, subject, prompt, prompt_index, seed, the settings, ...) and a copy of run_info.json, ready
for `python -m eval.score --images DIR/<run>`.

Defaults are the paper's: seeds 42-45, DPM-Solver++ (2M) 30 steps, guidance 7.5, its negative prompt,
1024 px, bf16. Resumable: images already listed in the manifest and present on disk are kept and skipped;
re-running with other generation settings into the same folder is refused rather than mixed.
"""
import argparse
import dataclasses
import json
from itertools import groupby
from pathlib import Path

import yaml

from eval.files import MANIFEST, read_json
from eval.protocol import fill_prompt, load_benchmark
from waveft.errors import UserError, cli_entry
from waveft.files import write_text_atomic

# The negative prompt as the paper's protocol gives it; the source quotes it ending in "...", so this is the
# part that is known.
PAPER_NEGATIVE_PROMPT = "low quality, bad anatomy, worst quality, low res, blurry"
PAPER_SEEDS = (42, 43, 44, 45)
RUN_INFO = "run_info.json"
PART_MANIFEST = "manifest.part{rank}.jsonl"  # one per process, merged into manifest.jsonl by the main process


@dataclasses.dataclass(frozen=True)
class TrainedRun:
    run_dir: Path
    base_model: str
    vae: str | None
    info: dict  # run_info.json

    @property
    def name(self) -> str:
        return self.run_dir.name


def read_run(run_dir: str | Path) -> TrainedRun:
    run_dir = Path(run_dir)
    for needed in ("config.yaml", RUN_INFO, "adapter/adapter_config.json"):
        if not (run_dir / needed).is_file():
            raise UserError(f"{run_dir} is not a finished training run: {needed} is missing")
    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise UserError(f"cannot read {run_dir / 'config.yaml'}: {str(exc).splitlines()[0]}") from None
    model = config.get("model") or {}
    if not model.get("pretrained"):
        raise UserError(f"{run_dir / 'config.yaml'}: key 'model.pretrained' is missing")
    info = read_json(run_dir / RUN_INFO)
    missing = [key for key in ("subject", "class_noun", "identifier", "method") if key not in info]
    if missing:
        raise UserError(f"{run_dir / RUN_INFO}: missing keys {', '.join(missing)}")
    return TrainedRun(run_dir, model["pretrained"], model.get("vae"), info)


def benchmark_jobs(run: TrainedRun, benchmark, seeds) -> list[dict]:
    """The subject's prompt list (object or live) with the run's identifier and class noun, x seeds."""
    from waveft.generate import prompt_seed_jobs

    subject = benchmark.subject(run.info["subject"])
    prompts = [fill_prompt(t, run.info["identifier"], run.info["class_noun"])
               for t in benchmark.prompt_templates(subject)]
    return prompt_seed_jobs(prompts, list(seeds), subject=subject.name, class_noun=run.info["class_noun"],
                            identifier=run.info["identifier"], run=run.name)


def _image_settings(settings) -> dict:
    """The settings that change the pictures (batching does not: every image has its own generator)."""
    return {k: v for k, v in dataclasses.asdict(settings).items() if k != "batch_size"}


def existing_rows(folder: Path, settings) -> dict[str, dict]:
    """Manifest rows already in `folder` (manifest.jsonl and per-process parts left by an interrupted run), by
    file; read only. Refuses a folder whose images were made with other settings."""
    from waveft.generate import read_manifest

    rows = {}
    for path in [folder / MANIFEST] + sorted(folder.glob(PART_MANIFEST.format(rank="*"))):
        rows.update(read_manifest(str(path)))
    wanted = _image_settings(settings)
    for row in rows.values():
        differing = [(k, row.get(k), v) for k, v in wanted.items() if row.get(k) != v]
        if differing:
            key, found, asked = differing[0]
            raise UserError(f"{folder} holds images made with other settings ({key}: {found!r}, asked {asked!r}); "
                            "choose another --out or delete that folder")
    return rows


def merge_manifests(folder: Path) -> None:
    """Fold the per-process manifests into manifest.jsonl, sorted by file, and remove them."""
    from waveft.generate import read_manifest, write_manifest

    parts = sorted(folder.glob(PART_MANIFEST.format(rank="*")))
    rows = read_manifest(str(folder / MANIFEST))
    for part in parts:
        rows.update(read_manifest(str(part)))
    write_manifest(str(folder / MANIFEST), dict(sorted(rows.items())))
    for part in parts:
        part.unlink()


def pending_jobs(runs: list[TrainedRun], jobs_by_run: dict, out: Path, settings) -> list[tuple[str, dict]]:
    """(run name, job) for every image not yet listed and present, in a fixed order (all processes agree)."""
    pending = []
    for run in runs:
        folder = out / run.name
        rows = existing_rows(folder, settings) if folder.is_dir() else {}
        pending += [(run.name, job) for job in jobs_by_run[run.name]
                    if not (job["file"] in rows and (folder / job["file"]).is_file())]
    return pending


def parse_args(argv=None):
    from waveft.generate import SCHEDULERS, GenerationSettings

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", type=Path, required=True, help="trained run folders")
    parser.add_argument("--benchmark", type=Path, required=True,
                        help="DreamBooth benchmark folder (holding dataset/prompts_and_classes.txt)")
    parser.add_argument("--out", type=Path, required=True, help="output folder; one subfolder per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(PAPER_SEEDS))
    parser.add_argument("--scheduler", choices=sorted(SCHEDULERS), default="dpmpp_2m")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument("--negative-prompt", default=PAPER_NEGATIVE_PROMPT)
    parser.add_argument("--resolution", type=int, default=1024, help="image height and width")
    parser.add_argument("--batch-size", type=int, default=GenerationSettings.batch_size)
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="bf16")
    args = parser.parse_args(argv)
    if args.resolution % 8 or args.resolution <= 0 or args.steps <= 0 or args.batch_size <= 0:
        raise UserError("--resolution must be a positive multiple of 8; --steps and --batch-size must be positive")
    settings = GenerationSettings(scheduler=args.scheduler, steps=args.steps, guidance_scale=args.guidance_scale,
                                  negative_prompt=args.negative_prompt, height=args.resolution, width=args.resolution,
                                  batch_size=args.batch_size, dtype=args.dtype)
    return args, settings


@cli_entry
def main(argv=None) -> None:
    import torch
    from accelerate import PartialState

    from waveft.generate import generate_images, load_pipeline

    args, settings = parse_args(argv)
    benchmark = load_benchmark(args.benchmark)
    runs = [read_run(run_dir) for run_dir in args.runs]
    names = [run.name for run in runs]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise UserError(f"runs share folder names {', '.join(duplicates)}: their outputs would collide in --out; "
                        "give the run folders distinct names")
    jobs_by_run = {run.name: benchmark_jobs(run, benchmark, args.seeds) for run in runs}

    # cpu=True lets several CPU processes (torchrun, tests) split the work too instead of each doing all of it.
    state = PartialState(cpu=not torch.cuda.is_available())
    # Every process reads the same files, so all agree on the list (and all stop alike on bad input) ...
    pending = pending_jobs(runs, jobs_by_run, args.out, settings)
    # ... and none writes before all have read.
    state.wait_for_everyone()
    if state.is_main_process:
        for run in runs:
            write_text_atomic(args.out / run.name / RUN_INFO, json.dumps(run.info, indent=2) + "\n")
        total = sum(len(jobs) for jobs in jobs_by_run.values())
        print(f"{total} benchmark images for {len(runs)} run(s): {total - len(pending)} done, {len(pending)} to "
              f"generate on {state.num_processes} process(es)")
    runs_by_name = {run.name: run for run in runs}
    with state.split_between_processes(pending) as mine:
        for name, items in groupby(mine, key=lambda item: item[0]):
            run = runs_by_name[name]
            pipe = load_pipeline(run.base_model, str(run.run_dir / "adapter"), run.vae, settings.dtype,
                                 str(state.device), settings.scheduler)
            generate_images(pipe, [job for _, job in items], str(args.out / name), settings,
                            progress=state.is_local_main_process,
                            manifest_name=PART_MANIFEST.format(rank=state.process_index))
            del pipe
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    state.wait_for_everyone()
    if state.is_main_process:
        for run in runs:
            merge_manifests(args.out / run.name)
        print(f"wrote the benchmark images and {MANIFEST} of {len(runs)} run(s) under {args.out}")


if __name__ == "__main__":
    main()
