"""Score generated benchmark images against the subjects' real images.

    python -m eval.score --images DIR --real DATASET_DIR --out DIR [encoder settings]

DIR holds the images and `manifest.jsonl` written by `eval.generate_benchmark` (and the run's run_info.json,
which is carried into metrics.json for `eval.report`). Writes metrics.json (overall, per subject, per prompt),
metrics.csv and metrics.md to --out, and prints the overall and per-subject tables.

Aggregation: per prompt, DINO and CLIP-I average over real x that prompt's images, diversity over the pairs of
that prompt's images; per subject, DINO and CLIP-I average over real x all the subject's images, CLIP-T over
its images, diversity over its prompts, and CMMD compares all its images with its real images; overall is
the mean over subjects (so that each subject counts once, as the report's standard errors assume).
LPIPS diversity is computed only with --lpips NET (it needs `pip install lpips`); otherwise its column says n/a.
"""
import argparse
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

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
    load_rgb,
)
from eval.files import MANIFEST, read_json, read_manifest
from eval.metrics import (
    CMMD_SCALE,
    CMMD_SIGMA,
    LpipsDistance,
    clip_t_scores,
    cmmd,
    dino_diversity,
    mean_pairwise_cosine,
    mean_pairwise_distance,
)
from eval.protocol import DEFAULT_IDENTIFIER, PROMPTS_FILE, load_benchmark, real_image_paths, remove_identifier
from eval.tables import METRICS, SMOKE_TEST_BANNER, csv_text, format_metric, json_text, markdown_table
from waveft.errors import UserError, cli_entry
from waveft.files import write_text_atomic

RUN_INFO = "run_info.json"
CLIP_T_PROMPTS = ("without-identifier", "as-generated")
LPIPS_NETS = ("off", "alex", "vgg", "squeeze")


@dataclass(frozen=True)
class ScoreSettings:
    dino: str = DEFAULT_DINO
    clip: str = DEFAULT_CLIP  # CLIP-I and CLIP-T
    cmmd_clip: str = DEFAULT_CMMD_CLIP
    clip_t_prompt: str = "without-identifier"  # CLIP sees 'a dog in the snow', not 'a zjw dog in the snow'
    identifier: str = DEFAULT_IDENTIFIER  # for manifest rows that do not name their identifier
    lpips: str = "off"
    batch_size: int = 32
    device: str | None = None


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
        lpips = None if settings.lpips == "off" else LpipsDistance(settings.lpips, clip.device)
        return cls(DinoEncoder.load(settings.dino, settings.device), clip, cmmd_clip, lpips)

    @property
    def smoke_test(self) -> bool:
        return self.dino.smoke_test or self.clip.smoke_test or self.cmmd.smoke_test


def _clip_t_text(row: dict, settings: ScoreSettings) -> str:
    if settings.clip_t_prompt == "as-generated":
        return row["prompt"]
    return remove_identifier(row["prompt"], row.get("identifier", settings.identifier))


def _describe_settings(settings: ScoreSettings, encoders: _Encoders) -> dict:
    lpips = (f"LPIPS ({settings.lpips}), inputs in [-1, 1]" if encoders.lpips
             else "not computed (pass --lpips alex; needs: pip install lpips, which pulls torchvision)")
    return {
        "dino": encoders.dino.describe(),
        "clip_i_and_clip_t": encoders.clip.describe(),
        "cmmd": f"{encoders.cmmd.describe()}; RBF sigma {CMMD_SIGMA}, scale {CMMD_SCALE}, vs the subject's real images",
        "clip_t_prompt": settings.clip_t_prompt,
        "lpips_div": lpips,
        "aggregation": "overall = mean over subjects; subject = all real x generated pairs; diversity = mean over "
                       "the subject's prompts of the mean over i<j image pairs",
    }


