"""The DreamBooth training loop: read `train()` top to bottom to follow one run, its loop to follow one step.

Randomness is keyed by position: data order by (seed, epoch), crops by (seed, epoch, index), each
micro-batch's noise and timesteps by (seed, process, micro-batch number) and its caption dropout by (seed,
micro-batch number). A run resumed from a checkpoint therefore sees exactly what the uninterrupted run would have.
"""
import dataclasses
import os
import random
import resource
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import torch
from tqdm.auto import tqdm

from waveft.adapters.attach import AttachedAdapter, attach_adapter
from waveft.config import RunConfig, config_to_dict, save_config
from waveft.errors import UserError
from waveft.export.run_exports import check_export_fits, export_run, planned_exports
from waveft.infer.generation import MANIFEST_NAME, read_manifest
from waveft.io.adapter_folder import AdapterFolder, add_card_samples, save_adapter
from waveft.io.hub import push_adapter_folder
from waveft.io.run_folder import RunFolder, RunInfo
from waveft.io.schema import read_yaml_mapping
from waveft.models import DTYPES, load_sdxl
from waveft.train import data as dreambooth_data
from waveft.train.checkpointing import list_checkpoints, load_checkpoint, save_checkpoint
from waveft.train.data import TrainingBatch
from waveft.train.latent_cache import LatentCache, Latents, cache_folder, check_writable, use_latent_cache, vae_identity
from waveft.train.loss import Conditioning, LossSettings, mask_weights, micro_batch_loss
from waveft.train.memory_estimate import EstimateUnavailable, estimate_step_memory
from waveft.train.optimizer import build_optimizer
from waveft.train.sampling import final_samples, generate_class_images, log_image, run_validation
from waveft.train.validation_loss import ValidationLoss, plot_losses

# The latent cache changes no number (a cached run equals an uncached one), so it may change too.
SETTINGS_THAT_MAY_CHANGE_ON_RESUME = {"output_dir", "train.resume", "train.max_steps", "overwrite_output_dir",
                                      "data.cache_latents", "data.latent_cache_dir", "export.formats",
                                      "export.lora_rank", "export.lora_energy", "export.dtype", "hub.push",
                                      "hub.repo_id", "hub.private", "train.wandb.project", "train.wandb.name",
                                      "train.wandb.group", "train.wandb.tags"}


TRACKER_PROJECT = "waveft-dreambooth"  # TensorBoard's subfolder of logs/


