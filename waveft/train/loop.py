"""The DreamBooth training loop: read `train()` top to bottom to follow one run, its loop to follow one step.

Randomness is keyed by what it is for, never by which process or micro-batch happens to draw it: the data
order by (seed, epoch) in effective batches (all processes x accumulation steps x batch size), crops by
(seed, epoch, index), and each sample's posterior noise, noise, timestep and caption dropout by (seed, optimizer
step, its position in the effective batch). A run resumed from a checkpoint therefore sees exactly what the
uninterrupted run would have, and 2 processes x accumulation 2 train the same adapter (to float rounding) as
1 process x accumulation 4.
"""
import dataclasses
import os
import random
import resource
import secrets
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import torch
from tqdm.auto import tqdm

from waveft.adapters.attach import AttachedAdapter, attach_adapter, attach_text_encoder_adapter, format_model_table
from waveft.config import RunConfig, config_to_dict, save_config
from waveft.errors import UserError
from waveft.export.run_exports import check_export_fits, export_run, planned_exports
from waveft.infer.generation import MANIFEST_NAME, read_manifest
from waveft.io.adapter_folder import AdapterFolder, add_card_samples, save_adapter
from waveft.io.files import write_text_atomic
from waveft.io.hub import push_adapter_folder
from waveft.io.run_folder import RunFolder, RunInfo
from waveft.io.schema import read_yaml_mapping
from waveft.models import DTYPES, encode_token_ids, load_sdxl
from waveft.train import data as dreambooth_data
from waveft.train import sampling
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
    # adapter.text_encoders: {component: the trained text encoder, its adapter attached (unmerged)}; else {}
    text_encoders: dict = dataclasses.field(default_factory=dict)


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; nothing after the last good checkpoint is saved."""


@dataclass
class LoopState:
    """Where the loop is; saved in every checkpoint (training_state.json) and restored on resume."""

    global_step: int = 0  # optimizer steps done
    epoch: int = 0
    steps_in_epoch: int = 0  # effective batches of `epoch` already used
    loss: Optional[float] = None  # the last optimizer step's loss, averaged over its micro-batches and processes
    train_losses: list = dataclasses.field(default_factory=list)  # [[step, loss], ...]
    validation_losses: list = dataclasses.field(default_factory=list)  # [[step, loss], ...] (validation.loss)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, saved: dict, path: str) -> "LoopState":
        unknown = set(saved) - {f.name for f in dataclasses.fields(cls)}
        if unknown:  # e.g. `micro_step`: its run drew its randomness by micro-batch, so it cannot go on exactly
            raise UserError(f"train.resume: {path} was written by an older trainer (its state has "
                            f"{', '.join(sorted(unknown))}); start a new run")
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


def encode_prompts(components, prompts: list[str], mode: str, device,
                   encoders: Optional[list] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL's text conditioning of `prompts` (`encode_token_ids` after each encoder's tokenizer). `encoders`: the
    two text encoders to run in place of components' (the accelerate-prepared ones while they train)."""
    ids = [tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids.to(device)
           for tokenizer in (components.tokenizer, components.tokenizer_2)]
    return encode_token_ids(encoders or [components.text_encoder, components.text_encoder_2], ids, mode)


def conditioned_prompts(batch: TrainingBatch, caption_dropout: float, seed: int, step: int,
                        positions: range) -> list[str]:
    """The prompts a micro-batch is trained on: with caption dropout, a `caption_dropout` share of instance rows
    have their prompt replaced by the empty prompt (class rows keep theirs: they are the prior). Which ones is
    decided by (seed, optimizer step, the sample's position in the effective batch) alone, so a resumed run, or
    the same run split over other processes, drops the same samples."""
    prompts = list(batch.prompts)
    for row, position in enumerate(positions):
        if caption_dropout and random.Random(f"caption-dropout/{seed}/{step}/{position}").random() < caption_dropout:
            prompts[row] = EMPTY_PROMPT
    return prompts


