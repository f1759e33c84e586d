"""Generate images with SDXL and a merged adapter: prompts x seeds, PNGs and a manifest.jsonl.

`python -m waveft.generate --adapter RUN/adapter --prompt "a zjw dog on the beach" --seeds 0 1 --out DIR`

The same `generate_images` serves the CLI, validation during training and benchmark generation. It is
resumable: an image whose file and manifest row both exist is skipped.
"""
import dataclasses
import json
import math
import os

import torch
from PIL import Image
from tqdm.auto import tqdm

from waveft.errors import UserError
from waveft.infer.settings import GenerationSettings
from waveft.io.files import write_atomic, write_text_atomic

# A generation folder: the images, one manifest row per image, and (the CLI's) a grid of them.
MANIFEST_NAME = "manifest.jsonl"
GRID_NAME = "grid.png"


def read_manifest(path, required_keys: tuple[str, ...] = ("file",)) -> dict[str, dict]:
    """Rows of a manifest.jsonl keyed by file name, in file order; {} when there is no such file. A line that
    is not a JSON object, lacks one of `required_keys` or names a file twice is a UserError naming the line."""
    rows: dict[str, dict] = {}
    if not os.path.isfile(path):
        return rows
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{number}: not a JSON row ({exc})") from None
            missing = [k for k in required_keys if k not in row] if isinstance(row, dict) else list(required_keys)
            if missing:
                raise UserError(f"{path}:{number}: missing keys {', '.join(missing)}")
            if row["file"] in rows:
                raise UserError(f"{path}:{number}: {row['file']} is listed twice")
            rows[row["file"]] = row
    return rows


def read_prompts_file(path: str) -> list[str]:
    """One prompt per non-blank line; a missing, unreadable or empty file is a UserError."""
    try:
        with open(path, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read prompts file {path}: {exc}") from None
    if not prompts:
        raise UserError(f"prompts file {path} holds no prompts")
    return prompts


def write_manifest(path: str, rows: dict[str, dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in rows.values()))


def _save_png(image: Image.Image, path: str) -> None:
    write_atomic(path, lambda f: image.save(f, format="PNG"))


def decode_outside_autocast(pipe, latents: torch.Tensor) -> list[Image.Image]:
    """The pipeline's own VAE decode, with autocast off and in the VAE's dtype. Under fp16 autocast (training's
    mixed precision) the SDXL VAE would otherwise run in fp16 and overflow into black images."""
    vae = pipe.vae
    with torch.autocast(latents.device.type, enabled=False):
        latents = latents.to(vae.dtype)
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        if mean is not None and std is not None:
            mean = torch.tensor(mean).view(1, -1, 1, 1).to(latents)
            std = torch.tensor(std).view(1, -1, 1, 1).to(latents)
            latents = latents * std / vae.config.scaling_factor + mean
        else:
            latents = latents / vae.config.scaling_factor
        pixels = vae.decode(latents, return_dict=False)[0]
    return pipe.image_processor.postprocess(pixels, output_type="pil")


def generate_images(pipe, jobs: list[dict], out_dir: str, settings: GenerationSettings, progress: bool = True,
                    manifest_name: str = MANIFEST_NAME) -> list[dict]:
    """Generate every job not done yet. A job is a dict with `file`, `prompt`, `seed` and any extra keys.

    Each image uses its own generator seeded by its job's seed, so results do not depend on batching.
    Returns the manifest rows of all jobs (done before or now).
    """
    os.makedirs(out_dir, exist_ok=True)
    manifest_path = os.path.join(out_dir, manifest_name)
    rows = read_manifest(manifest_path)
    todo = [j for j in jobs if not (j["file"] in rows and os.path.isfile(os.path.join(out_dir, j["file"])))]
    settings_row = dataclasses.asdict(settings)
    batches = [todo[i : i + settings.batch_size] for i in range(0, len(todo), settings.batch_size)]
    under_autocast = torch.is_autocast_enabled(pipe.device.type)
    for batch in tqdm(batches, desc="generating", disable=not progress, unit="batch"):
        generators = [torch.Generator(device="cpu").manual_seed(int(job["seed"])) for job in batch]
        with torch.no_grad():
            images = pipe(
                prompt=[job["prompt"] for job in batch],
                negative_prompt=[settings.negative_prompt] * len(batch) if settings.negative_prompt else None,
                num_inference_steps=settings.steps,
                guidance_scale=settings.guidance_scale,
                height=settings.height,
                width=settings.width,
                generator=generators,
                output_type="latent" if under_autocast else "pil",
            ).images
            if under_autocast:
                images = decode_outside_autocast(pipe, images)
        for job, image in zip(batch, images):
            path = os.path.join(out_dir, job["file"])
            os.makedirs(os.path.dirname(path), exist_ok=True)
            _save_png(image, path)
            rows[job["file"]] = {**job, **settings_row}
        write_manifest(manifest_path, rows)
    return [rows[j["file"]] for j in jobs]


def prompt_seed_jobs(prompts: list[str], seeds: list[int], **extra) -> list[dict]:
    return [
        {"file": f"p{p:03d}_s{seed}.png", "prompt": prompt, "prompt_index": p, "seed": seed, **extra}
        for p, prompt in enumerate(prompts)
        for seed in seeds
    ]


def save_grid(paths: list[str], grid_path: str, columns: int) -> None:
    """Tile images (same size) into one PNG, `columns` per row."""
    images = [Image.open(p).convert("RGB") for p in paths]
    width, height = images[0].size
    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (columns * width, rows * height), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * width, (i // columns) * height))
    _save_png(grid, grid_path)
