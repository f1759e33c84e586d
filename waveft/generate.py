"""Generate images with SDXL and a merged adapter: prompts x seeds, PNGs and a manifest.jsonl.

`python -m waveft.generate --adapter RUN/adapter --prompt "a zjw dog on the beach" --seeds 0 1 --out DIR`

The same `generate_images` serves the CLI, validation during training and benchmark generation. It is
resumable: an image whose file and manifest row both exist is skipped.
"""
import argparse
import contextlib
import dataclasses
import json
import math
import os
from typing import Optional

import torch
from PIL import Image
from tqdm.auto import tqdm

from waveft.errors import UserError, cli_entry
from waveft.files import write_atomic, write_text_atomic
from waveft.generation_settings import SCHEDULERS, GenerationSettings
from waveft.models import DTYPES, is_quantized, quantize_linear_layers

MANIFEST_NAME = "manifest.jsonl"
def set_scheduler(pipe, name: str) -> None:
    import diffusers

    if name not in SCHEDULERS:
        raise UserError(f"unknown scheduler {name!r} (known: {', '.join(SCHEDULERS)})")
    class_name, kwargs = SCHEDULERS[name]
    pipe.scheduler = getattr(diffusers, class_name).from_config(pipe.scheduler.config, **kwargs)


def read_adapter_run_info(adapter_dir: str) -> dict:
    """The training metadata saved beside the adapter (base model, method, trainable parameters), if any."""
    path = os.path.join(adapter_dir, "waveft_run.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def attach_saved_adapter(unet, adapter_dir: str):
    """Load a PEFT adapter folder onto `unet`, unmerged: the PeftModel, whose base model is `unet` with the
    adapter's layers in place."""
    from peft import PeftModel

    import waveft.adapters.wara  # noqa: F401  (registers WaRA with PEFT, so its adapters load)
    from waveft.adapters.structured_waveft import enable_structured_waveft
    from waveft.adapters.waveft_locations import shared_waveft_locations

    with shared_waveft_locations():
        peft_model = PeftModel.from_pretrained(unet, adapter_dir)
    # Our WaveFT layer also runs (and merges) wavelets that stock PEFT's layer cannot run.
    enable_structured_waveft(peft_model)
    return peft_model


def merge_adapter(unet, adapter_dir: str):
    """Load a PEFT adapter folder onto `unet` and merge it into the weights: no inference cost remains.
    A quantized base (model.quantize) is refused: its weights are packed, and merging would re-quantize them."""
    if is_quantized(unet):
        raise UserError(
            f"cannot merge the adapter {adapter_dir} into a quantized base (its Linear weights are packed by "
            f"bitsandbytes): merge onto the unquantized base (quantize none), or keep the adapter attached"
        )
    return attach_saved_adapter(unet, adapter_dir).merge_and_unload()


@contextlib.contextmanager
def _base_model_errors(base_model: str):
    try:
        yield
    except (OSError, ValueError) as exc:
        raise UserError(f"could not load the base model {base_model!r}: {str(exc).splitlines()[0]}") from None


def load_pipeline(
    base_model: str,
    adapter_dir: Optional[str] = None,
    vae: Optional[str] = None,
    dtype: str = "fp32",
    device: Optional[str] = None,
    scheduler: str = "dpmpp_2m",
    quantize: str = "none",
):
    """A StableDiffusionXLPipeline from a Hub id or folder, with the adapter (if any) merged; with `quantize`
    (int8, nf4) the UNet's Linear layers are quantized and the adapter stays attached, unmerged."""
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel

    if adapter_dir is not None and not os.path.isfile(os.path.join(adapter_dir, "adapter_config.json")):
        raise UserError(f"no adapter_config.json in adapter folder {adapter_dir}")
    torch_dtype = DTYPES[dtype]
    # The UNet first, alone: its checkpoint's pages (mapped while it converts to `dtype`) are released before the
    # text encoders load, so the peak is the UNet's own. Full-size SDXL in fp32 on CPU: 14.8 GB peak RSS, against
    # 14.8-18.2 GB (varying run to run) with the pipeline loading every component itself.
    with _base_model_errors(base_model):
        unet = UNet2DConditionModel.from_pretrained(base_model, subfolder="unet", dtype=torch_dtype)
    if quantize != "none":
        quantize_linear_layers(unet, quantize, torch_dtype)
    if adapter_dir is not None:
        unet = attach_saved_adapter(unet, adapter_dir).get_base_model() if is_quantized(unet) else \
            merge_adapter(unet, adapter_dir)
    with _base_model_errors(base_model):
        kwargs = {"unet": unet, "dtype": torch_dtype}
        if vae is not None:
            kwargs["vae"] = AutoencoderKL.from_pretrained(vae, dtype=torch_dtype)
        pipe = StableDiffusionXLPipeline.from_pretrained(base_model, **kwargs)
    set_scheduler(pipe, scheduler)
    pipe.set_progress_bar_config(disable=True)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return pipe.to(device)


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


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Generate images from SDXL with a merged WaveFT/PEFT adapter.")
    parser.add_argument("--adapter", help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    parser.add_argument("--base", help="base model Hub id or folder (default: the one the adapter was trained on)")
    parser.add_argument("--vae", help="separate VAE Hub id or folder")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    parser.add_argument("--prompts-file", help="text file with one prompt per line")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", required=True, help="output folder for PNGs, manifest.jsonl and grid.png")
    GenerationSettings.add_arguments(parser)
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    return parser.parse_args(argv)


@cli_entry
def main(argv=None) -> None:
    args = parse_args(argv)
    prompts = list(args.prompt) + (read_prompts_file(args.prompts_file) if args.prompts_file else [])
    if not prompts:
        raise UserError("no prompts: pass --prompt or --prompts-file")
    base = args.base or (read_adapter_run_info(args.adapter).get("base_model") if args.adapter else None)
    if base is None:
        raise UserError("no base model: pass --base (the adapter folder does not name one)")
    settings = GenerationSettings.from_args(args)
    settings.check()
    pipe = load_pipeline(base, args.adapter, args.vae, settings.dtype, args.device, settings.scheduler,
                         settings.quantize)
    rows = generate_images(pipe, prompt_seed_jobs(prompts, args.seeds, base_model=base, adapter=args.adapter),
                           args.out, settings)
    save_grid([os.path.join(args.out, r["file"]) for r in rows], os.path.join(args.out, "grid.png"), len(args.seeds))
    print(f"wrote {len(rows)} images, {MANIFEST_NAME} and grid.png to {args.out}")


if __name__ == "__main__":
    main()