@dataclass
class TrainResult:
    run_info: RunInfo
    unet: torch.nn.Module  # the trained UNet with its adapter attached (unmerged)


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; nothing after the last good checkpoint is saved."""


@dataclass
class LoopState:
    """Where the loop is; saved in every checkpoint (training_state.json) and restored on resume."""

    global_step: int = 0  # optimizer steps done
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches of `epoch` already used
    micro_step: int = 0  # micro-batches used in all, which keys each one's random draws
    loss: Optional[float] = None  # the last optimizer step's loss, averaged over processes
    train_losses: list = dataclasses.field(default_factory=list)  # [[step, loss], ...]
    validation_losses: list = dataclasses.field(default_factory=list)  # [[step, loss], ...] (validation.loss)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, saved: dict) -> "LoopState":
        return cls(**saved)


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
    saved_config = RunFolder(cfg.output_dir).config
    if not os.path.isfile(saved_config) or cfg.overwrite_output_dir:
        return
    if cfg.train.resume is None:
        raise UserError(
            f"output_dir {cfg.output_dir} already holds a run; set train.resume=latest to continue it "
            f"or overwrite_output_dir=true to replace it"
        )
    # A key the saved config lacks was added to the project after that run started: it had the default.
    previous = {**_flatten(config_to_dict(RunConfig())), **_flatten(read_yaml_mapping(saved_config))}
    current = _flatten(config_to_dict(cfg))
    for key in sorted(set(previous) | set(current)):
        if key not in SETTINGS_THAT_MAY_CHANGE_ON_RESUME and previous.get(key) != current.get(key):
            raise UserError(
                f"output_dir {cfg.output_dir} holds a different run: key '{key}' is {previous.get(key)!r} there, "
                f"{current.get(key)!r} here"
            )


def check_named_paths(cfg: RunConfig) -> None:
    """The folders settings name that the run reads later (after the output folder is started), checked now: a
    refused run must leave its output folder as it found it. The instance folder, model, VAE and checkpoint are
    read before that point and checked where they are read."""
    from waveft.io.images import list_images

    if cfg.validation.loss.every_steps and cfg.validation.loss.images:
        list_images(cfg.validation.loss.images, "validation.loss.images folder")
    class_dir = cfg.data.prior_preservation.class_dir
    if cfg.data.prior_preservation.enabled and class_dir and os.path.exists(class_dir) \
            and not os.path.isdir(class_dir):
        raise UserError(f"data.prior_preservation.class_dir: {class_dir} is a file, not a folder")


def find_resume_checkpoint(cfg: RunConfig):
    if cfg.train.resume is None:
        return None
    if cfg.train.resume == "latest":
        checkpoints = list_checkpoints(cfg.output_dir)
        return checkpoints[-1][1] if checkpoints else None
    if not os.path.isfile(os.path.join(cfg.train.resume, RunFolder.TRAINING_STATE)):
        raise UserError(f"train.resume: {cfg.train.resume} is not a checkpoint folder (no {RunFolder.TRAINING_STATE})")
    return cfg.train.resume


def start_output_dir(cfg: RunConfig) -> None:
    """Clear what a replaced run left (it would be resumed from or kept as done), then save this run's config."""
    run = RunFolder(cfg.output_dir)
    if cfg.overwrite_output_dir and cfg.train.resume is None:
        for _, old in list_checkpoints(cfg.output_dir):
            shutil.rmtree(old)
        for images in (run.samples, run.validation):
            shutil.rmtree(images, ignore_errors=True)
    save_config(cfg, run.config)


# ---- text ------------------------------------------------------------------------------------------------------

EMPTY_PROMPT = ""  # what caption dropout trains on (SDXL's unconditional prompt)


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


def conditioned_prompts(batch: TrainingBatch, caption_dropout: float, seed: int, micro_step: int) -> list[str]:
    """The prompts a micro-batch is trained on: with caption dropout, a `caption_dropout` share of micro-batches
    have their instance rows' prompts replaced by the empty prompt (class rows keep theirs: they are the prior).
    Which ones is decided by (seed, micro-batch number) alone, so a resumed run drops the same micro-batches."""
    prompts = list(batch.prompts)
    if caption_dropout and random.Random(f"caption-dropout/{seed}/{micro_step}").random() < caption_dropout:
        prompts[:batch.num_instance] = [EMPTY_PROMPT] * batch.num_instance
    return prompts


def batch_conditioning(batch: TrainingBatch, prompts: list[str], prompt_embeds: dict, device, dtype) -> Conditioning:
    text = [prompt_embeds[p] for p in prompts]
    return Conditioning(torch.stack([hidden for hidden, _ in text]), torch.stack([pooled for _, pooled in text]),
                        batch.time_ids.to(device, dtype))


def micro_batch_generator(seed: int, process_index: int, micro_step: int) -> torch.Generator:
    """A CPU generator for one micro-batch's draws; CPU draws are the same on every device."""
    return torch.Generator().manual_seed((seed * 1_000_003 + process_index * 7_919 + micro_step) % 2**63)


def stop_if_diverged(accelerator, loss: torch.Tensor, cfg: RunConfig, state: LoopState) -> None:
    """Decided by all processes together, so that none is left waiting in the next all-reduce."""
    if accelerator.gather(torch.isfinite(loss).reshape(1)).all():
        return
    last = list_checkpoints(cfg.output_dir)
    raise TrainingDiverged(
        f"loss became {loss.item() if not torch.isfinite(loss) else 'non-finite on another process'} "
        f"at step {state.global_step + 1}; nothing was saved past "
        f"{last[-1][1] if last else 'the start'}. Lower train.learning_rate or check the data"
    )


