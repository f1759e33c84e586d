"""Generate images with SDXL and a merged adapter: prompts x seeds, PNGs and a manifest.jsonl.

`python -m waveft.generate --adapter RUN/adapter --prompt "a zjw dog on the beach" --seeds 0 1 --out DIR`

The same `generate_images` serves the CLI, validation during training and benchmark generation. It is
resumable: an image whose file and manifest row both exist is skipped. torch is imported by the functions that
run a model, so that reading a manifest (the evaluation, a command's --help) does not load it.
"""
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from PIL import Image

from waveft.errors import UserError
from waveft.infer.settings import GenerationSettings
from waveft.io.files import write_atomic, write_text_atomic

if TYPE_CHECKING:
    import torch

# A generation folder: the images, one manifest row per image, and (the CLI's) a grid of them.
MANIFEST_NAME = "manifest.jsonl"
GRID_NAME = "grid.png"


@dataclass(frozen=True)
class GenerationJob:
    """One image to make: its file (relative to the output folder), prompt and seed (its own generator), and
    what identifies it to later readers (`details`: prompt_index, subject, run, drift, ...), kept in its row."""

    file: str
    prompt: str
    seed: int
    details: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"file": self.file, "prompt": self.prompt, "seed": self.seed, **self.details}


@dataclass(frozen=True)
class ManifestRow:
    """One line of a manifest: the job an image was made for and the settings it was made with."""

    job: GenerationJob
    settings: dict  # GenerationSettings' fields as written (a row of an older version may lack some)

    # Shorthands for what every reader asks.
    file = property(lambda self: self.job.file)
    prompt = property(lambda self: self.job.prompt)
    seed = property(lambda self: self.job.seed)

    def detail(self, key: str, default=None):
        return self.job.details.get(key, default)

    def to_json(self) -> dict:
        return {**self.job.to_json(), **self.settings}

    @classmethod
    def from_json(cls, row: dict) -> "ManifestRow":
        setting_names = {f.name for f in dataclasses.fields(GenerationSettings)}
        details = {k: v for k, v in row.items() if k not in ("file", "prompt", "seed") and k not in setting_names}
        job = GenerationJob(row["file"], row.get("prompt", ""), row.get("seed"), details)
        return cls(job, {k: v for k, v in row.items() if k in setting_names})


def read_manifest(path, required_keys: tuple[str, ...] = ("file",)) -> dict[str, ManifestRow]:
    """Rows of a manifest.jsonl keyed by file name, in file order; {} when there is no such file. A line that
    is not a JSON object, lacks one of `required_keys` or names a file twice is a UserError naming the line."""
    rows: dict[str, ManifestRow] = {}
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
            rows[row["file"]] = ManifestRow.from_json(row)
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


def write_manifest(path: str, rows: dict[str, ManifestRow]) -> None:
    write_text_atomic(path, "".join(json.dumps(row.to_json(), allow_nan=False) + "\n" for row in rows.values()))


def is_done(folder: str | os.PathLike, rows: dict[str, ManifestRow], job: GenerationJob) -> bool:
    """An image is done when its manifest row and its file both exist (a crash between the two redoes it)."""
    return job.file in rows and os.path.isfile(os.path.join(folder, job.file))


def _save_png(image: Image.Image, path: str) -> None:
    write_atomic(path, lambda f: image.save(f, format="PNG"))


def decode_outside_autocast(pipe, latents: "torch.Tensor") -> list[Image.Image]:
    """The pipeline's own VAE decode, with autocast off and in the VAE's dtype. Under fp16 autocast (training's
    mixed precision) the SDXL VAE would otherwise run in fp16 and overflow into black images."""
    import torch

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


def generate_images(pipe, jobs: list[GenerationJob], out_dir: str, settings: GenerationSettings,
                    progress: bool = True, manifest_name: str = MANIFEST_NAME) -> list[ManifestRow]:
    """Generate every job not done yet (`is_done`), one manifest row per image.

    Each image uses its own generator seeded by its job's seed, so results do not depend on batching.
    Returns the manifest rows of all jobs (done before or now).
    """
    import torch
    from tqdm.auto import tqdm

    os.makedirs(out_dir, exist_ok=True)
    manifest_path = os.path.join(out_dir, manifest_name)
    rows = read_manifest(manifest_path)
    todo = [job for job in jobs if not is_done(out_dir, rows, job)]
    settings_row = dataclasses.asdict(settings)
    batches = [todo[i : i + settings.batch_size] for i in range(0, len(todo), settings.batch_size)]
    under_autocast = torch.is_autocast_enabled(pipe.device.type)
    for batch in tqdm(batches, desc="generating", disable=not progress, unit="batch"):
        generators = [torch.Generator(device="cpu").manual_seed(int(job.seed)) for job in batch]
        with torch.no_grad():
            images = pipe(
                prompt=[job.prompt for job in batch],
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
            path = os.path.join(out_dir, job.file)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            _save_png(image, path)
            rows[job.file] = ManifestRow(job, settings_row)
        write_manifest(manifest_path, rows)
    return [rows[job.file] for job in jobs]


def prompt_seed_jobs(prompts: list[str], seeds: list[int], **details) -> list[GenerationJob]:
    """Every prompt x seed, named p<prompt index>_s<seed>.png; `details` go into every row."""
    return [
        GenerationJob(f"p{p:03d}_s{seed}.png", prompt, seed, {"prompt_index": p, **details})
        for p, prompt in enumerate(prompts)
        for seed in seeds
    ]


def _wrap(text: str, font, width: int) -> list[str]:
    """`text` in lines no wider than `width` pixels in `font` (a longer word stands alone)."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    return lines


def save_grid(rows: list[ManifestRow], folder: str, columns: int) -> str:
    """Tile the images of manifest `rows` (same size, files in `folder`), `columns` per row, each over a caption of
    its seed and prompt, into folder/GRID_NAME; returns its path."""
    from PIL import ImageDraw, ImageFont

    images = [Image.open(os.path.join(folder, row.file)).convert("RGB") for row in rows]
    width, height = images[0].size
    font = ImageFont.load_default()
    captions = [_wrap(f"seed {row.seed}: {row.prompt}", font, width - 4) for row in rows]
    line_height = font.getbbox("Ag")[3] + 2
    tile_height = height + line_height * max(len(c) for c in captions) + 4
    grid = Image.new("RGB", (columns * width, math.ceil(len(images) / columns) * tile_height), "white")
    draw = ImageDraw.Draw(grid)
    for i, (image, caption) in enumerate(zip(images, captions)):
        x, y = (i % columns) * width, (i // columns) * tile_height
        grid.paste(image, (x, y))
        for n, text in enumerate(caption):
            draw.text((x + 2, y + height + 2 + n * line_height), text, fill="black", font=font)
    path = os.path.join(folder, GRID_NAME)
    _save_png(grid, path)
    return path
