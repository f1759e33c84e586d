"""Score generated benchmark images against the subjects' real images.

    python -m eval.score --images DIR --real DATASET_DIR --out DIR [encoder settings]

DIR holds the images and `manifest.jsonl` written by `eval.generate_benchmark` (and the run's run_info.json,
which is carried into metrics.json for `eval.report`). Writes metrics.json (overall, per subject, per prompt),
metrics.csv and metrics.md to --out, and prints the overall and per-subject tables.

Aggregation: per prompt, DINO and CLIP-I average over real x that prompt's images, diversity over the pairs of
that prompt's images; per subject, DINO and CLIP-I average over real x all the subject's images, CLIP-T over
its images, diversity over its prompts, CMMD compares all its images with its real images, and drift averages
the DINO cosine of each drift image (DIR/drift/, a prompt without the subject) with the base model's image of
the same prompt and seed (the folder DIR/drift/base.json names) over the subject's run; overall is
the mean over subjects (so that each subject counts once, as the report's standard errors assume).
LPIPS diversity is computed only with --lpips NET (it needs `pip install lpips`); otherwise its column says n/a.
"""
import argparse
import typing
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from tqdm.auto import tqdm

from eval.encoders import (
    DEFAULT_CLIP,
    DEFAULT_CMMD_CLIP,
    DEFAULT_DINO,
    ClipEncoder,
    DinoEncoder,
    EmbeddingCache,
    default_cache_dir,
)
from eval.files import read_json, scorable_rows
from eval.layout import DRIFT_BASE, DRIFT_DIR, MANIFEST, METRICS_CSV, METRICS_MD, RUN_INFO, metrics_file
from eval.metrics import (
    CMMD_SCALE,
    CMMD_SIGMA,
    LpipsDistance,
    clip_t_scores,
    cmmd,
    dino_diversity,
    drift_scores,
    mean_pairwise_cosine,
    mean_pairwise_distance,
)
from eval.protocol import (
    DEFAULT_IDENTIFIER,
    PROMPTS_FILE,
    load_benchmark,
    real_image_paths,
    remove_identifier,
)
from eval.tables import (
    METRICS,
    SMOKE_TEST_BANNER,
    csv_text,
    format_metric,
    json_text,
    markdown_table,
)
from waveft.errors import UserError, cli_entry
from waveft.hub import check_model_source
from waveft.infer.generation import ManifestRow
from waveft.io.cli_settings import CliSettings, cli
from waveft.io.files import check_can_write, write_text_atomic
from waveft.io.images import load_rgb
from waveft.io.run_folder import RunInfo

ClipTPrompt = Literal["without-identifier", "as-generated"]
LpipsNet = Literal["alex", "vgg", "squeeze"]
CLIP_T_PROMPTS = typing.get_args(ClipTPrompt)
LPIPS_NETS = typing.get_args(LpipsNet)


@dataclass(frozen=True)
class ScoreSettings(CliSettings):
    """eval.score's settings (the sweep's `scoring:` section): the encoders and how they are used."""

    dino: str = field(default=DEFAULT_DINO, metadata=cli(
        "DINO encoder, Hub id or folder: a DINO ViT (facebook/dino-vits16) or a DINOv2 (facebook/dinov2-base)"))
    clip: str = field(default=DEFAULT_CLIP, metadata=cli("CLIP for CLIP-I and CLIP-T: Hub id or folder"))
    cmmd_clip: str = field(default=DEFAULT_CMMD_CLIP, metadata=cli("CLIP for CMMD: Hub id or folder"))
    # CLIP sees 'a dog in the snow', not 'a zjw dog in the snow'
    clip_t_prompt: ClipTPrompt = field(default="without-identifier", metadata=cli(
        "text that CLIP-T compares with: the prompt without the identifier token, or as generated"))
    lpips: LpipsNet | None = field(default=None, metadata=cli(
        "LPIPS network for LPIPS diversity; off by default (needs: pip install lpips)", none="off"))
    batch_size: int = field(default=32, metadata=cli("images per encoder call"))
    device: str | None = field(default=None, metadata=cli("default: cuda if available, else cpu"))
    cache_dir: str | None = field(default=None, metadata=cli(
        f"cache of real- and base-image embeddings (default: {default_cache_dir()})"))

    def problems(self) -> list[tuple[str, str]]:
        return [("batch_size", "must be > 0")] if self.batch_size <= 0 else []


