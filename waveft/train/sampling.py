"""Images made during and after training: validation grids, class images for prior preservation, the final
samples, and logging them to the trackers. The training loop calls these; none of them changes the adapter."""
import shutil
import time

import torch

from waveft.config import RunConfig
from waveft.infer.generation import GenerationJob, generate_images, prompt_seed_jobs, save_grid
from waveft.infer.pipeline import load_pipeline
from waveft.infer.settings import GenerationSettings
from waveft.io.run_folder import RunFolder
from waveft.train import data as dreambooth_data


def validation_prompts(cfg: RunConfig) -> list[str]:
    instance = dreambooth_data.instance_prompt(cfg.data)
    return [p.replace("{instance}", instance) for p in (cfg.validation.prompts or ["{instance}"])]


def validation_settings(cfg: RunConfig, dtype: str) -> GenerationSettings:
    v = cfg.validation
    resolution = v.resolution or cfg.data.resolution
    height, width = v.size or (resolution, resolution)
    return GenerationSettings(**v.sampler(), height=height, width=width, batch_size=len(v.seeds), dtype=dtype,
                              quantize=cfg.model.quantize)


def compute_dtype_name(cfg: RunConfig) -> str:
    return "fp32" if cfg.train.mixed_precision == "no" else cfg.train.mixed_precision


def in_memory_pipeline(components, unet, scheduler_name: str):
    """A StableDiffusionXLPipeline around the models already loaded (no copy, nothing read from disk)."""
    from diffusers import StableDiffusionXLPipeline

    from waveft.infer.pipeline import set_scheduler

    pipe = StableDiffusionXLPipeline(
        vae=components.vae,
        text_encoder=components.text_encoder,
        text_encoder_2=components.text_encoder_2,
        tokenizer=components.tokenizer,
        tokenizer_2=components.tokenizer_2,
        unet=unet,
        scheduler=components.noise_scheduler,
    )
    set_scheduler(pipe, scheduler_name)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_validation(cfg, accelerator, components, unet, step: int) -> str:
    """Sample the validation prompts x seeds with the adapter as it is now; save a grid and log it."""
    out_dir = RunFolder(cfg.output_dir).validation_step(step)
    vae_device, text_device = components.vae.device, components.text_encoder.device
    components.vae.to(accelerator.device)  # the latent cache may have sent it to the CPU
    components.text_encoders_to(accelerator.device)  # idle on the CPU, or training (adapter.text_encoders)
    pipe = in_memory_pipeline(components, accelerator.unwrap_model(unet), cfg.validation.scheduler)
    jobs = prompt_seed_jobs(validation_prompts(cfg), cfg.validation.seeds, step=step)
    with accelerator.autocast():
        rows = generate_images(pipe, jobs, out_dir, validation_settings(cfg, compute_dtype_name(cfg)), progress=False)
    components.text_encoders_to(text_device)
    components.vae.to(vae_device)
    grid = save_grid(rows, out_dir, len(cfg.validation.seeds))
    log_image(accelerator, "validation", grid, step)
    return grid


def log_image(accelerator, tag: str, path: str, step: int) -> None:
    import numpy as np
    from PIL import Image

    image = np.asarray(Image.open(path).convert("RGB"))
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image(tag, image, step, dataformats="HWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({tag: [wandb.Image(image)]}, step=step)


def generate_class_images(cfg, accelerator, components) -> None:
    """Prior preservation: fill the class image folder up to num_class_images with the base model's samples."""
    missing = dreambooth_data.missing_class_image_count(cfg)
    if missing == 0:
        return
    prior = cfg.data.prior_preservation
    folder = dreambooth_data.class_image_dir(cfg)
    pipe = in_memory_pipeline(components, components.unet, "dpmpp_2m").to(accelerator.device)
    components.unet.disable_adapters()  # class images come from the base model
    existing = prior.num_class_images - missing
    seeds = range(existing, existing + missing)
    jobs = [GenerationJob(f"class_{seed:05d}.png", dreambooth_data.class_prompt(cfg.data), seed) for seed in seeds]
    settings = GenerationSettings(steps=prior.generation_steps, height=cfg.data.resolution, width=cfg.data.resolution,
                                  batch_size=prior.generation_batch_size)
    with accelerator.autocast():
        generate_images(pipe, jobs, folder, settings, manifest_name=RunFolder.CLASS_MANIFEST)
    components.unet.enable_adapters()


def wait_for_class_images(cfg, poll_seconds: float = 2.0) -> None:
    """Wait, without a collective (whose timeout a long generation can outlast), until the main process has
    filled the class image folder. Each image is written atomically, so a counted one is complete. If the main
    process dies, the launcher (torchrun, accelerate launch) ends this one."""
    while dreambooth_data.missing_class_image_count(cfg):
        time.sleep(poll_seconds)


def final_samples(cfg: RunConfig) -> str:
    """Reload the saved adapter the way users will (merged into a fresh pipeline) and sample the prompts."""
    run = RunFolder(cfg.output_dir)
    shutil.rmtree(run.samples, ignore_errors=True)  # samples of an earlier adapter (a resumed run) must not be kept
    dtype = compute_dtype_name(cfg)
    pipe = load_pipeline(cfg.model.pretrained, run.adapter, cfg.model.vae,
                         dtype=dtype if torch.cuda.is_available() else "fp32", scheduler=cfg.validation.scheduler,
                         quantize=cfg.model.quantize)
    if cfg.model.prediction_type is not None:  # the training override, which the base model's files lack
        pipe.scheduler.register_to_config(prediction_type=cfg.model.prediction_type)
    rows = generate_images(pipe, prompt_seed_jobs(validation_prompts(cfg), cfg.validation.seeds), run.samples,
                           validation_settings(cfg, dtype), progress=False)
    return save_grid(rows, run.samples, len(cfg.validation.seeds))
