"""The DreamBooth training loop: read `train()` top to bottom to follow one run and one step.

Randomness is keyed by position: data order by (seed, epoch), crops by (seed, epoch, index), and each
micro-batch's noise and timesteps by (seed, process, micro-batch number). A run resumed from a checkpoint
therefore sees exactly what the uninterrupted run would have.
"""
import importlib.util
import os
import shutil
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from waveft import data as dreambooth_data
from waveft.adapters.attach import attach_adapter
from waveft.checkpointing import (
    list_checkpoints,
    load_checkpoint,
    save_adapter,
    save_checkpoint,
)
from waveft.config import RunConfig, config_to_dict, save_config
from waveft.errors import UserError
from waveft.files import write_json_atomic
from waveft.generate import GenerationSettings, generate_images, load_pipeline, prompt_seed_jobs, save_grid
from waveft.models import DTYPES, load_sdxl
from waveft.schema import read_yaml_mapping

SETTINGS_THAT_MAY_CHANGE_ON_RESUME = {"output_dir", "train.resume", "train.max_steps", "overwrite_output_dir"}


@dataclass
class TrainResult:
    run_info: dict
    unet: torch.nn.Module  # the trained UNet with its adapter attached (unmerged)


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; nothing after the last good checkpoint is saved."""


# ---- output folder -------------------------------------------------------------------------------------------


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key != "peft":
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_output_dir(cfg: RunConfig) -> None:
    """Refuse to write into a folder that holds a run, unless resuming that same run or told to overwrite."""
    saved_config = os.path.join(cfg.output_dir, "config.yaml")
    if not os.path.isfile(saved_config) or cfg.overwrite_output_dir:
        return
    if cfg.train.resume is None:
        raise UserError(
            f"output_dir {cfg.output_dir} already holds a run; set train.resume=latest to continue it "
            f"or overwrite_output_dir=true to replace it"
        )
    previous = _flatten(read_yaml_mapping(saved_config))
    current = _flatten(config_to_dict(cfg))
    for key in sorted(set(previous) | set(current)):
        if key not in SETTINGS_THAT_MAY_CHANGE_ON_RESUME and previous.get(key) != current.get(key):
            raise UserError(
                f"output_dir {cfg.output_dir} holds a different run: key '{key}' is {previous.get(key)!r} there, "
                f"{current.get(key)!r} here"
            )


def find_resume_checkpoint(cfg: RunConfig):
    if cfg.train.resume is None:
        return None
    if cfg.train.resume == "latest":
        checkpoints = list_checkpoints(cfg.output_dir)
        return checkpoints[-1][1] if checkpoints else None
    if not os.path.isfile(os.path.join(cfg.train.resume, "training_state.json")):
        raise UserError(f"train.resume: {cfg.train.resume} is not a checkpoint folder (no training_state.json)")
    return cfg.train.resume


# ---- text ------------------------------------------------------------------------------------------------------


@torch.no_grad()
def encode_prompts(components, prompts: list[str], mode: str, device) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL's text conditioning: both encoders' hidden states concatenated, plus encoder 2's pooled projection."""
    hidden_states = []
    for index, (tokenizer, encoder) in enumerate(
        [(components.tokenizer, components.text_encoder), (components.tokenizer_2, components.text_encoder_2)]
    ):
        ids = tokenizer(
            prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(device)
        output = encoder(ids, output_hidden_states=True)
        use_last = mode == "paper" and index == 0  # the paper's training quirk: encoder 1's last_hidden_state
        hidden_states.append(output.last_hidden_state if use_last else output.hidden_states[-2])
        pooled = output[0]  # text_encoder_2's projected pooled embedding (kept from the last encoder)
    return torch.cat(hidden_states, dim=-1), pooled


# ---- validation ------------------------------------------------------------------------------------------------


def validation_prompts(cfg: RunConfig) -> list[str]:
    instance = dreambooth_data.instance_prompt(cfg.data)
    return [p.replace("{instance}", instance) for p in (cfg.validation.prompts or ["{instance}"])]


def validation_settings(cfg: RunConfig, dtype: str) -> GenerationSettings:
    v = cfg.validation
    resolution = v.resolution or cfg.data.resolution
    return GenerationSettings(
        scheduler=v.scheduler,
        steps=v.steps,
        guidance_scale=v.guidance_scale,
        negative_prompt=v.negative_prompt,
        height=resolution,
        width=resolution,
        batch_size=len(v.seeds),
        dtype=dtype,
    )


def compute_dtype_name(cfg: RunConfig) -> str:
    return "fp32" if cfg.train.mixed_precision == "no" else cfg.train.mixed_precision


def in_memory_pipeline(components, unet, scheduler_name: str):
    from diffusers import StableDiffusionXLPipeline

    from waveft.generate import set_scheduler

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
    out_dir = os.path.join(cfg.output_dir, "validation", f"step-{step:06d}")
    components.text_encoders_to(accelerator.device)
    pipe = in_memory_pipeline(components, accelerator.unwrap_model(unet), cfg.validation.scheduler)
    jobs = prompt_seed_jobs(validation_prompts(cfg), cfg.validation.seeds, step=step)
    with accelerator.autocast():
        rows = generate_images(pipe, jobs, out_dir, validation_settings(cfg, compute_dtype_name(cfg)), progress=False)
    components.text_encoders_to("cpu")
    grid = os.path.join(out_dir, "grid.png")
    save_grid([os.path.join(out_dir, r["file"]) for r in rows], grid, len(cfg.validation.seeds))
    _log_image(accelerator, "validation", grid, step)
    return grid


def _log_image(accelerator, tag: str, path: str, step: int) -> None:
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
    jobs = [{"file": f"class_{seed:05d}.png", "prompt": dreambooth_data.class_prompt(cfg.data), "seed": seed}
            for seed in seeds]
    settings = GenerationSettings(steps=prior.generation_steps, height=cfg.data.resolution, width=cfg.data.resolution,
                                  batch_size=prior.generation_batch_size)
    with accelerator.autocast():
        generate_images(pipe, jobs, folder, settings, manifest_name="class_manifest.jsonl")
    components.unet.enable_adapters()


# ---- the run ---------------------------------------------------------------------------------------------------


def batches_from(dataloader, dataset, state: dict, accelerator):
    """Batches epoch after epoch, from where `state` says (a resumed run skips the batches it already used)."""
    while True:
        dataloader.set_epoch(state["epoch"])
        dataset.set_epoch(state["epoch"])
        used = state["batches_in_epoch"]
        for batch in accelerator.skip_first_batches(dataloader, used) if used else dataloader:
            state["batches_in_epoch"] += 1
            yield batch
        state["epoch"] += 1
        state["batches_in_epoch"] = 0


def micro_batch_generator(seed: int, process_index: int, micro_step: int) -> torch.Generator:
    """A CPU generator for one micro-batch's draws; CPU draws are the same on every device."""
    return torch.Generator().manual_seed((seed * 1_000_003 + process_index * 7_919 + micro_step) % 2**63)


def build_optimizer(cfg: RunConfig, params):
    t = cfg.train
    kwargs = dict(lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), weight_decay=t.adam_weight_decay,
                  eps=t.adam_epsilon)
    if t.optimizer == "adamw_8bit":
        try:
            import bitsandbytes
        except ImportError:
            raise UserError("train.optimizer=adamw_8bit needs bitsandbytes: pip install bitsandbytes") from None
        return bitsandbytes.optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