def embed_prompts(cfg: RunConfig, components, dataset, device) -> dict:
    """Text conditioning once, {prompt: (hidden states, pooled)}: the encoders are frozen, so it is fixed."""
    prompts = {e.prompt for e in dataset.instances} | {e.prompt for e in dataset.class_examples or []}
    if cfg.validation.loss.every_steps:  # held-out images are conditioned on the instance prompt
        prompts.add(dreambooth_data.instance_prompt(cfg.data))
    if cfg.data.caption_dropout:
        prompts.add(EMPTY_PROMPT)
    prompts = sorted(prompts)
    embeds, pooled = encode_prompts(components, prompts, cfg.model.text_hidden_states, device)
    return {p: (embeds[i], pooled[i]) for i, p in enumerate(prompts)}


# ---- the run ---------------------------------------------------------------------------------------------------


def batches_from(dataloader, dataset, state: LoopState, accelerator):
    """Batches epoch after epoch, from where `state` says (a resumed run skips the batches it already used)."""
    while True:
        dataloader.set_epoch(state.epoch)
        dataset.set_epoch(state.epoch)
        used = state.batches_in_epoch
        for batch in accelerator.skip_first_batches(dataloader, used) if used else dataloader:
            state.batches_in_epoch += 1
            yield batch
        state.epoch += 1
        state.batches_in_epoch = 0


def make_accelerator(cfg: RunConfig):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

    # accelerate keeps one process-wide state; a second train() in this process (a test, a notebook, a sweep)
    # may ask for another mixed precision. The distributed (partial) state is kept.
    AcceleratorState._reset_state()
    return Accelerator(
        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
        mixed_precision=cfg.train.mixed_precision,
        log_with=None if cfg.train.report_to == "none" else cfg.train.report_to,
        project_config=ProjectConfiguration(project_dir=cfg.output_dir, logging_dir=RunFolder(cfg.output_dir).logs),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
    )


def tracker_settings(cfg: RunConfig) -> tuple[str, dict]:
    """accelerate's init_trackers project name and init_kwargs. wandb writes into logs/ and runs offline unless
    WANDB_API_KEY is set (an explicit WANDB_MODE wins); `wandb sync logs/wandb/offline-run-*` uploads later."""
    if cfg.train.report_to != "wandb":
        return TRACKER_PROJECT, {}
    w = cfg.train.wandb
    mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    return w.project, {"wandb": {"dir": RunFolder(cfg.output_dir).logs, "mode": mode, "name": w.name,
                                 "group": w.group, "tags": w.tags or None}}


def memory_estimate_line(cfg: RunConfig) -> str:
    try:
        return estimate_step_memory(cfg).line()
    except EstimateUnavailable as exc:
        return str(exc)


def attach_checked_adapter(cfg: RunConfig, unet, print_main) -> AttachedAdapter:
    """The adapter, checked against the model (loaded in the compute dtype); its trainable weights in fp32."""
    attached = attach_adapter(unet, cfg.resolved_adapter)
    check_export_fits(cfg.export, attached.layers)
    print_main(attached.describe())
    return attached