@dataclass
class _Encoders:
    dino: DinoEncoder
    clip: ClipEncoder
    cmmd: ClipEncoder
    lpips: LpipsDistance | None

    @classmethod
    def load(cls, settings: ScoreSettings) -> "_Encoders":
        clip = ClipEncoder.load(settings.clip, settings.device)
        cmmd_clip = (clip if settings.cmmd_clip == settings.clip
                     else ClipEncoder.load(settings.cmmd_clip, settings.device))
        lpips = None if settings.lpips is None else LpipsDistance(settings.lpips, clip.device)
        return cls(DinoEncoder.load(settings.dino, settings.device), clip, cmmd_clip, lpips)

    @property
    def smoke_test(self) -> bool:
        return self.dino.smoke_test or self.clip.smoke_test or self.cmmd.smoke_test


def _clip_t_text(row: ManifestRow, settings: ScoreSettings, identifier: str) -> str:
    if settings.clip_t_prompt == "as-generated":
        return row.prompt
    return remove_identifier(row.prompt, row.detail("identifier", identifier))


def _describe_settings(settings: ScoreSettings, encoders: _Encoders, drift: list[dict]) -> dict:
    lpips = (f"LPIPS ({settings.lpips}), inputs in [-1, 1]" if encoders.lpips
             else "not computed (pass --lpips alex; needs: pip install lpips, which pulls torchvision)")
    return {
        "dino": encoders.dino.describe(),
        "clip_i_and_clip_t": encoders.clip.describe(),
        "cmmd": f"{encoders.cmmd.describe()}; RBF sigma {CMMD_SIGMA}, scale {CMMD_SCALE}, vs the subject's real images",
        "clip_t_prompt": settings.clip_t_prompt,
        "lpips_div": lpips,
        "drift": (f"DINO cosine (the DINO encoder above) between base-model and adapted images of the same prompt "
                  f"and seed: {len({d['prompt'] for d in drift})} prompts without the subject x "
                  f"{len({d['seed'] for d in drift})} seeds" if drift
                  else "not computed (no drift images: eval.generate_benchmark makes them unless --no-drift)"),
        "aggregation": "overall = mean over subjects; subject = all real x generated pairs; diversity = mean over "
                       "the subject's prompts of the mean over i<j image pairs",
    }


def drift_pairs(images_dir: Path) -> list[tuple[ManifestRow, Path, Path]] | None:
    """(adapted row, adapted image, base-model image) for each of the run's drift images, matched by prompt and
    seed; None when the folder has no drift images."""
    drift_dir = images_dir / DRIFT_DIR
    if not (drift_dir / MANIFEST).is_file():
        return None
    adapted = scorable_rows(drift_dir)
    pointer = read_json(drift_dir / DRIFT_BASE)
    if not isinstance(pointer, dict) or not isinstance(pointer.get("dir"), str):
        raise UserError(f"{drift_dir / DRIFT_BASE}: expected {{\"dir\": <the base-model drift folder>}}")
    base_dir = (drift_dir / pointer["dir"]).resolve()
    base = {(r.prompt, r.seed): r for r in scorable_rows(base_dir, ("file", "prompt", "seed"))}
    pairs = []
    for row in adapted:
        match = base.get((row.prompt, row.seed))
        if match is None:
            raise UserError(f"{base_dir} has no base-model image for drift prompt {row.prompt!r}, seed "
                            f"{row.seed} (make it with: python -m eval.generate_benchmark)")
        pairs.append((row, drift_dir / row.file, base_dir / match.file))
    return pairs


def score_drift(pairs, encoders: "_Encoders", settings: ScoreSettings, cache: EmbeddingCache | None) -> list[dict]:
    """Drift per image pair. Base-model images are shared by every run, so their embeddings are cached."""
    adapted = encoders.dino.embed_files([p[1] for p in pairs], settings.batch_size, desc="DINO, drift adapted")
    base = encoders.dino.embed_files([p[2] for p in pairs], settings.batch_size, cache, desc="DINO, drift base")
    return [{"subject": row.detail("subject"), "prompt": row.prompt, "seed": row.seed, "file": row.file,
             "drift": float(value)} for (row, _, _), value in zip(pairs, drift_scores(base, adapted))]


@dataclass(frozen=True)
class ScoreResult:
    """Everything metrics.json holds: eval.score writes it, eval.report reads it."""

    smoke_test: bool  # scored with the tiny random-weight encoders
    images_dir: str
    benchmark_dir: str
    settings: dict  # each metric's description, as the report shows it
    score_settings: dict  # ScoreSettings' fields
    run: RunInfo | None  # the run's record copied beside its images; None for hand-made folders
    overall: dict  # metric -> mean over subjects, and the counts
    per_subject: dict[str, dict]
    per_prompt: list[dict]
    per_drift_image: list[dict]

    def to_json(self) -> dict:
        out = {"smoke_test": self.smoke_test}
        if self.smoke_test:
            out["smoke_test_note"] = SMOKE_TEST_BANNER
        out.update({
            "images_dir": self.images_dir, "benchmark_dir": self.benchmark_dir, "settings": self.settings,
            "score_settings": self.score_settings, "run": self.run.to_dict() if self.run else None,
            "overall": self.overall, "per_subject": self.per_subject, "per_prompt": self.per_prompt,
            "per_drift_image": self.per_drift_image,
        })
        return out