class PromptConditioning:
    """The text conditioning of prompts, `(prompts) -> (hidden states, pooled)` as `encode_prompts` gives them.

    Frozen encoders (`frozen_prompts` given): the run's prompts are encoded once, without gradients, and each call
    looks them up. Trained encoders (adapter.text_encoders): each call runs `encoders` (the prepared ones in the
    training loop, the bare ones for an evaluation on one process) with gradients through their adapters.
    """

    def __init__(self, components, mode: str, device, encoders: Optional[list] = None,
                 frozen_prompts: Optional[list[str]] = None):
        self.components, self.mode, self.device, self.encoders = components, mode, device, encoders
        self.frozen = None
        if frozen_prompts is not None:
            with torch.no_grad():
                embeds, pooled = encode_prompts(components, frozen_prompts, mode, device)
            self.frozen = {p: (embeds[i], pooled[i]) for i, p in enumerate(frozen_prompts)}

    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.frozen is None:
            return encode_prompts(self.components, prompts, self.mode, self.device, self.encoders)
        text = [self.frozen[p] for p in prompts]
        return torch.stack([hidden for hidden, _ in text]), torch.stack([pooled for _, pooled in text])

    def running(self, encoders: list) -> "PromptConditioning":
        """The same conditioning through other modules of the same encoders (frozen: itself)."""
        if self.frozen is not None:
            return self
        return PromptConditioning(self.components, self.mode, self.device, encoders)


def batch_conditioning(batch: TrainingBatch, prompts: list[str], text: PromptConditioning, device,
                       dtype) -> Conditioning:
    hidden, pooled = text(prompts)
    return Conditioning(hidden, pooled, batch.time_ids.to(device, dtype))


def sample_generators(seed: int, step: int, positions: range, class_rows: bool) -> list[torch.Generator]:
    """One CPU generator per row of a micro-batch (CPU draws are the same on every device), keyed by the optimizer
    step and the sample's position in the effective batch; a class row (prior preservation) has its own key beside
    its instance row's. Rows: the instance samples at `positions`, then (class_rows) their class samples."""
    roles = (0, 1) if class_rows else (0,)
    return [torch.Generator().manual_seed((((seed * 1_000_003 + step) << 20) + (position << 1) + role) % 2**63)
            for role in roles for position in positions]


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


def frozen_prompt_conditioning(cfg: RunConfig, components, dataset, device) -> PromptConditioning:
    """Text conditioning once for every prompt the run uses: the encoders are frozen, so it is fixed."""
    prompts = {e.prompt for e in dataset.instances} | {e.prompt for e in dataset.class_examples or []}
    if cfg.validation.loss.every_steps:  # held-out images are conditioned on the instance prompt
        prompts.add(dreambooth_data.instance_prompt(cfg.data))
    if cfg.data.caption_dropout:
        prompts.add(EMPTY_PROMPT)
    return PromptConditioning(components, cfg.model.text_hidden_states, device, frozen_prompts=sorted(prompts))


# ---- the run ---------------------------------------------------------------------------------------------------


def batches_from(cfg: RunConfig, dataset, layout: dreambooth_data.BatchLayout, process_index: int,
                 state: LoopState):
    """This process's micro-batches, epoch after epoch, from where `state` says (a resumed run starts at the first
    effective batch it has not used; the loop counts `state.steps_in_epoch`). Every process computes the same
    effective batches and takes its share, so no sampler of accelerate's shards (or tops up) them."""
    while True:
        dataset.set_epoch(state.epoch)
        effective = dreambooth_data.effective_batches(dataset, layout.size, cfg.seed, state.epoch)
        yield from torch.utils.data.DataLoader(
            dataset, batch_sampler=layout.micro_batches(effective[state.steps_in_epoch:], process_index),
            collate_fn=dreambooth_data.collate, num_workers=cfg.data.num_workers,
        )
        state.epoch += 1
        state.steps_in_epoch = 0