def peak_memory() -> tuple[int, str]:
    """The run's peak memory: the accelerator's allocations on CUDA, else the process's peak resident set."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(), "cuda_max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "cpu_peak_rss"  # Linux reports KiB


def describe_run(cfg: RunConfig, attached: AttachedAdapter, state: LoopState, train_seconds: float,
                 cache: Optional[LatentCache]) -> RunInfo:
    memory, memory_kind = peak_memory()
    adapter = attached.adapter
    return RunInfo(
        method=adapter.label,
        adapter_type=adapter.type,
        seed=cfg.seed,
        implementation=adapter.implementation,
        budget=adapter.budget,
        trainable_parameters=attached.trainable_parameters,
        adapted_layers=len(attached.layers),
        layer_shapes={layer.name: [layer.out_features, layer.in_features] for layer in attached.layers},
        subject=cfg.data.subject or os.path.basename(os.path.normpath(cfg.data.instance_dir)),
        class_noun=cfg.data.class_noun,
        identifier=cfg.data.identifier,
        instance_prompt=dreambooth_data.instance_prompt(cfg.data),
        base_model=cfg.model.pretrained,
        vae=cfg.model.vae,
        steps=state.global_step,
        final_loss=state.loss,
        train_seconds=round(train_seconds, 2),
        **(attached.budget.run_info() if attached.budget is not None else {}),
        peak_memory_bytes=memory,
        peak_memory_kind=memory_kind,
        train_losses=state.train_losses,
        validation_losses=state.validation_losses or None,
        latent_cache=cache.stats() if cache is not None else None,
    )


@dataclass
class Training:
    """What the loop updates, prepared by accelerate: the adapted UNet, its optimizer, schedule and data."""

    unet: torch.nn.Module
    params: list  # the trainable (adapter) parameters
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    dataloader: object
    ema: object = None  # diffusers' EMAModel of `params` (train.ema), or None

    @contextmanager
    def ema_weights(self):
        """The EMA weights in place of the trained ones for the duration (validation sees what will be saved)."""
        if self.ema is None:
            yield
            return
        self.ema.store(self.params)
        self.ema.copy_to(self.params)
        try:
            yield
        finally:
            self.ema.restore(self.params)


def prepare_training(cfg: RunConfig, accelerator, unet, dataset) -> Training:
    from diffusers.optimization import get_scheduler

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
    if cfg.data.buckets.enabled:  # each batch one bucket
        batches = dreambooth_data.BucketBatchSampler(dataset, cfg.train.batch_size, cfg.seed)
        dataloader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=dreambooth_data.collate,
                                                 num_workers=cfg.data.num_workers)
    else:
        dataloader = torch.utils.data.DataLoader(
            dataset, batch_size=cfg.train.batch_size, shuffle=True, collate_fn=dreambooth_data.collate,
            num_workers=cfg.data.num_workers,
        )
    unet, optimizer, dataloader, lr_scheduler = accelerator.prepare(unet, optimizer, dataloader, lr_scheduler)
    ema = None
    if cfg.train.ema.enabled:
        from diffusers.training_utils import EMAModel

        # The average starts at the weights (decay 0 at its first update), then warms up to train.ema.decay.
        ema = EMAModel(params, decay=cfg.train.ema.decay)
    return Training(unet, params, optimizer, lr_scheduler, dataloader, ema)


def end_of_step(cfg: RunConfig, accelerator, components, training: Training, state: LoopState, progress,
                validation_loss: Optional[ValidationLoss]) -> None:
    """After each optimizer step: update the EMA, show and log the loss, checkpoint and validate when due."""
    step = state.global_step
    ema = cfg.train.ema
    if training.ema is not None and step > ema.update_after_step and step % ema.every == 0:
        training.ema.step(training.params)
    lr = training.lr_scheduler.get_last_lr()[0]
    state.train_losses.append([step, state.loss])
    progress.update(1)
    progress.set_postfix(loss=f"{state.loss:.4f}", lr=f"{lr:.2e}")
    if step % cfg.train.log_every == 0:
        accelerator.log({"loss": state.loss, "lr": lr}, step=step)
    if not accelerator.is_main_process:
        return
    if validation_loss is not None and step % cfg.validation.loss.every_steps == 0:
        with training.ema_weights(), accelerator.autocast():
            state.validation_losses.append([step, validation_loss.evaluate(accelerator.unwrap_model(training.unet))])
        accelerator.log({"validation_loss": state.validation_losses[-1][1]}, step=step)
        plot_losses(RunFolder(cfg.output_dir).loss_plot, state.train_losses, state.validation_losses)
    if cfg.train.checkpointing_steps and step % cfg.train.checkpointing_steps == 0:
        save_checkpoint(cfg.output_dir, step, accelerator.unwrap_model(training.unet), training.optimizer,
                        training.lr_scheduler, accelerator.scaler, state.to_dict(), cfg.train.checkpoints_total_limit,
                        training.ema)
    if cfg.validation.every_steps and step % cfg.validation.every_steps == 0:
        with training.ema_weights():
            run_validation(cfg, accelerator, components, training.unet, step)


def save_run(cfg: RunConfig, accelerator, trained_unet, run_info: RunInfo) -> None:
    """The final adapter in PEFT's format, run_info.json (and loss.png) beside it, then the final samples, which
    the adapter's model card then shows."""
    run = RunFolder(cfg.output_dir)
    if run_info.validation_losses:
        plot_losses(run.loss_plot, run_info.train_losses, run_info.validation_losses)
    run_info.exports = planned_exports(cfg.export, run_info)
    save_adapter(trained_unet, run.adapter, run_info=run_info)
    export_run(run.adapter, run_info.exports, say=accelerator.print)
    run_info.adapter_bytes = AdapterFolder(run.adapter).weights_bytes()
    run_info.write(run.run_info)
    if cfg.validation.final:
        run_info.samples = final_samples(cfg)
        log_image(accelerator, "samples", run_info.samples, run_info.steps)
        made = read_manifest(os.path.join(run.samples, MANIFEST_NAME)).values()
        add_card_samples(run.adapter, [(os.path.join(run.samples, row.file), row.prompt) for row in made], run_info)


