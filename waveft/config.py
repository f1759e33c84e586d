"""The typed run config: YAML file + `key.sub=value` overrides, validated before any model is loaded.

Every setting a run depends on lives here, with its default. `load_config` reports the first problem as a
`UserError` naming the file and the dotted key.
"""
import dataclasses
from dataclasses import dataclass, field
from typing import Literal, Optional

import yaml

from waveft.adapters.methods import ResolvedAdapter, resolve_adapter
from waveft.errors import UserError
from waveft.infer.settings import Quantization, SamplerSettings
from waveft.io.files import write_text_atomic
from waveft.io.schema import DERIVED, apply_override, coerce_value, read_yaml_extending

SDXL_ATTENTION_PROJECTIONS = ["to_q", "to_k", "to_v", "to_out.0"]
CLIP_ATTENTION_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "out_proj"]  # transformers' CLIPAttention


@dataclass
class ModelConfig:
    pretrained: str = "stabilityai/stable-diffusion-xl-base-1.0"  # Hub id or local diffusers folder
    revision: Optional[str] = None
    variant: Optional[str] = None  # e.g. "fp16" weight files on the Hub
    vae: Optional[str] = None  # a separate VAE (Hub id or folder), e.g. madebyollin/sdxl-vae-fp16-fix
    vae_dtype: Literal["fp32", "fp16", "bf16"] = "fp32"  # SDXL's own VAE overflows in fp16
    build_tiny_if_missing: bool = False  # write the built-in tiny SDXL to `pretrained` if no pipeline is there
    prediction_type: Optional[Literal["epsilon", "v_prediction"]] = None  # None: the scheduler's own
    # "diffusers": penultimate hidden state of both text encoders, as StableDiffusionXLPipeline.
    # "paper": the WaveFT paper's training quirk (encoder 1 last hidden state, encoder 2 penultimate).
    text_hidden_states: Literal["diffusers", "paper"] = "diffusers"
    # The UNet's Linear layers quantized at load by bitsandbytes (the adapted projections too; the adapter
    # stays fp32); matmuls in train.mixed_precision's dtype. The saved adapter is the same as without.
    quantize: Quantization = "none"

    def builds_tiny_model(self) -> bool:
        """Whether the built-in tiny SDXL is to be written at `pretrained`: with `build_tiny_if_missing`, into a
        folder named after it only (`waveft.fixtures.tiny.TINY_MODEL_FOLDER`), so that a mistyped folder or a Hub
        id is refused as missing instead of becoming a random-weight model."""
        import os

        from waveft.fixtures.tiny import TINY_MODEL_FOLDER

        return self.build_tiny_if_missing and os.path.basename(os.path.normpath(self.pretrained)) == TINY_MODEL_FOLDER


@dataclass
class PriorPreservationConfig:
    enabled: bool = False
    class_prompt: Optional[str] = None  # default: "a <class_noun>"
    class_dir: Optional[str] = None  # default: <output_dir>/class_images
    num_class_images: int = 100
    loss_weight: float = 1.0
    generation_steps: int = 30  # for class images generated with the base pipeline when missing
    generation_batch_size: int = 4


@dataclass
class BucketConfig:
    """Aspect-ratio buckets (SDXL's training buckets): each image goes to the bucket of nearest aspect ratio."""

    enabled: bool = False
    area: Optional[int] = None  # target pixels per image; default: data.resolution ** 2
    step: int = 64  # bucket sides are multiples of this (a multiple of 8: the VAE's factor)
    max_ratio: float = 2.0  # the widest bucket's width/height (and the tallest's height/width)


@dataclass
class MaskConfig:
    """Masked loss: a per-pixel weight on the MSE, from the image's alpha channel or a NAME.mask.png beside it."""

    source: Optional[Literal["alpha", "sidecar"]] = None  # None: no masks
    min_weight: float = 0.0  # the weight outside the mask (0: those pixels teach nothing)


