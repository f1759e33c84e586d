"""Generate the DreamBooth benchmark images for trained runs: every prompt of the subject's list x seeds,
and the drift images: everyday prompts that name no subject, by the adapted model and by the base model.

    python -m eval.generate_benchmark --runs RUN_DIR... --benchmark DATASET_DIR --out DIR [settings]
    accelerate launch -m eval.generate_benchmark ...      (several GPUs: the pending images are split between them)

A run folder is what the trainer writes: config.yaml (model.pretrained, model.vae), run_info.json (subject,
class_noun, identifier, method, budget, ...) and adapter/ (PEFT files). The adapter is merged into the base
model through `waveft.generate`. Each run's images go to DIR/<run folder name>/ with manifest.jsonl (one row
per image: file, subject, prompt, prompt_index, seed, the settings, ...), a copy of run_info.json (with the
adapter's scaling and file size added), generation.json (images per second) and drift/ (the drift prompts x
seeds with the adapter; drift/base.json names the base-model folder to compare with), ready for
`python -m eval.score --images DIR/<run>`.

The base model's drift images (adapters disabled) go to --drift-base-dir/<key>/, one folder per base model,
VAE, settings and prompt list, made once and reused by every run and every later call (a lock keeps two
concurrent calls from making them twice).

Defaults are the paper's: seeds 42-45, DPM-Solver++ (2M) 30 steps, guidance 7.5, its negative prompt,
1024 px, bf16. Resumable: images already listed in the manifest and present on disk are kept and skipped;
re-running with other generation settings into the same folder is refused rather than mixed.
"""
import argparse
import dataclasses
import fcntl
import hashlib
import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path

import yaml

from eval.files import read_json
from eval.layout import (
    BASE_DRIFT_SETTINGS,
    DRIFT_BASE,
    DRIFT_DIR,
    GENERATION_TIMING,
    LOCK,
    MANIFEST,
    PART_MANIFEST,
    RUN_INFO,
    TIMING_PART,
)
from eval.protocol import fill_prompt, load_benchmark
from waveft.entry import set_up_process
from waveft.errors import UserError, cli_entry
from waveft.infer.generation import GenerationJob, ManifestRow, is_done
from waveft.infer.settings import GenerationDtype, GenerationSettings, Quantization, SamplerSettings
from waveft.io.adapter_folder import AdapterFolder
from waveft.io.cli_settings import cli
from waveft.io.files import check_can_write, write_json_atomic
from waveft.io.run_folder import RunFolder, RunInfo

# The negative prompt as the paper's protocol gives it; the source quotes it ending in "...", so this is the
# part that is known.
PAPER_NEGATIVE_PROMPT = "low quality, bad anatomy, worst quality, low res, blurry"
PAPER_SEEDS = (42, 43, 44, 45)
# Everyday scenes that name none of the benchmark's subjects or classes: what an adapter should leave alone.
DEFAULT_DRIFT_PROMPTS = (
    "a busy city street at night with neon signs",
    "a bowl of fresh fruit on a wooden kitchen table",
    "a mountain lake at sunrise with pine trees",
    "a cozy living room with a sofa and a reading lamp",
    "a bicycle leaning against a brick wall",
    "a plate of pasta with tomato sauce and basil",
    "a lighthouse on a rocky coast under a cloudy sky",
    "a cup of coffee next to an open book",
    "a forest path covered in autumn leaves",
    "a sailing boat on a calm sea at sunset",
)


@dataclass
class BenchmarkGenerationSettings(SamplerSettings):
    """eval.generate_benchmark's settings (the sweep's `generation:` section); defaults are the paper's (its
    sampler is SamplerSettings' defaults, with the paper's negative prompt). Square images: `resolution` is
    GenerationSettings' height and width."""

    negative_prompt: str = field(default=PAPER_NEGATIVE_PROMPT, metadata=cli("negative prompt"))
    seeds: list[int] = field(default_factory=lambda: list(PAPER_SEEDS), metadata=cli("one image per prompt and seed"))
    resolution: int = field(default=1024, metadata=cli("image height and width"))
    batch_size: int = field(default=4, metadata=cli("images per call (each image has its own generator)"))
    dtype: GenerationDtype = field(default="bf16", metadata=cli("pipeline dtype"))
    quantize: Quantization = field(default="none", metadata=cli("quantize the UNet's Linear layers (bitsandbytes)"))
    drift: bool = field(default=True, metadata=cli("also generate the drift prompts, adapted and base model"))
    drift_prompts: str | None = field(default=None, metadata=cli(
        "file of drift prompts, one per line (default: DEFAULT_DRIFT_PROMPTS, ten everyday scenes)"))

    def generation(self) -> GenerationSettings:
        return GenerationSettings(**self.sampler(), height=self.resolution, width=self.resolution,
                                  batch_size=self.batch_size, dtype=self.dtype, quantize=self.quantize)

    def problems(self) -> list[tuple[str, str]]:
        found = [("seeds", f"must list distinct seeds, got {self.seeds}")] if (
            not self.seeds or len(set(self.seeds)) != len(self.seeds)) else []
        renamed = {"height": "resolution", "width": "resolution"}
        return found + list(dict.fromkeys((renamed.get(k, k), m) for k, m in self.generation().problems()))

    def drift_prompt_list(self) -> list[str]:
        from waveft.infer.generation import read_prompts_file

        return read_prompts_file(self.drift_prompts) if self.drift_prompts else list(DEFAULT_DRIFT_PROMPTS)