def make_accelerator(cfg: RunConfig):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    # accelerate keeps one process-wide state; a second train() in this process (a test, a notebook, a sweep)
    # may ask for another mixed precision. The distributed (partial) state is kept.
    AcceleratorState._reset_state()
    # Trained text encoders have adapted layers whose output SDXL never reads (text_encoder's last layer: the
    # UNet is conditioned on its penultimate hidden state), so DDP must not wait for their gradients.
    unused = [DistributedDataParallelKwargs(find_unused_parameters=True)] if cfg.adapter.text_encoders.enabled else []
    return Accelerator(
        kwargs_handlers=unused,
        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
        mixed_precision=cfg.train.mixed_precision,
        log_with=None if cfg.train.report_to == "none" else cfg.train.report_to,
        project_config=ProjectConfiguration(project_dir=cfg.output_dir, logging_dir=RunFolder(cfg.output_dir).logs),
    )


def tracker_settings(cfg: RunConfig, resuming: bool) -> tuple[str, dict]:
    """accelerate's init_trackers project name and init_kwargs. wandb writes into logs/ and runs offline unless
    WANDB_API_KEY is set (an explicit WANDB_MODE wins); `wandb sync logs/wandb/offline-run-*` uploads later. A
    resumed run goes on in the wandb run it started (its id kept in logs/), so its curves stay one."""
    if cfg.train.report_to != "wandb":
        return TRACKER_PROJECT, {}
    w = cfg.train.wandb
    mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    id_file = RunFolder(cfg.output_dir).wandb_run_id
    if resuming and os.path.isfile(id_file):
        with open(id_file) as f:
            run_id = f.read().strip()
    else:
        run_id = secrets.token_hex(6)  # wandb's ids are short lowercase alphanumerics, unique per project
        write_text_atomic(id_file, run_id)
    return w.project, {"wandb": {"dir": RunFolder(cfg.output_dir).logs, "mode": mode, "name": w.name,
                                 "group": w.group, "tags": w.tags or None, "id": run_id, "resume": "allow"}}


def memory_estimate_line(cfg: RunConfig) -> str:
    try:
        return estimate_step_memory(cfg).line()
    except EstimateUnavailable as exc:
        return str(exc)


@dataclass
class AttachedModels:
    """What the run adapts: the UNet, and with adapter.text_encoders both text encoders."""

    unet: AttachedAdapter
    text_encoders: dict  # {component (AdapterFolder.TEXT_ENCODERS): AttachedAdapter}; {} when they are frozen


def attach_checked_adapters(cfg: RunConfig, components, print_main) -> AttachedModels:
    """The adapter on the UNet and, with adapter.text_encoders, on both text encoders (each sized to its own
    layers), checked against the model (loaded in the compute dtype); their trainable weights in fp32. Prints
    the UNet's per-shape table, and with text encoders the per-model table."""
    unet = attach_adapter(components.unet, cfg.resolved_adapter)
    check_export_fits(cfg.export, unet.layers)
    print_main(unet.describe())
    text_adapter = cfg.text_encoder_adapter()
    if text_adapter is None:
        return AttachedModels(unet, {})
    text_encoders = {name: attach_text_encoder_adapter(getattr(components, name), name, text_adapter)
                     for name in AdapterFolder.TEXT_ENCODERS}
    print_main(format_model_table({"UNet": unet, **text_encoders}))
    return AttachedModels(unet, text_encoders)


def adapter_record(attached: AttachedAdapter) -> dict:
    """One model's adapter in run_info.json: the UNet's at the record's top level, each text encoder's under
    `text_encoders.<component>`."""
    return {"trainable_parameters": attached.trainable_parameters, "adapted_layers": len(attached.layers),
            "layer_shapes": {layer.name: [layer.out_features, layer.in_features] for layer in attached.layers},
            **(attached.budget.run_info() if attached.budget is not None else {})}