@dataclass
class DataConfig:
    instance_dir: str = ""
    subject: Optional[str] = None  # default: the instance folder's name
    identifier: str = "zjw"
    class_noun: str = "object"
    instance_prompt: Optional[str] = None  # default: "a {identifier} {class_noun}"
    captions: bool = False  # use a sidecar <image>.txt caption when present
    # Write the offline toy subject into instance_dir if it is missing and named toy_ball (any other: an error).
    synthetic_if_missing: bool = False
    resolution: int = 1024
    crop: Literal["random", "center"] = "random"
    flip_probability: float = 0.0
    repeats: int = 1
    num_workers: int = 0
    # The share of instance samples trained on the empty prompt (kohya's caption dropout), chosen by (seed,
    # optimizer step, position in the effective batch), so a resumed or re-split run drops the same ones.
    caption_dropout: float = 0.0
    # The VAE posterior of each (image, crop, flip, size) computed once and kept on disk; auto: on.
    cache_latents: Literal["auto", True, False] = "auto"
    latent_cache_dir: Optional[str] = None  # default: $WAVEFT_CACHE_DIR/latents or ~/.cache/waveft/latents
    buckets: BucketConfig = field(default_factory=BucketConfig)
    masks: MaskConfig = field(default_factory=MaskConfig)
    prior_preservation: PriorPreservationConfig = field(default_factory=PriorPreservationConfig)


@dataclass
class TextEncoderAdapterConfig:
    """The run's adapter (its method, settings and budget) on both CLIP text encoders too, as diffusers'
    --train_text_encoder; off in the paper's configs (the paper adapts the UNet only). The budget counts LoRA
    rank 1 over each encoder's own target layers. model.quantize quantizes the UNet only, so it refuses no
    method here; AdaLoRA is refused (its rank allocation runs over the UNet's adapter alone)."""

    enabled: bool = False
    target_modules: list[str] = field(default_factory=lambda: list(CLIP_ATTENTION_PROJECTIONS))
    learning_rate: Optional[float] = None  # the encoders' adapters' own learning rate; None: train.learning_rate


@dataclass
class AdapterConfig:
    type: str = "waveft"  # a method name from waveft.adapters.methods
    label: Optional[str] = None  # the method's name in reports, e.g. "shira" for waveft with use_idwt false
    implementation: Literal["structured", "peft"] = "structured"  # WaveFT layer: ours (no dense delta) or PEFT's
    budget: Optional[float] = None  # trainable parameters in LoRA-rank-1 units; None: use `peft` as given
    target_modules: list[str] = field(default_factory=lambda: list(SDXL_ATTENTION_PROJECTIONS))
    peft: dict = field(default_factory=dict)  # fields of the method's PEFT config, e.g. n_frequency, scaling
    text_encoders: TextEncoderAdapterConfig = field(default_factory=TextEncoderAdapterConfig)


@dataclass
class EMAConfig:
    """An exponential moving average of the adapter weights (diffusers' EMAModel); the final adapter holds it."""

    enabled: bool = False
    decay: float = 0.999  # the largest decay; EMAModel warms up to it as (1 + step) / (10 + step)
    update_after_step: int = 0  # optimizer steps before the average starts
    every: int = 1  # update the average every this many optimizer steps


@dataclass
class WandbConfig:
    """Where train.report_to=wandb files the run; a sweep sets `group` and `tags` so that a workspace shows it as
    one table."""

    project: str = "waveft-dreambooth"
    name: Optional[str] = None  # default: wandb's own
    group: Optional[str] = None
    tags: list[str] = field(default_factory=list)


@dataclass
class TrainConfig:
    max_steps: int = 500  # optimizer steps
    batch_size: int = 1
    gradient_accumulation_steps: int = 4
    learning_rate: float = 1e-4
    lr_scheduler: Literal[
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
    ] = "constant"
    lr_warmup_steps: int = 0
    optimizer: Literal["adamw", "adamw_8bit", "prodigy"] = "adamw"  # prodigy: set learning_rate 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-4
    adam_epsilon: float = 1e-8
    prodigy_safeguard_warmup: bool = True  # Prodigy's safeguard against a large step size early (with warmup)
    prodigy_use_bias_correction: bool = True  # Adam-style bias correction of Prodigy's step size
    prodigy_d_coef: float = 1.0  # scales Prodigy's estimated step size
    max_grad_norm: Optional[float] = 1.0
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    snr_gamma: Optional[float] = None  # Min-SNR loss weighting; None: plain MSE
    noise_offset: float = 0.0
    checkpointing_steps: int = 100
    checkpoints_total_limit: Optional[int] = 2
    resume: Optional[str] = None  # "latest" or a checkpoint folder
    report_to: Literal["tensorboard", "wandb", "none"] = "tensorboard"
    log_every: int = 1
    wandb: WandbConfig = field(default_factory=WandbConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)