def prepare_latents(cfg: RunConfig, accelerator, vae, dataset) -> Latents:
    """Latents from the cache (precomputed when every view is fixed: the VAE then leaves the accelerator) or,
    with data.cache_latents=false, from the VAE at each step."""
    if not use_latent_cache(cfg):
        return Latents(vae, None, accelerator.device)
    latents = Latents(vae, LatentCache(cache_folder(cfg.data), vae_identity(vae)), accelerator.device)
    vae.to(accelerator.device)
    if accelerator.is_main_process:
        latents.precompute(dataset, progress=True)
    accelerator.wait_for_everyone()
    if latents.precompute(dataset, progress=False):  # every view cached now; nothing left to encode
        latents.vae_needed = False
    return latents


def train(cfg: RunConfig) -> TrainResult:
    from accelerate.utils import set_seed

    # Every check that can refuse the run comes before start_output_dir, the first write into output_dir.
    check_output_dir(cfg)
    check_named_paths(cfg)
    if use_latent_cache(cfg):
        check_writable(cache_folder(cfg.data))
    accelerator = make_accelerator(cfg)
    run = RunFolder(cfg.output_dir)
    main = accelerator.is_main_process
    print_main = accelerator.print  # prints on the main process only
    set_seed(cfg.seed)
    weight_dtype = DTYPES[cfg.train.mixed_precision]
    device = accelerator.device
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()

    # Data, models and adapter, all checked before anything is written.
    if main:
        print(memory_estimate_line(cfg))  # before any weight loads: a run that cannot fit says so first
        dreambooth_data.ensure_instance_images(cfg.data)
    accelerator.wait_for_everyone()
    dataset = dreambooth_data.DreamBoothDataset(cfg.data, cfg.seed)
    components = load_sdxl(cfg.model, weight_dtype)
    unet, vae, noise_scheduler = components.unet, components.vae, components.noise_scheduler
    attached = attach_checked_adapter(cfg, unet, print_main)
    resume_from = find_resume_checkpoint(cfg)
    if main:
        start_output_dir(cfg)
    unet.to(device)
    vae.to(device)
    components.text_encoders_to(device, dtype=weight_dtype)

    if cfg.data.prior_preservation.enabled:
        if main:
            generate_class_images(cfg, accelerator, components)
        accelerator.wait_for_everyone()
        dataset.class_examples = dreambooth_data.class_examples(cfg)

    prompt_embeds = embed_prompts(cfg, components, dataset, device)
    if cfg.validation.every_steps:
        components.text_encoders_to("cpu")  # only validation sampling needs them again
    else:  # nothing does (final samples load their own pipeline): free them, 3.3 GB for SDXL in fp32
        components.text_encoder = components.text_encoder_2 = None
    validation_loss = None
    if main and cfg.validation.loss.every_steps:
        validation_loss = ValidationLoss(cfg, dataset, components, prompt_embeds, device, weight_dtype)
    latents_source = prepare_latents(cfg, accelerator, vae, dataset)
    if not latents_source.vae_needed:
        vae.to("cpu")  # every latent is cached: the loop never encodes

    training = prepare_training(cfg, accelerator, unet, dataset)
    if main and cfg.train.report_to != "none":
        hparams = {k: v if isinstance(v, (int, float, str, bool)) else str(v)
                   for k, v in _flatten(config_to_dict(cfg)).items()}
        project, init_kwargs = tracker_settings(cfg)
        os.makedirs(run.logs, exist_ok=True)
        accelerator.init_trackers(project, config=hparams, init_kwargs=init_kwargs)

    state = LoopState()
    if resume_from is not None:
        state = LoopState.from_dict(load_checkpoint(resume_from, accelerator.unwrap_model(training.unet),
                                                    training.optimizer, training.lr_scheduler, accelerator.scaler,
                                                    training.ema))
        if training.ema is not None:
            training.ema.to(device)
        print_main(f"resumed from {resume_from} at step {state.global_step}")
    loss_settings = LossSettings.from_config(cfg, noise_scheduler)
    make_step_hook = attached.method.make_step_hook  # state a method keeps across steps (AdaLoRA's schedule)
    step_hook = make_step_hook(accelerator.unwrap_model(training.unet)) if make_step_hook is not None else None
    progress = tqdm(total=cfg.train.max_steps, initial=state.global_step, desc="training",
                    disable=not accelerator.is_local_main_process)
    started = time.time()
    training.unet.train()

    with progress:  # closed on errors too, so an error message starts on its own line
        for batch in batches_from(training.dataloader, dataset, state, accelerator):
            if state.global_step >= cfg.train.max_steps:
                break
            generator = micro_batch_generator(cfg.seed, accelerator.process_index, state.micro_step)
            prompts = conditioned_prompts(batch, cfg.data.caption_dropout, cfg.seed, state.micro_step)
            state.micro_step += 1
            with accelerator.accumulate(training.unet):
                latents = latents_source.sample(batch, generator, weight_dtype)
                conditioning = batch_conditioning(batch, prompts, prompt_embeds, device, weight_dtype)
                weights = mask_weights(batch.masks.to(device), latents.shape[-2:], cfg.data.masks.min_weight) \
                    if batch.masks is not None else None
                loss = micro_batch_loss(training.unet, noise_scheduler, latents, conditioning, batch.num_instance,
                                        generator, loss_settings, weights)
                stop_if_diverged(accelerator, loss, cfg, state)
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.train.max_grad_norm is not None:
                    accelerator.clip_grad_norm_(training.params, cfg.train.max_grad_norm)
                training.optimizer.step()
                if step_hook is not None and accelerator.sync_gradients:
                    step_hook(accelerator.unwrap_model(training.unet), state.global_step + 1)
                training.lr_scheduler.step()
                training.optimizer.zero_grad(set_to_none=True)
            if accelerator.sync_gradients:
                state.global_step += 1
                state.loss = accelerator.gather(loss.detach()).mean().item()
                end_of_step(cfg, accelerator, components, training, state, progress, validation_loss)

    accelerator.wait_for_everyone()
    run_info = describe_run(cfg, attached, state, time.time() - started, latents_source.cache)
    trained_unet = accelerator.unwrap_model(training.unet)
    if training.ema is not None:  # the final adapter holds the EMA weights; the trained ones are kept beside
        if main:
            save_adapter(trained_unet, run.adapter_raw)
        training.ema.copy_to(training.params)
    # Training state leaves the accelerator, so that the sampling pipeline below has its memory.
    accelerator.free_memory()
    del training
    trained_unet.to("cpu")
    vae.to("cpu")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if main:
        save_run(cfg, accelerator, trained_unet, run_info)
    accelerator.end_training()
    print_main(f"adapter saved to {run.adapter} ({run_info.trainable_parameters:,} trainable parameters)")
    if main and cfg.hub.push:  # last: a failed upload leaves the finished run as it is
        push_adapter_folder(cfg.hub, run.adapter, print_main)
    return TrainResult(run_info, trained_unet)