def peak_memory() -> tuple[int, str]:
    """The run's peak memory: the accelerator's allocations on CUDA, else the process's peak resident set."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(), "cuda_max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "cpu_peak_rss"  # Linux reports KiB


@dataclass
class ThisRun:
    """What this invocation did, as opposed to the run's total: a resumed run starts at its checkpoint's step and
    trains only the micro-batches after it (what the resume tests check)."""

    processes: int
    first_step: int
    micro_batches_trained: int = 0  # this process's UNet training forwards


def describe_run(cfg: RunConfig, models: AttachedModels, state: LoopState, train_seconds: float,
                 cache: Optional[LatentCache], work: ThisRun) -> RunInfo:
    memory, memory_kind = peak_memory()
    attached = models.unet
    adapter = attached.adapter
    return RunInfo(
        method=adapter.label,
        adapter_type=adapter.type,
        seed=cfg.seed,
        implementation=adapter.implementation,
        budget=adapter.budget,
        **adapter_record(attached),
        text_encoders={name: adapter_record(a) for name, a in models.text_encoders.items()} or None,
        subject=cfg.data.subject or os.path.basename(os.path.normpath(cfg.data.instance_dir)),
        class_noun=cfg.data.class_noun,
        identifier=cfg.data.identifier,
        instance_prompt=dreambooth_data.instance_prompt(cfg.data),
        base_model=cfg.model.pretrained,
        vae=cfg.model.vae,
        steps=state.global_step,
        final_loss=state.loss,
        train_seconds=round(train_seconds, 2),
        peak_memory_bytes=memory,
        peak_memory_kind=memory_kind,
        train_losses=state.train_losses,
        validation_losses=state.validation_losses or None,
        latent_cache=cache.stats() if cache is not None else None,
        processes=work.processes,
        first_step=work.first_step,
        micro_batches_trained=work.micro_batches_trained,
    )


@dataclass
class Training:
    """What the loop updates, prepared by accelerate: the adapted UNet (and text encoders), their optimizer and
    schedule; and how each step's samples are laid out."""

    unet: torch.nn.Module
    params: list  # the trainable (adapter) parameters: the UNet's, then the text encoders'
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    layout: dreambooth_data.BatchLayout  # how each optimizer step's samples are split over processes and micro-batches
    # adapter.text_encoders: {component: the adapted encoder} as saved, and the same encoders as accelerate
    # prepared them (what the loop runs, so that their gradients are synchronised); else {} and [].
    text_encoders: dict = dataclasses.field(default_factory=dict)
    prepared_text_encoders: list = dataclasses.field(default_factory=list)
    ema: object = None  # diffusers' EMAModel of `params` (train.ema), or None
    step_hook: object = None  # the method's state across steps, called after each optimizer step (AdaLoRA), or None

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


def prepare_training(cfg: RunConfig, accelerator, unet, text_encoders: dict) -> Training:
    """`text_encoders`: {component: adapted encoder} when they train (their adapters are a parameter group with
    adapter.text_encoders.learning_rate), else {}."""
    from diffusers.optimization import get_scheduler

    if cfg.train.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet_params = [p for p in unet.parameters() if p.requires_grad]
    text_params = [p for encoder in text_encoders.values() for p in encoder.parameters() if p.requires_grad]
    groups = [{"params": unet_params}]
    if text_params:
        groups.append({"params": text_params, "lr": cfg.text_encoder_learning_rate()})
    params = unet_params + text_params
    optimizer = build_optimizer(cfg, groups)
    lr_scheduler = get_scheduler(
        cfg.train.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=cfg.train.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=cfg.train.max_steps * accelerator.num_processes,
    )
    layout = dreambooth_data.BatchLayout(cfg.train.batch_size, cfg.train.gradient_accumulation_steps,
                                         accelerator.num_processes)
    unet, optimizer, lr_scheduler, *prepared_text_encoders = accelerator.prepare(unet, optimizer, lr_scheduler,
                                                                                 *text_encoders.values())
    ema = None
    if cfg.train.ema.enabled:
        from diffusers.training_utils import EMAModel

        # The average starts at the weights (decay 0 at its first update), then warms up to train.ema.decay.
        ema = EMAModel(params, decay=cfg.train.ema.decay)
    return Training(unet, params, optimizer, lr_scheduler, layout, text_encoders, prepared_text_encoders, ema)


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
        path = save_checkpoint(cfg.output_dir, step, accelerator.unwrap_model(training.unet), training.optimizer,
                               training.lr_scheduler, accelerator.scaler, state.to_dict(),
                               cfg.train.checkpoints_total_limit, training.ema, training.step_hook,
                               training.text_encoders)
        progress.write(f"saved {path}")  # from whichever process saves: the log shows that only one does
    if cfg.validation.every_steps and step % cfg.validation.every_steps == 0:
        with training.ema_weights():
            run_validation(cfg, accelerator, components, training.unet, step)