@dataclass
class ValidationLossConfig:
    """The denoising loss on fixed (image, noise, timestep) triples: a curve that tells whether the adapter learns."""

    every_steps: int = 0  # 0: off
    timesteps: int = 4  # (noise, timestep) draws per image, the same at every evaluation
    images: Optional[str] = None  # a folder of held-out images; default: the instance images


@dataclass
class ValidationConfig(SamplerSettings):
    """Training-time samples: the sampler settings (scheduler, steps, guidance_scale, negative_prompt) are
    SamplerSettings' (waveft.infer.settings), with its defaults; waveft.train.sampling makes the
    GenerationSettings from them."""

    prompts: list[str] = field(default_factory=list)  # "{instance}" is replaced by the instance prompt
    every_steps: int = 0  # 0: only the final samples
    final: bool = True  # sample with the merged adapter once training ends
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    resolution: Optional[int] = None  # default: data.resolution
    # Validation and final samples at this (height, width), e.g. a bucket's size; default: resolution square.
    size: Optional[list[int]] = None
    loss: ValidationLossConfig = field(default_factory=ValidationLossConfig)


@dataclass
class ExportConfig:
    """Files for ComfyUI / Forge / A1111 / InvokeAI / diffusers written into the adapter folder at the end of the
    run (`waveft.export`; the model card says which loads where)."""
    formats: list[Literal["lora", "full-diff", "waveft"]] = field(default_factory=list)
    lora_rank: Optional[int] = None  # same rank for every layer (default 32 unless lora_energy is set)
    lora_energy: Optional[float] = None  # per-layer ranks keeping this fraction of the squared singular values
    dtype: Literal["fp16", "bf16", "fp32"] = "fp16"


@dataclass
class HubConfig:
    """Upload of the adapter folder to the Hugging Face Hub (HfApi.upload_folder) once the run is saved."""

    push: bool = False
    repo_id: Optional[str] = None  # "user/name"; required with push
    private: bool = True  # a repository created by the upload is private


@dataclass
class RunConfig:
    output_dir: str = ""
    overwrite_output_dir: bool = False
    seed: int = 42
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    hub: HubConfig = field(default_factory=HubConfig)
    # The adapter section resolved once by load_config (what attach, the trainer and run_info.json read); not a
    # setting: not in config.yaml, not settable.
    resolved_adapter: Optional[ResolvedAdapter] = field(default=None, compare=False, repr=False,
                                                        metadata={DERIVED: True})

    def text_encoder_adapter(self) -> Optional[ResolvedAdapter]:
        """The run's resolved adapter on the text encoders' target modules (sized per encoder when attached), or
        None when adapter.text_encoders is off."""
        text_encoders = self.adapter.text_encoders
        if not text_encoders.enabled:
            return None
        return dataclasses.replace(self.resolved_adapter, target_modules=tuple(text_encoders.target_modules))

    def text_encoder_learning_rate(self) -> float:
        learning_rate = self.adapter.text_encoders.learning_rate
        return self.train.learning_rate if learning_rate is None else learning_rate


def load_config(path: Optional[str], overrides: tuple[str, ...] = ()) -> RunConfig:
    """Read a YAML config (or none: all defaults) with the file it `extends`, apply `key.sub=value` overrides,
    type-check and validate."""
    tree = read_yaml_extending(path) if path is not None else {}
    for override in overrides:
        apply_override(tree, override)
    source = path or "config"
    cfg = coerce_value(tree, RunConfig, "", source)
    validate(cfg, source)
    return cfg