def score_images(images_dir: str | Path, benchmark_dir: str | Path, settings: ScoreSettings,
                 cache: EmbeddingCache | None, identifier: str = DEFAULT_IDENTIFIER) -> ScoreResult:
    """Score one folder of benchmark images. Raises UserError on bad input before any model is loaded where it
    can."""
    images_dir = Path(images_dir)
    rows = scorable_rows(images_dir)
    run_info = RunInfo.read(images_dir / RUN_INFO) if (images_dir / RUN_INFO).is_file() else None
    rows_by_subject = defaultdict(list)
    for index, row in enumerate(rows):
        rows_by_subject[row.detail("subject")].append(index)
    known_subjects = {subject.name for subject in load_benchmark(benchmark_dir).subjects}
    unknown = sorted(set(rows_by_subject) - known_subjects)
    if unknown:
        raise UserError(f"subjects in {images_dir / MANIFEST} missing from the benchmark's {PROMPTS_FILE}: "
                        f"{', '.join(unknown)}")
    real_paths = {subject: real_image_paths(benchmark_dir, subject) for subject in rows_by_subject}
    pairs = drift_pairs(images_dir)

    encoders = _Encoders.load(settings)
    generated = [images_dir / row.file for row in rows]
    gen_dino = encoders.dino.embed_files(generated, settings.batch_size, desc="DINO, generated")
    gen_clip = encoders.clip.embed_files(generated, settings.batch_size, desc="CLIP, generated")
    gen_cmmd = gen_clip if encoders.cmmd is encoders.clip else encoders.cmmd.embed_files(
        generated, settings.batch_size, desc="CMMD CLIP, generated")
    texts = [_clip_t_text(row, settings, identifier) for row in rows]
    unique_texts = sorted(set(texts))
    text_embeddings = dict(zip(unique_texts, encoders.clip.embed_texts(unique_texts)))
    clip_t = clip_t_scores(gen_clip, np.stack([text_embeddings[t] for t in texts]))

    drift = score_drift(pairs, encoders, settings, cache) if pairs else []
    per_prompt, per_subject = [], {}
    for subject, indices in tqdm(sorted(rows_by_subject.items()), desc="subjects", unit="subject"):
        real = real_paths[subject]
        real_dino = encoders.dino.embed_files(real, settings.batch_size, cache, desc=f"DINO, real {subject}")
        real_clip = encoders.clip.embed_files(real, settings.batch_size, cache, desc=f"CLIP, real {subject}")
        real_cmmd = real_clip if encoders.cmmd is encoders.clip else encoders.cmmd.embed_files(
            real, settings.batch_size, cache, desc=f"CMMD CLIP, real {subject}")
        by_prompt = defaultdict(list)
        for i in indices:
            by_prompt[rows[i].detail("prompt_index")].append(i)
        prompt_scores = []
        for prompt_index, group in sorted(by_prompt.items()):
            lpips_div = (mean_pairwise_distance([load_rgb(generated[i]) for i in group], encoders.lpips)
                         if encoders.lpips else None)
            prompt_scores.append({
                "subject": subject, "prompt_index": prompt_index, "prompt": rows[group[0]].prompt,
                "images": len(group),
                "dino": mean_pairwise_cosine(real_dino, gen_dino[group]),
                "clip_i": mean_pairwise_cosine(real_clip, gen_clip[group]),
                "clip_t": float(clip_t[group].mean()),
                "lpips_div": lpips_div,
                "dino_div": dino_diversity(gen_dino[group]),
                "cmmd": None,  # a handful of images per prompt is too few for an MMD estimate
                "drift": None,  # a property of the adapter (drift prompts), not of a benchmark prompt
            })
        per_prompt += prompt_scores
        per_subject[subject] = {
            "images": len(indices), "real_images": len(real),
            "dino": mean_pairwise_cosine(real_dino, gen_dino[indices]),
            "clip_i": mean_pairwise_cosine(real_clip, gen_clip[indices]),
            "clip_t": float(clip_t[indices].mean()),
            "lpips_div": _nanmean([p["lpips_div"] for p in prompt_scores]),
            "dino_div": _nanmean([p["dino_div"] for p in prompt_scores]),
            "cmmd": cmmd(gen_cmmd[indices], real_cmmd),
            "drift": _nanmean([d["drift"] for d in drift if d["subject"] == subject]),
        }
    overall = {"subjects": len(per_subject), "images": len(rows)}
    overall.update({key: _nanmean([s[key] for s in per_subject.values()]) for key in METRICS})
    return ScoreResult(
        smoke_test=encoders.smoke_test, images_dir=str(images_dir.resolve()),
        benchmark_dir=str(Path(benchmark_dir).resolve()), settings=_describe_settings(settings, encoders, drift),
        score_settings=asdict(settings), run=run_info, overall=overall, per_subject=per_subject,
        per_prompt=per_prompt, per_drift_image=drift,
    )