def train(cfg: RunConfig) -> TrainResult:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import compute_snr

    check_output_dir(cfg)
    # accelerate keeps one process-wide state; a second train() in this process (a test, a notebook, a sweep)
    # may ask for another mixed precision. The distributed (partial) state is kept.
    AcceleratorState._reset_state()
    if cfg.train.report_to == "wandb":
        if importlib.util.find_spec("wandb") is None:
            raise UserError("train.report_to=wandb needs the wandb package: pip install wandb (or use tensorboard)")
        os.environ.setdefault("WANDB_MODE", "offline" if "WANDB_API_KEY" not in os.environ else "online")
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
        mixed_precision=cfg.train.mixed_precision,
        log_with=None if cfg.train.report_to == "none" else cfg.train.report_to,
        project_config=ProjectConfiguration(project_dir=cfg.output_dir,
                                            logging_dir=os.path.join(cfg.output_dir, "logs")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
    )
    main = accelerator.is_main_process
    say = accelerator.print
    set_seed(cfg.seed)
    weight_dtype = DTYPES[cfg.train.mixed_precision]
    device = accelerator.device

    # Data, models and adapter, all checked before anything is written.
    if main:
        dreambooth_data.ensure_instance_images(cfg.data)
    accelerator.wait_for_everyone()
    dataset = dreambooth_data.DreamBoothDataset(cfg.data, cfg.seed)
    components = load_sdxl(cfg.model)
    # The adapter, checked against the model: frozen base weights in the compute dtype, trainable ones in fp32.
    unet = components.unet
    if unet.dtype != weight_dtype:
        unet.to(dtype=weight_dtype)
    attached = attach_adapter(unet, cfg.adapter, total_steps=cfg.train.max_steps)
    say(attached.describe())
    resume_from = find_resume_checkpoint(cfg)
    if main:
        if cfg.overwrite_output_dir and cfg.train.resume is None:
            # The replaced run's checkpoints and images would otherwise be resumed from or kept as done.
            for _, old in list_checkpoints(cfg.output_dir):
                shutil.rmtree(old)
            for images in ("samples", "validation"):
                shutil.rmtree(os.path.join(cfg.output_dir, images), ignore_errors=True)
        save_config(cfg, os.path.join(cfg.output_dir, "config.yaml"))
    unet.to(device)
    components.vae.to(device)
    components.text_encoders_to(device, dtype=weight_dtype)

    if cfg.data.prior_preservation.enabled:
        if main:
            generate_class_images(cfg, accelerator, components)
        accelerator.wait_for_everyone()
        dataset.class_examples = dreambooth_data.class_examples(cfg)

    # Text conditioning once: the encoders are frozen, so every prompt's embedding is fixed.
    prompts = sorted({e.prompt for e in dataset.instances} | {e.prompt for e in dataset.class_examples or []})
    embeds, pooled = encode_prompts(components, prompts, cfg.model.text_hidden_states, device)
    prompt_embeds = {p: (embeds[i], pooled[i]) for i, p in enumerate(prompts)}
    components.text_encoders_to("cpu")  # only validation needs them again

    if cfg.train.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = build_optimizer(cfg, params)
    lr_scheduler = get_scheduler(
        cfg.train.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=cfg.train.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=cfg.train.max_steps * accelerator.num_processes,
    )
    dataloader = torch.utils.data.DataLoader(
        dataset, batch_size=cfg.train.batch_size, shuffle=True, collate_fn=dreambooth_data.collate,
        num_workers=cfg.data.num_workers,
    )
    unet, optimizer, dataloader, lr_scheduler = accelerator.prepare(unet, optimizer, dataloader, lr_scheduler)
    if main and cfg.train.report_to != "none":
        hparams = {k: v if isinstance(v, (int, float, str, bool)) else str(v)
                   for k, v in _flatten(config_to_dict(cfg)).items()}
        accelerator.init_trackers("waveft-dreambooth", config=hparams)

    state = {"global_step": 0, "epoch": 0, "batches_in_epoch": 0, "micro_step": 0, "loss": None}
    if resume_from is not None:
        state = load_checkpoint(resume_from, accelerator.unwrap_model(unet), optimizer, lr_scheduler,
                                accelerator.scaler)
        say(f"resumed from {resume_from} at step {state['global_step']}")
    noise_scheduler = components.noise_scheduler
    vae = components.vae
    step_hook = attached.method.step_hook
    prediction_type = noise_scheduler.config.prediction_type
    progress = tqdm(total=cfg.train.max_steps, initial=state["global_step"], desc="training",
                    disable=not accelerator.is_local_main_process)
    started = time.time()
    unet.train()

    with progress:  # closed on errors too, so an error message starts on its own line
        for batch in batches_from(dataloader, dataset, state, accelerator):
            if state["global_step"] >= cfg.train.max_steps:
                break
            g = micro_batch_generator(cfg.seed, accelerator.process_index, state["micro_step"])
            state["micro_step"] += 1
            with accelerator.accumulate(unet):
                # 1. Images to latents (the VAE runs in its own dtype, fp32 by default).
                with torch.no_grad():
                    pixels = batch["pixels"].to(device, dtype=vae.dtype)
                    latents = vae.encode(pixels).latent_dist.sample(generator=g)
                    latents = (latents * vae.config.scaling_factor).to(weight_dtype)
                # 2. Noise them at a random timestep.
                noise = torch.randn(latents.shape, generator=g).to(device, weight_dtype)
                if cfg.train.noise_offset:
                    noise += cfg.train.noise_offset * torch.randn(latents.shape[:2] + (1, 1), generator=g).to(noise)
                timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                                          generator=g)
                timesteps = timesteps.to(device)
                noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
                # 3. Predict the noise (or velocity) with the adapted UNet.
                text = [prompt_embeds[p] for p in batch["prompts"]]
                model_pred = unet(
                    noisy_latents,
                    timesteps,
                    encoder_hidden_states=torch.stack([t[0] for t in text]),
                    added_cond_kwargs={
                        "text_embeds": torch.stack([t[1] for t in text]),
                        "time_ids": batch["time_ids"].to(device, weight_dtype),
                    },
                ).sample
                target = (noise if prediction_type == "epsilon"
                          else noise_scheduler.get_velocity(latents, noise, timesteps))
                # 4. MSE per sample, optionally Min-SNR weighted; prior preservation on the class half.
                per_sample = F.mse_loss(model_pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
                if cfg.train.snr_gamma is not None:
                    snr = compute_snr(noise_scheduler, timesteps)
                    clipped = torch.clamp(snr, max=cfg.train.snr_gamma)
                    per_sample = per_sample * (clipped / snr if prediction_type == "epsilon" else clipped / (snr + 1))
                n = batch["num_instance"]
                loss = per_sample[:n].mean()
                if per_sample.shape[0] > n:
                    loss = loss + cfg.data.prior_preservation.loss_weight * per_sample[n:].mean()
                # Decided by all processes together, so that none is left waiting in the next all-reduce.
                if not accelerator.gather(torch.isfinite(loss).reshape(1)).all():
                    last = list_checkpoints(cfg.output_dir)
                    raise TrainingDiverged(
                        f"loss became {loss.item() if not torch.isfinite(loss) else 'non-finite on another process'} "
                        f"at step {state['global_step'] + 1}; nothing was saved past "
                        f"{last[-1][1] if last else 'the start'}. Lower train.learning_rate or check the data"
                    )
                # 5. Backward, clip, step.
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.train.max_grad_norm is not None:
                    accelerator.clip_grad_norm_(params, cfg.train.max_grad_norm)
                optimizer.step()
                if step_hook is not None and accelerator.sync_gradients:
                    step_hook(accelerator.unwrap_model(unet), state["global_step"] + 1)
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)

            if not accelerator.sync_gradients:
                continue
            # One optimizer step done: count, log, checkpoint, validate.
            state["global_step"] = step = state["global_step"] + 1
            state["loss"] = accelerator.gather(loss.detach()).mean().item()
            lr = lr_scheduler.get_last_lr()[0]
            progress.update(1)
            progress.set_postfix(loss=f"{state['loss']:.4f}", lr=f"{lr:.2e}")
            if step % cfg.train.log_every == 0:
                accelerator.log({"loss": state["loss"], "lr": lr}, step=step)
            if main and cfg.train.checkpointing_steps and step % cfg.train.checkpointing_steps == 0:
                save_checkpoint(cfg.output_dir, step, accelerator.unwrap_model(unet), optimizer, lr_scheduler,
                                accelerator.scaler, state, cfg.train.checkpoints_total_limit)
            if main and cfg.validation.every_steps and step % cfg.validation.every_steps == 0:
                run_validation(cfg, accelerator, components, unet, step)

    # The final adapter in PEFT's format, with what a reader of the run needs beside it.
    accelerator.wait_for_everyone()
    run_info = {
        "method": cfg.adapter.label or cfg.adapter.type,
        "adapter_type": cfg.adapter.type,
        "seed": cfg.seed,
        "implementation": cfg.adapter.implementation,
        "budget": cfg.adapter.budget,
        "trainable_parameters": attached.trainable_parameters,
        "adapted_layers": len(attached.layers),
        "subject": cfg.data.subject or os.path.basename(os.path.normpath(cfg.data.instance_dir)),
        "class_noun": cfg.data.class_noun,
        "identifier": cfg.data.identifier,
        "instance_prompt": dreambooth_data.instance_prompt(cfg.data),
        "base_model": cfg.model.pretrained,
        "vae": cfg.model.vae,
        "steps": state["global_step"],
        "final_loss": state["loss"],
        "train_seconds": round(time.time() - started, 2),
        **(attached.budget.run_info() if attached.budget is not None else {}),
    }
    trained_unet = accelerator.unwrap_model(unet)
    # Training state leaves the accelerator, so that the sampling pipeline below has its memory.
    accelerator.free_memory()
    del optimizer, lr_scheduler, unet
    trained_unet.to("cpu")
    vae.to("cpu")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if main:
        save_adapter(trained_unet, os.path.join(cfg.output_dir, "adapter"), metadata=run_info)
        write_json_atomic(os.path.join(cfg.output_dir, "run_info.json"), run_info)
        if cfg.validation.final:
            run_info["samples"] = final_samples(cfg)
            _log_image(accelerator, "samples", run_info["samples"], state["global_step"])
    accelerator.end_training()
    say(f"adapter saved to {os.path.join(cfg.output_dir, 'adapter')} "
        f"({attached.trainable_parameters:,} trainable parameters)")
    return TrainResult(run_info, trained_unet)


def final_samples(cfg: RunConfig) -> str:
    """Reload the saved adapter the way users will (merged into a fresh pipeline) and sample the prompts."""
    out_dir = os.path.join(cfg.output_dir, "samples")
    shutil.rmtree(out_dir, ignore_errors=True)  # samples of an earlier adapter (a resumed run) must not be kept
    dtype = compute_dtype_name(cfg)
    pipe = load_pipeline(cfg.model.pretrained, os.path.join(cfg.output_dir, "adapter"), cfg.model.vae,
                         dtype=dtype if torch.cuda.is_available() else "fp32", scheduler=cfg.validation.scheduler)
    if cfg.model.prediction_type is not None:  # the training override, which the base model's files lack
        pipe.scheduler.register_to_config(prediction_type=cfg.model.prediction_type)
    rows = generate_images(pipe, prompt_seed_jobs(validation_prompts(cfg), cfg.validation.seeds), out_dir,
                           validation_settings(cfg, dtype), progress=False)
    grid = os.path.join(out_dir, "grid.png")
    save_grid([os.path.join(out_dir, r["file"]) for r in rows], grid, len(cfg.validation.seeds))
    return grid