@dataclass(frozen=True)
class TrainedRun:
    run_dir: Path
    base_model: str
    vae: str | None
    info: RunInfo

    @property
    def name(self) -> str:
        return self.run_dir.name


def read_run(run_dir: str | Path) -> TrainedRun:
    run_dir = Path(run_dir)
    folder = RunFolder(run_dir)
    adapter_config = os.path.join(RunFolder.ADAPTER, AdapterFolder.CONFIG)
    for needed in (RunFolder.CONFIG, RunFolder.RUN_INFO, adapter_config):
        if not (run_dir / needed).is_file():
            raise UserError(f"{run_dir} is not a finished training run: {needed} is missing")
    AdapterFolder(folder.adapter).check_weights()  # now, not when its turn to generate comes
    try:
        config = yaml.safe_load(Path(folder.config).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise UserError(f"cannot read {folder.config}: {str(exc).splitlines()[0]}") from None
    model = config.get("model") or {}
    if not model.get("pretrained"):
        raise UserError(f"{folder.config}: key 'model.pretrained' is missing")
    return TrainedRun(run_dir, model["pretrained"], model.get("vae"), RunInfo.read(folder.run_info))


def benchmark_jobs(run: TrainedRun, benchmark, seeds) -> list[GenerationJob]:
    """The subject's prompt list (object or live) with the run's identifier and class noun, x seeds."""
    from waveft.infer.generation import prompt_seed_jobs

    subject = benchmark.subject(run.info.subject)
    prompts = [fill_prompt(t, run.info.identifier, run.info.class_noun) for t in benchmark.prompt_templates(subject)]
    return prompt_seed_jobs(prompts, list(seeds), subject=subject.name, class_noun=run.info.class_noun,
                            identifier=run.info.identifier, run=run.name)


def adapter_facts(adapter_dir: Path) -> dict:
    """What reports show beside a run's scores: the adapter's scaling (lambda, where the method has one) and its
    weights' size in bytes."""
    folder = AdapterFolder(adapter_dir)
    config = read_json(folder.config)
    facts = {}
    if isinstance(config.get("scaling"), (int, float)) and not isinstance(config.get("scaling"), bool):
        facts["scaling"] = config["scaling"]
    if os.path.isfile(folder.weights):
        facts["adapter_bytes"] = folder.weights_bytes()
    return facts


def drift_jobs(prompts: list[str], seeds, **extra) -> list[GenerationJob]:
    from waveft.infer.generation import prompt_seed_jobs

    return prompt_seed_jobs(prompts, list(seeds), drift=True, **extra)


def drift_base_folder(root: Path, run: TrainedRun, settings: BenchmarkGenerationSettings,
                      prompts: list[str]) -> tuple[Path, dict]:
    """The base model's drift folder for this run's base model, VAE, image settings, prompts and seeds."""
    identity = {"base_model": run.base_model, "vae": run.vae, **settings.generation().image_settings(),
                "prompts": prompts, "seeds": list(settings.seeds)}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    name = "".join(c if c.isalnum() or c in "._-" else "_" for c in Path(run.base_model).name) or "base"
    return root / f"{name}-{digest}", identity


@dataclass
class Target:
    """One folder of images made by one pipeline: a run's benchmark or drift images, or base-model drift images."""

    kind: str  # "benchmark", "drift" or "base-model drift"
    folder: Path
    pipeline: str  # the key of the pipeline that makes them
    jobs: list[GenerationJob]
    identity: dict | None = None  # base-model drift: what the folder's images depend on (its settings.json)


def existing_rows(folder: Path, settings: GenerationSettings) -> dict[str, ManifestRow]:
    """Manifest rows already in `folder` (manifest.jsonl and per-process parts left by an interrupted run), by
    file; read only. Refuses a folder whose images were made with other settings."""
    from waveft.infer.generation import read_manifest

    rows = {}
    for path in [folder / MANIFEST] + sorted(folder.glob(PART_MANIFEST.format(rank="*"))):
        rows.update(read_manifest(str(path)))
    wanted = settings.image_settings()
    for row in rows.values():
        differing = [(k, row.settings.get(k), v) for k, v in wanted.items() if row.settings.get(k) != v]
        if differing:
            key, found, asked = differing[0]
            raise UserError(f"{folder} holds images made with other settings ({key}: {found!r}, asked {asked!r}); "
                            "choose another --out or delete that folder")
    return rows


def merge_manifests(folder: Path) -> None:
    """Fold the per-process manifests into manifest.jsonl, sorted by file, and remove them."""
    from waveft.infer.generation import read_manifest, write_manifest

    parts = sorted(folder.glob(PART_MANIFEST.format(rank="*")))
    rows = read_manifest(str(folder / MANIFEST))
    for part in parts:
        rows.update(read_manifest(str(part)))
    write_manifest(str(folder / MANIFEST), dict(sorted(rows.items())))
    for part in parts:
        part.unlink()


def pending_jobs(targets: list[Target], settings: GenerationSettings) -> list[tuple[int, GenerationJob]]:
    """(target index, job) for every image not yet done, in a fixed order (all processes agree)."""
    pending = []
    for index, target in enumerate(targets):
        rows = existing_rows(target.folder, settings) if target.folder.is_dir() else {}
        pending += [(index, job) for job in target.jobs if not is_done(target.folder, rows, job)]
    return pending


@contextmanager
def folder_lock(folder: Path, held_here: bool):
    """An exclusive lock on folder/lock, taken by the main process only: concurrent calls (sweep workers) that
    share a base-model drift folder make its images once; the other processes of this call follow the main one."""
    if not held_here:
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def make_images(state, targets: list[Target], settings: BenchmarkGenerationSettings, pipelines: dict) -> dict:
    """Generate every pending image of `targets`, split between the processes; returns, for this process,
    {folder: (images, seconds)} of the images it made."""
    import torch

    from waveft.infer.generation import generate_images

    # Every process reads the same files, so all agree on the list (and all stop alike on bad input) ...
    pending = pending_jobs(targets, settings.generation())
    # ... and none writes before all have read.
    state.wait_for_everyone()
    if state.is_main_process:
        for kind in dict.fromkeys(t.kind for t in targets):
            total = sum(len(t.jobs) for t in targets if t.kind == kind)
            todo = sum(1 for index, _ in pending if targets[index].kind == kind)
            print(f"{total} {kind} images in {sum(t.kind == kind for t in targets)} folder(s): {total - todo} done, "
                  f"{todo} to generate on {state.num_processes} process(es)")
    timing = {}
    with state.split_between_processes(pending) as mine:
        for key, items in groupby(mine, key=lambda item: targets[item[0]].pipeline):
            pipe = pipelines[key]()
            for index, group in groupby(items, key=lambda item: item[0]):
                jobs = [job for _, job in group]
                started = time.perf_counter()
                generate_images(pipe, jobs, str(targets[index].folder), settings.generation(),
                                progress=state.is_local_main_process,
                                manifest_name=PART_MANIFEST.format(rank=state.process_index))
                timing[targets[index].folder] = (len(jobs), time.perf_counter() - started)
            del pipe
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    state.wait_for_everyone()
    if state.is_main_process:
        for target in targets:
            merge_manifests(target.folder)
    return timing


def record_timing(state, folder: Path, timing: dict, settings: BenchmarkGenerationSettings) -> None:
    """generation.json: benchmark images per second over this call's processes (wall clock of the slowest)."""
    if folder in timing:
        images, seconds = timing[folder]
        write_json_atomic(folder / TIMING_PART.format(rank=state.process_index), {"images": images, "seconds": seconds})
    state.wait_for_everyone()
    if not state.is_main_process:
        return
    parts = sorted(folder.glob(TIMING_PART.format(rank="*")))
    measured = [read_json(part) for part in parts]
    if measured:
        images, seconds = sum(m["images"] for m in measured), max(m["seconds"] for m in measured)
        write_json_atomic(folder / GENERATION_TIMING, {
            "images": images, "seconds": round(seconds, 3), "images_per_second": images / max(seconds, 1e-9),
            "processes": state.num_processes, "device": state.device.type, "resolution": settings.resolution,
            "steps": settings.steps, "dtype": settings.dtype})
    for part in parts:
        part.unlink()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", type=Path, required=True, help="trained run folders")
    parser.add_argument("--benchmark", type=Path, required=True,
                        help="DreamBooth benchmark folder (holding dataset/prompts_and_classes.txt)")
    parser.add_argument("--out", type=Path, required=True, help="output folder; one subfolder per run")
    parser.add_argument("--drift-base-dir", type=Path, default=None,
                        help="where the base model's drift images are kept and reused (default: OUT/drift-base)")
    BenchmarkGenerationSettings.add_arguments(parser)
    args = parser.parse_args(argv)
    settings = BenchmarkGenerationSettings.from_args(args)
    settings.check()
    return args, settings


def plan_targets(runs: list[TrainedRun], benchmark, settings: BenchmarkGenerationSettings, prompts: list[str],
                 out: Path, drift_root: Path) -> tuple[list[Target], list[Target], dict[str, Path]]:
    """The runs' targets (benchmark, then drift), the base-model drift targets, and each run's base folder."""
    run_targets, base_targets, base_of = [], {}, {}
    for run in runs:
        jobs = benchmark_jobs(run, benchmark, settings.seeds)
        run_targets.append(Target("benchmark", out / run.name, run.name, jobs))
        if not prompts:
            continue
        run_targets.append(Target("drift", out / run.name / DRIFT_DIR, run.name,
                                  drift_jobs(prompts, settings.seeds, subject=run.info.subject, run=run.name)))
        folder, identity = drift_base_folder(drift_root, run, settings, prompts)
        base_of[run.name] = folder
        base_targets.setdefault(folder, Target("base-model drift", folder, f"base:{run.name}",
                                               drift_jobs(prompts, settings.seeds), identity))
    return run_targets, list(base_targets.values()), base_of


@cli_entry
def main(argv=None) -> None:
    args, settings = parse_args(argv)
    check_can_write(args.out, "--out")
    if args.drift_base_dir is not None:
        check_can_write(args.drift_base_dir, "--drift-base-dir")
    set_up_process()
    import torch  # after parsing: --help stays quick
    from accelerate import PartialState

    from waveft.infer.pipeline import load_pipeline

    drift_prompts = settings.drift_prompt_list() if settings.drift else []
    benchmark = load_benchmark(args.benchmark)
    runs = [read_run(run_dir) for run_dir in args.runs]
    names = [run.name for run in runs]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise UserError(f"runs share folder names {', '.join(duplicates)}: their outputs would collide in --out; "
                        "give the run folders distinct names")
    run_targets, base_targets, base_of = plan_targets(runs, benchmark, settings, drift_prompts, args.out,
                                                      args.drift_base_dir or args.out / "drift-base")
    pending_jobs(run_targets + base_targets, settings.generation())  # other settings in a folder: refused now

    # cpu=True lets several CPU processes (torchrun, tests) split the work too instead of each doing all of it.
    state = PartialState(cpu=not torch.cuda.is_available())
    device = str(state.device)
    pipelines = {}
    for run in runs:  # the adapted model, and the base model with no adapter
        pipelines[run.name] = lambda run=run: load_pipeline(run.base_model, RunFolder(run.run_dir).adapter, run.vae,
                                                            settings.dtype, device, settings.scheduler,
                                                            settings.quantize)
        pipelines[f"base:{run.name}"] = lambda run=run: load_pipeline(run.base_model, None, run.vae, settings.dtype,
                                                                      device, settings.scheduler,
                                                                      settings.quantize)
    # The base model's drift images first, each folder under its lock, so that concurrent calls make them once.
    for target in base_targets:
        with folder_lock(target.folder, state.is_main_process):
            if state.is_main_process:
                write_json_atomic(target.folder / BASE_DRIFT_SETTINGS, target.identity)
            make_images(state, [target], settings, pipelines)
    if state.is_main_process:
        for run in runs:
            # The adapter as it is now: its weights' size replaces what an older trainer recorded (the whole folder).
            copy = dataclasses.replace(run.info, **adapter_facts(Path(RunFolder(run.run_dir).adapter)))
            write_json_atomic(args.out / run.name / RUN_INFO, copy.to_dict())
    timing = make_images(state, run_targets, settings, pipelines)
    for run in runs:
        record_timing(state, args.out / run.name, timing, settings)
    if state.is_main_process:
        for name, base in base_of.items():
            drift = args.out / name / DRIFT_DIR
            write_json_atomic(drift / DRIFT_BASE, {"dir": os.path.relpath(base, drift)})
        print(f"wrote the benchmark images and {MANIFEST} of {len(runs)} run(s) under {args.out}")


if __name__ == "__main__":
    main()