def score_images(images_dir: str | Path, benchmark_dir: str | Path, settings: ScoreSettings,
                 cache: EmbeddingCache | None) -> dict:
    """Everything metrics.json holds. Raises UserError on bad input before any model is loaded where it can."""
    images_dir = Path(images_dir)
    rows = read_manifest(images_dir)
    run_info = read_json(images_dir / RUN_INFO) if (images_dir / RUN_INFO).is_file() else None
    rows_by_subject = defaultdict(list)
    for index, row in enumerate(rows):
        rows_by_subject[row["subject"]].append(index)
    known_subjects = {subject.name for subject in load_benchmark(benchmark_dir).subjects}
    unknown = sorted(set(rows_by_subject) - known_subjects)
    if unknown:
        raise UserError(f"subjects in {images_dir / MANIFEST} missing from the benchmark's {PROMPTS_FILE}: "
                        f"{', '.join(unknown)}")
    real_paths = {subject: real_image_paths(benchmark_dir, subject) for subject in rows_by_subject}

    encoders = _Encoders.load(settings)
    generated = [images_dir / row["file"] for row in rows]
    gen_dino = encoders.dino.embed_files(generated, settings.batch_size, desc="DINO, generated")
    gen_clip = encoders.clip.embed_files(generated, settings.batch_size, desc="CLIP, generated")
    gen_cmmd = gen_clip if encoders.cmmd is encoders.clip else encoders.cmmd.embed_files(
        generated, settings.batch_size, desc="CMMD CLIP, generated")
    texts = [_clip_t_text(row, settings) for row in rows]
    unique_texts = sorted(set(texts))
    text_embeddings = dict(zip(unique_texts, encoders.clip.embed_texts(unique_texts)))
    clip_t = clip_t_scores(gen_clip, np.stack([text_embeddings[t] for t in texts]))

    per_prompt, per_subject = [], {}
    for subject, indices in tqdm(sorted(rows_by_subject.items()), desc="subjects", unit="subject"):
        real = real_paths[subject]
        real_dino = encoders.dino.embed_files(real, settings.batch_size, cache, desc=f"DINO, real {subject}")
        real_clip = encoders.clip.embed_files(real, settings.batch_size, cache, desc=f"CLIP, real {subject}")
        real_cmmd = real_clip if encoders.cmmd is encoders.clip else encoders.cmmd.embed_files(
            real, settings.batch_size, cache, desc=f"CMMD CLIP, real {subject}")
        by_prompt = defaultdict(list)
        for i in indices:
            by_prompt[rows[i]["prompt_index"]].append(i)
        prompt_scores = []
        for prompt_index, group in sorted(by_prompt.items()):
            lpips_div = (mean_pairwise_distance([load_rgb(generated[i]) for i in group], encoders.lpips)
                         if encoders.lpips else None)
            prompt_scores.append({
                "subject": subject, "prompt_index": prompt_index, "prompt": rows[group[0]]["prompt"],
                "images": len(group),
                "dino": mean_pairwise_cosine(real_dino, gen_dino[group]),
                "clip_i": mean_pairwise_cosine(real_clip, gen_clip[group]),
                "clip_t": float(clip_t[group].mean()),
                "lpips_div": lpips_div,
                "dino_div": dino_diversity(gen_dino[group]),
                "cmmd": None,  # a handful of images per prompt is too few for an MMD estimate
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
        }
    overall = {"subjects": len(per_subject), "images": len(rows)}
    overall.update({key: _nanmean([s[key] for s in per_subject.values()]) for key in METRICS})
    result = {"smoke_test": encoders.smoke_test}
    if encoders.smoke_test:
        result["smoke_test_note"] = SMOKE_TEST_BANNER
    result.update({
        "images_dir": str(images_dir.resolve()), "benchmark_dir": str(Path(benchmark_dir).resolve()),
        "settings": _describe_settings(settings, encoders), "score_settings": asdict(settings), "run": run_info,
        "overall": overall, "per_subject": per_subject, "per_prompt": per_prompt,
    })
    return result


def _nanmean(values: list) -> float | None:
    present = [v for v in values if v is not None and not np.isnan(v)]
    return float(np.mean(present)) if present else None


def _metric_cells(scores: dict) -> list[str]:
    return [format_metric(key, scores[key]) for key in METRICS]


def metrics_markdown(result: dict) -> str:
    header = [label for label, _ in METRICS.values()]
    overall = result["overall"]
    parts = [f"# Benchmark scores: {result['images_dir']}\n"]
    if result["smoke_test"]:
        parts.append(f"> **{SMOKE_TEST_BANNER}**\n")
    if result["run"]:
        run = result["run"]
        parts.append(f"Run: method {run.get('method')}, budget {run.get('budget')}, "
                     f"trainable parameters {run.get('trainable_parameters')}\n")
    parts.append("Settings:\n\n" + "".join(f"- {k}: {v}\n" for k, v in result["settings"].items()))
    parts.append(f"## Overall (mean over {overall['subjects']} subjects, {overall['images']} images)\n")
    parts.append(markdown_table(header, [_metric_cells(overall)]))
    parts.append("\n## Per subject\n")
    parts.append(markdown_table(["subject", "images"] + header,
                                [[s, v["images"]] + _metric_cells(v) for s, v in result["per_subject"].items()]))
    parts.append("\nPer-prompt scores are in metrics.csv and metrics.json.\n")
    return "\n".join(parts)


def metrics_csv(result: dict) -> str:
    header = ["scope", "subject", "prompt_index", "prompt", "images"] + list(METRICS) + ["smoke_test"]
    smoke = result["smoke_test"]
    overall = result["overall"]
    rows = [["overall", "", "", "", overall["images"]] + [overall[k] for k in METRICS] + [smoke]]
    rows += [["subject", s, "", "", v["images"]] + [v[k] for k in METRICS] + [smoke]
             for s, v in result["per_subject"].items()]
    rows += [["prompt", p["subject"], p["prompt_index"], p["prompt"], p["images"]] + [p[k] for k in METRICS] + [smoke]
             for p in result["per_prompt"]]
    return csv_text(header, rows)


def write_metrics(result: dict, out_dir: str | Path) -> None:
    out_dir = Path(out_dir)
    write_text_atomic(out_dir / "metrics.json", json_text(result))
    write_text_atomic(out_dir / "metrics.csv", metrics_csv(result))
    write_text_atomic(out_dir / "metrics.md", metrics_markdown(result))


@cli_entry
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, required=True, help="folder with manifest.jsonl and the images")
    parser.add_argument("--real", type=Path, required=True, help="DreamBooth benchmark folder (holding dataset/)")
    parser.add_argument("--out", type=Path, required=True, help="folder for metrics.json, metrics.csv, metrics.md")
    defaults = ScoreSettings()
    parser.add_argument("--dino", default=defaults.dino, help="DINO ViTModel: Hub id or folder (default %(default)s)")
    parser.add_argument("--clip", default=defaults.clip,
                        help="CLIP for CLIP-I and CLIP-T: Hub id or folder (default %(default)s)")
    parser.add_argument("--cmmd-clip", default=defaults.cmmd_clip, help="CLIP for CMMD (default %(default)s)")
    parser.add_argument("--clip-t-prompt", choices=CLIP_T_PROMPTS, default=defaults.clip_t_prompt,
                        help="text that CLIP-T compares with: the prompt without the identifier token, or as generated")
    parser.add_argument("--identifier", default=defaults.identifier,
                        help="identifier token for manifest rows that do not name one (default %(default)s)")
    parser.add_argument("--lpips", choices=LPIPS_NETS, default=defaults.lpips,
                        help="LPIPS network for LPIPS diversity; off by default (needs: pip install lpips)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir(),
                        help="cache of real-image embeddings (default %(default)s)")
    args = parser.parse_args(argv)
    settings = ScoreSettings(args.dino, args.clip, args.cmmd_clip, args.clip_t_prompt, args.identifier, args.lpips,
                             args.batch_size, args.device)
    result = score_images(args.images, args.real, settings, EmbeddingCache(args.cache_dir))
    write_metrics(result, args.out)
    print(metrics_markdown(result))
    print(f"wrote {args.out / 'metrics.json'}, metrics.csv, metrics.md")


if __name__ == "__main__":
    main()