def _nanmean(values: list) -> float | None:
    present = [v for v in values if v is not None and not np.isnan(v)]
    return float(np.mean(present)) if present else None


def _metric_cells(scores: dict) -> list[str]:
    return [format_metric(key, scores[key]) for key in METRICS]


def metrics_markdown(result: ScoreResult) -> str:
    header = [label for label, _ in METRICS.values()]
    overall = result.overall
    parts = [f"# Benchmark scores: {result.images_dir}\n"]
    if result.smoke_test:
        parts.append(f"> **{SMOKE_TEST_BANNER}**\n")
    if result.run:
        run = result.run
        budget = "" if run.budget is None else f", budget {run.budget:g}"  # a run without one says nothing
        parts.append(f"Run: method {run.method}{budget}, trainable parameters {run.trainable_parameters}\n")
    parts.append("Settings:\n\n" + "".join(f"- {k}: {v}\n" for k, v in result.settings.items()))
    parts.append(f"## Overall (mean over {overall['subjects']} subjects, {overall['images']} images)\n")
    parts.append(markdown_table(header, [_metric_cells(overall)]))
    parts.append("\n## Per subject\n")
    parts.append(markdown_table(["subject", "images"] + header,
                                [[s, v["images"]] + _metric_cells(v) for s, v in result.per_subject.items()]))
    parts.append("\nPer-prompt scores are in metrics.csv and metrics.json.\n")
    return "\n".join(parts)


def metrics_csv(result: ScoreResult) -> str:
    header = ["scope", "subject", "prompt_index", "prompt", "images"] + list(METRICS) + ["smoke_test"]
    smoke = result.smoke_test
    overall = result.overall
    rows = [["overall", "", "", "", overall["images"]] + [overall[k] for k in METRICS] + [smoke]]
    rows += [["subject", s, "", "", v["images"]] + [v[k] for k in METRICS] + [smoke]
             for s, v in result.per_subject.items()]
    rows += [["prompt", p["subject"], p["prompt_index"], p["prompt"], p["images"]] + [p[k] for k in METRICS] + [smoke]
             for p in result.per_prompt]
    return csv_text(header, rows)


def write_metrics(result: ScoreResult, out_dir: str | Path) -> None:
    out_dir = Path(out_dir)
    write_text_atomic(metrics_file(out_dir), json_text(result.to_json()))
    write_text_atomic(out_dir / METRICS_CSV, metrics_csv(result))
    write_text_atomic(out_dir / METRICS_MD, metrics_markdown(result))


@cli_entry
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, required=True, help="folder with manifest.jsonl and the images")
    parser.add_argument("--real", type=Path, required=True, help="DreamBooth benchmark folder (holding dataset/)")
    parser.add_argument("--out", type=Path, required=True, help="folder for metrics.json, metrics.csv, metrics.md")
    parser.add_argument("--identifier", default=DEFAULT_IDENTIFIER,
                        help="identifier token for manifest rows that do not name one (default %(default)s)")
    ScoreSettings.add_arguments(parser)
    args = parser.parse_args(argv)
    settings = ScoreSettings.from_args(args)
    settings.check()
    check_can_write(args.out, "--out")
    for encoder in ("dino", "clip", "cmmd_clip"):  # before the model libraries load: refused in a second
        check_model_source(getattr(settings, encoder), "--" + encoder.replace("_", "-"))
    cache = EmbeddingCache(settings.cache_dir or default_cache_dir())
    result = score_images(args.images, args.real, settings, cache, args.identifier)
    write_metrics(result, args.out)
    print(metrics_markdown(result))
    print(f"wrote {metrics_file(args.out)}, {METRICS_CSV}, {METRICS_MD}")


if __name__ == "__main__":
    main()