def _positive(value, key: str, source: str, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise UserError(f"{source}: key '{key}' must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def validate(cfg: RunConfig, source: str) -> None:
    """Checks that need no model: required keys, ranges, and choices that depend on other keys; the adapter
    section is resolved (checked through its method and PEFT) into `cfg.resolved_adapter`."""
    if not cfg.output_dir:
        raise UserError(f"{source}: key 'output_dir' is required")
    if not cfg.data.instance_dir:
        raise UserError(f"{source}: key 'data.instance_dir' is required")
    for key, value in [
        ("data.resolution", cfg.data.resolution),
        ("data.repeats", cfg.data.repeats),
        ("train.max_steps", cfg.train.max_steps),
        ("train.batch_size", cfg.train.batch_size),
        ("train.gradient_accumulation_steps", cfg.train.gradient_accumulation_steps),
        ("train.learning_rate", cfg.train.learning_rate),
        ("train.log_every", cfg.train.log_every),
        ("validation.steps", cfg.validation.steps),
        ("data.prior_preservation.num_class_images", cfg.data.prior_preservation.num_class_images),
        ("data.prior_preservation.generation_steps", cfg.data.prior_preservation.generation_steps),
        ("data.prior_preservation.generation_batch_size", cfg.data.prior_preservation.generation_batch_size),
    ]:
        _positive(value, key, source)
    for key, value in [
        ("train.lr_warmup_steps", cfg.train.lr_warmup_steps),
        ("train.checkpointing_steps", cfg.train.checkpointing_steps),
        ("train.noise_offset", cfg.train.noise_offset),
        ("validation.every_steps", cfg.validation.every_steps),
        ("data.num_workers", cfg.data.num_workers),
        ("data.prior_preservation.loss_weight", cfg.data.prior_preservation.loss_weight),
    ]:
        _positive(value, key, source, allow_zero=True)
    if cfg.data.resolution % 8:
        raise UserError(f"{source}: key 'data.resolution' must be a multiple of 8, got {cfg.data.resolution}")
    for key, value in [("data.flip_probability", cfg.data.flip_probability),
                       ("data.caption_dropout", cfg.data.caption_dropout)]:
        if not 0.0 <= value <= 1.0:
            raise UserError(f"{source}: key '{key}' must be in [0, 1], got {value}")
    if cfg.train.checkpoints_total_limit is not None and cfg.train.checkpoints_total_limit < 1:
        raise UserError(f"{source}: key 'train.checkpoints_total_limit' must be >= 1 or null")
    if not cfg.adapter.target_modules:
        raise UserError(f"{source}: key 'adapter.target_modules' must name at least one module")
    if cfg.adapter.budget is not None:
        _positive(cfg.adapter.budget, "adapter.budget", source)
    _validate_optimizer(cfg.train, source)
    _validate_export(cfg.export, cfg.adapter.type, source)
    cfg.resolved_adapter = resolve_adapter(cfg.adapter, cfg.train.max_steps, source)
    validate_quantization(cfg, source)
    validate_text_encoders(cfg, source)
    validate_trainer_features(cfg, source)


def validate_quantization(cfg: RunConfig, source: str) -> None:
    """`model.quantize` needs bitsandbytes and a method that trains over a quantized base."""
    import importlib.util

    if cfg.model.quantize == "none":
        return
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError(f"{source}: model.quantize={cfg.model.quantize} needs the bitsandbytes package: "
                        f"pip install bitsandbytes (or set model.quantize=none)")
    refusal = cfg.resolved_adapter.method.quantization_refusals.get(cfg.model.quantize)
    if refusal is not None:
        raise UserError(f"{source}: adapter.type={cfg.adapter.type} cannot train over model.quantize="
                        f"{cfg.model.quantize}: {refusal}; use model.quantize=none")


def validate_text_encoders(cfg: RunConfig, source: str) -> None:
    """adapter.text_encoders, when on: whether its target modules match each encoder is checked once the model is
    loaded (`waveft.train.loop.attach_checked_adapters`), before anything is written."""
    text_encoders = cfg.adapter.text_encoders
    if text_encoders.learning_rate is not None:
        _positive(text_encoders.learning_rate, "adapter.text_encoders.learning_rate", source)
    if not text_encoders.enabled:
        return
    if not text_encoders.target_modules:
        raise UserError(f"{source}: key 'adapter.text_encoders.target_modules' must name at least one module")
    if cfg.resolved_adapter.method.make_step_hook is not None:
        raise UserError(f"{source}: adapter.type={cfg.adapter.type} cannot adapt the text encoders: its schedule "
                        f"across steps (AdaLoRA's rank allocation) runs over the UNet's adapter only; set "
                        f"adapter.text_encoders.enabled=false")


def validate_trainer_features(cfg: RunConfig, source: str) -> None:
    """Latent cache, buckets, masks, EMA, validation loss, Prodigy, wandb and the Hub: checks that need no model."""
    import importlib.util

    buckets, ema, vloss = cfg.data.buckets, cfg.train.ema, cfg.validation.loss
    if buckets.step <= 0 or buckets.step % 8:
        raise UserError(f"{source}: key 'data.buckets.step' must be a positive multiple of 8, got {buckets.step}")
    if buckets.max_ratio < 1.0:
        raise UserError(f"{source}: key 'data.buckets.max_ratio' must be >= 1, got {buckets.max_ratio}")
    if buckets.area is not None and buckets.area < buckets.step**2:
        raise UserError(f"{source}: key 'data.buckets.area' must be at least step**2 = {buckets.step**2}, "
                        f"got {buckets.area}")
    if not 0.0 <= cfg.data.masks.min_weight <= 1.0:
        raise UserError(f"{source}: key 'data.masks.min_weight' must be in [0, 1], got {cfg.data.masks.min_weight}")
    if not 0.0 < ema.decay < 1.0:
        raise UserError(f"{source}: key 'train.ema.decay' must be in (0, 1), got {ema.decay}")
    _positive(ema.every, "train.ema.every", source)
    _positive(ema.update_after_step, "train.ema.update_after_step", source, allow_zero=True)
    _positive(vloss.every_steps, "validation.loss.every_steps", source, allow_zero=True)
    _positive(vloss.timesteps, "validation.loss.timesteps", source)
    if cfg.validation.size is not None and (len(cfg.validation.size) != 2 or any(
            v <= 0 or v % 8 for v in cfg.validation.size)):
        raise UserError(f"{source}: key 'validation.size' must be [height, width], multiples of 8, "
                        f"got {cfg.validation.size}")
    if cfg.train.optimizer == "prodigy" and importlib.util.find_spec("prodigyopt") is None:
        raise UserError(f"{source}: train.optimizer=prodigy needs the prodigyopt package: pip install prodigyopt")
    if cfg.train.report_to == "wandb" and importlib.util.find_spec("wandb") is None:
        raise UserError(f"{source}: train.report_to=wandb needs the wandb package: pip install wandb "
                        f"(see requirements.txt), or report_to=tensorboard")
    if cfg.hub.push and not cfg.hub.repo_id:
        raise UserError(f"{source}: key 'hub.push' needs 'hub.repo_id' (the Hub repository, e.g. user/name)")


def _validate_optimizer(train: TrainConfig, source: str) -> None:
    """What torch's AdamW, bitsandbytes' AdamW8bit and Prodigy would refuse (with a traceback, after the output
    folder is set up) or silently misuse (a zero clip norm or Min-SNR gamma)."""
    for key in ("adam_beta1", "adam_beta2"):
        if not 0.0 <= getattr(train, key) < 1.0:
            raise UserError(f"{source}: key 'train.{key}' must be in [0, 1), got {getattr(train, key)!r}")
    _positive(train.adam_epsilon, "train.adam_epsilon", source)
    _positive(train.adam_weight_decay, "train.adam_weight_decay", source, allow_zero=True)
    _positive(train.prodigy_d_coef, "train.prodigy_d_coef", source)
    for key in ("max_grad_norm", "snr_gamma"):
        if getattr(train, key) is not None:
            _positive(getattr(train, key), f"train.{key}", source)


def _validate_export(export: ExportConfig, adapter_type: str, source: str) -> None:
    lora = "lora" in export.formats
    if export.lora_rank is not None and export.lora_energy is not None:
        raise UserError(f"{source}: set 'export.lora_rank' or 'export.lora_energy', not both")
    if (export.lora_rank is not None or export.lora_energy is not None) and not lora:
        raise UserError(f"{source}: 'export.lora_rank' / 'export.lora_energy' need 'lora' in 'export.formats'")
    if export.lora_rank is not None:
        _positive(export.lora_rank, "export.lora_rank", source)
    if export.lora_energy is not None and not 0 < export.lora_energy <= 1:
        raise UserError(f"{source}: key 'export.lora_energy' must be in (0, 1], got {export.lora_energy}")
    if "waveft" in export.formats and adapter_type != "waveft":
        raise UserError(f"{source}: 'export.formats' names waveft, WaveFT's own file, but adapter.type is "
                        f"{adapter_type!r}: its exports are lora, full-diff")
    if len(set(export.formats)) != len(export.formats):
        raise UserError(f"{source}: key 'export.formats' names a format twice: {export.formats}")


def config_to_dict(cfg: RunConfig) -> dict:
    """The settings as config.yaml holds them (what load_config derived from them is left out)."""
    return {f.name: _plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if not f.metadata.get(DERIVED)}


def _plain(value):
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


def save_config(cfg: RunConfig, path: str) -> None:
    write_text_atomic(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