def save_run(cfg: RunConfig, accelerator, trained_unet, text_encoders: dict, run_info: RunInfo) -> None:
    """The final adapter in PEFT's format (with `text_encoders`, {component: trained encoder}, in its
    subfolders), run_info.json and loss.png beside it, then the final samples, which the adapter's model card
    then shows."""
    run = RunFolder(cfg.output_dir)
    if run_info.train_losses:
        plot_losses(run.loss_plot, run_info.train_losses, run_info.validation_losses)
    run_info.exports = planned_exports(cfg.export, run_info)
    save_adapter(trained_unet, run.adapter, run_info=run_info, text_encoders=text_encoders)
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
    # Each process encodes its share, so that the barrier waits for one share, not for all of them.
    latents.precompute(dataset, progress=accelerator.is_main_process,
                       share=(accelerator.process_index, accelerator.num_processes))
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
        dreambooth_data.ensure_instance_images(cfg.data)
    accelerator.wait_for_everyone()
    dataset = dreambooth_data.DreamBoothDataset(cfg.data, cfg.seed)  # the images checked before the model is read
    if main:
        print(memory_estimate_line(cfg))  # before any weight loads: a run that cannot fit says so first
    components = load_sdxl(cfg.model, weight_dtype)
    unet, vae, noise_scheduler = components.unet, components.vae, components.noise_scheduler
    attached = attach_checked_adapters(cfg, components, print_main)
    resume_from = find_resume_checkpoint(cfg)
    if main:
        start_output_dir(cfg)
    unet.to(device)
    vae.to(device)
    components.text_encoders_to(device)  # loaded in the compute dtype; their adapters (if any) stay fp32

    if cfg.data.prior_preservation.enabled:
        if main:
            generate_class_images(cfg, accelerator, components)
        else:  # no collective: a barrier would time out while a long generation runs
            sampling.wait_for_class_images(cfg)
        dataset.class_examples = dreambooth_data.class_examples(cfg)

    if attached.text_encoders:  # they train: each micro-batch runs them, so they stay on the accelerator
        text = PromptConditioning(components, cfg.model.text_hidden_states, device)
    else:
        text = frozen_prompt_conditioning(cfg, components, dataset, device)
        if cfg.validation.every_steps:
            components.text_encoders_to("cpu")  # only validation sampling needs them again
        else:  # nothing does (final samples load their own pipeline): free them, 3.3 GB for SDXL in fp32
            components.text_encoder = components.text_encoder_2 = None
    validation_loss = None
    if main and cfg.validation.loss.every_steps:
        validation_loss = ValidationLoss(cfg, dataset, components, text, device, weight_dtype)
    latents_source = prepare_latents(cfg, accelerator, vae, dataset)
    if not latents_source.vae_needed:
        vae.to("cpu")  # every latent is cached: the loop never encodes

    training = prepare_training(cfg, accelerator, unet,
                                {name: getattr(components, name) for name in attached.text_encoders})
    text = text.running(training.prepared_text_encoders)
    if main and cfg.train.report_to != "none":
        hparams = {k: v if isinstance(v, (int, float, str, bool)) else str(v)
                   for k, v in _flatten(config_to_dict(cfg)).items()}
        project, init_kwargs = tracker_settings(cfg, resuming=resume_from is not None)
        os.makedirs(run.logs, exist_ok=True)
        accelerator.init_trackers(project, config=hparams, init_kwargs=init_kwargs)

    make_step_hook = attached.unet.method.make_step_hook
    if make_step_hook is not None:
        training.step_hook = make_step_hook(accelerator.unwrap_model(training.unet))
    state = LoopState()
    if resume_from is not None:
        state = LoopState.from_dict(load_checkpoint(resume_from, accelerator.unwrap_model(training.unet),
                                                    training.optimizer, training.lr_scheduler, accelerator.scaler,
                                                    training.ema, training.step_hook, training.text_encoders),
                                    resume_from)
        if training.ema is not None:
            training.ema.to(device)
        print_main(f"resumed from {resume_from} at step {state.global_step}")
    work = ThisRun(accelerator.num_processes, state.global_step)
    loss_settings = LossSettings.from_config(cfg, noise_scheduler)
    progress = tqdm(total=cfg.train.max_steps, initial=state.global_step, desc="training",
                    disable=not accelerator.is_local_main_process)
    started = time.time()
    training.unet.train()

    accumulation_index, step_loss = 0, 0.0  # the micro-batch within the optimizer step; its mean loss so far
    with progress:  # closed on errors too, so an error message starts on its own line
        for batch in batches_from(cfg, dataset, training.layout, accelerator.process_index, state):
            if state.global_step >= cfg.train.max_steps:
                break
            positions = training.layout.positions(accumulation_index, accelerator.process_index)
            generators = sample_generators(cfg.seed, state.global_step, positions,
                                           len(batch.prompts) > len(positions))
            prompts = conditioned_prompts(batch, cfg.data.caption_dropout, cfg.seed, state.global_step, positions)
            work.micro_batches_trained += 1
            with accelerator.accumulate(training.unet, *training.prepared_text_encoders):
                latents = latents_source.sample(batch, generators, weight_dtype)
                conditioning = batch_conditioning(batch, prompts, text, device, weight_dtype)
                weights = mask_weights(batch.masks.to(device), latents.shape[-2:], cfg.data.masks.min_weight) \
                    if batch.masks is not None else None
                loss = micro_batch_loss(training.unet, noise_scheduler, latents, conditioning, batch.num_instance,
                                        generators, loss_settings, weights)
                stop_if_diverged(accelerator, loss, cfg, state)
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.train.max_grad_norm is not None:
                    accelerator.clip_grad_norm_(training.params, cfg.train.max_grad_norm)
                training.optimizer.step()
                if training.step_hook is not None and accelerator.sync_gradients:
                    training.step_hook(accelerator.unwrap_model(training.unet), state.global_step + 1)
                training.lr_scheduler.step()
                training.optimizer.zero_grad(set_to_none=True)
            accumulation_index += 1
            step_loss += loss.detach() / training.layout.accumulation
            if accelerator.sync_gradients:
                state.global_step += 1
                state.steps_in_epoch += 1
                state.loss = accelerator.gather(step_loss.reshape(1)).mean().item()
                accumulation_index, step_loss = 0, 0.0
                end_of_step(cfg, accelerator, components, training, state, progress, validation_loss)

    accelerator.wait_for_everyone()
    run_info = describe_run(cfg, attached, state, time.time() - started, latents_source.cache, work)
    trained_unet, text_encoders = accelerator.unwrap_model(training.unet), training.text_encoders
    if training.ema is not None:  # the final adapter holds the EMA weights; the trained ones are kept beside
        if main:
            save_adapter(trained_unet, run.adapter_raw, text_encoders=text_encoders)
        training.ema.copy_to(training.params)
    # Training state leaves the accelerator, so that the sampling pipeline below has its memory.
    accelerator.free_memory()
    del training
    for model in (trained_unet, vae, *text_encoders.values()):
        model.to("cpu")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if main:
        save_run(cfg, accelerator, trained_unet, text_encoders, run_info)
    accelerator.end_training()
    encoders = "".join(f", {name} {record['trainable_parameters']:,}"
                       for name, record in (run_info.text_encoders or {}).items())
    print_main(f"adapter saved to {run.adapter} ({run_info.trainable_parameters:,} trainable parameters{encoders}); "
               f"loss curve: {run.loss_plot}")
    if main and cfg.hub.push:  # last: a failed upload leaves the finished run as it is
        push_adapter_folder(cfg.hub, run.adapter, print_main)
    return TrainResult(run_info, trained_unet, text_encoders)
