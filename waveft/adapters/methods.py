"""Adapter methods selectable by `adapter.type`: which PEFT config each one builds, with this project's defaults.

`adapter.peft` holds fields of the method's PEFT config class; every field is exposed, type-checked against
PEFT's own annotations, and unknown keys are refused by name. `adapter.target_modules` is the one place
target modules are set. The defaults are the WaveFT paper's SDXL settings for each method
(../shared/reference/paper-protocol.md); `adapter.budget` replaces a method's size setting
(`waveft.adapters.budget`).
"""
import dataclasses
import importlib
import typing
from dataclasses import dataclass, field
from typing import Callable, Optional

from waveft.errors import UserError

# PeftConfig fields that the trainer owns, so they are not settable through adapter.peft.
RESERVED_PEFT_FIELDS = {
    "task_type",
    "peft_type",
    "auto_mapping",
    "peft_version",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "target_modules",
}


@dataclass(frozen=True)
class Method:
    name: str
    peft_config_class_name: str  # attribute of `config_module`
    defaults: dict = field(default_factory=dict)  # this project's defaults (the paper's settings)
    # Called after every optimizer step, before gradients are cleared, as step_hook(unet, global_step).
    step_hook: Optional[Callable] = None
    # The PEFT field that must equal the run's optimizer steps (train.max_steps), if the method has one.
    total_steps_field: Optional[str] = None
    # Importing it makes the config class available (and registers a method of this project with PEFT).
    config_module: str = "peft"

    def config_class(self):
        return getattr(importlib.import_module(self.config_module), self.peft_config_class_name)


# ---- AdaLoRA's rank allocation -------------------------------------------------------------------------------


class AdaLoraRankSchedule:
    """`AdaLoraModel.update_and_allocate` for a model adapted by diffusers' `add_adapter`, which keeps no tuner.

    The same three phases with PEFT's `RankAllocator`: warm-up (no masking), budget decrease (mask the least
    important singular values every `deltaT` steps), final fine-tuning (keep the final mask). Unlike PEFT, the
    rank pattern is not written into the adapter's config: `get_peft_model_state_dict` would then shrink the
    saved tensors through `AdaLoraModel.resize_state_dict_by_rank_pattern`, which a bare UNet lacks. The
    adapter is saved at its initial rank with the pruned singular values at zero, which gives the same outputs.
    """

    def __init__(self, model, adapter_name: str):
        from peft.tuners.adalora.layer import RankAllocator

        self.adapter_name = adapter_name
        self.config = model.peft_config[adapter_name]
        self.allocator = RankAllocator(model, self.config, adapter_name)
        self.rank_pattern = None

    def step(self, model, global_step: int) -> None:
        final_step = self.config.total_step - self.config.tfinal
        if global_step < final_step:
            _, rank_pattern = self.allocator.update_and_allocate(model, global_step)
            self.rank_pattern = rank_pattern or self.rank_pattern
        elif global_step == final_step:
            if not self.allocator.exp_avg_ipt:  # resumed right before the final allocation: score this step
                self.allocator.update_ipt(model)
            _, self.rank_pattern = self.allocator.update_and_allocate(model, global_step, force_mask=True)
            self.allocator.reset_ipt()
        else:
            # A run resumed after the final allocation finds the mask in the saved singular values.
            self.rank_pattern = self.rank_pattern or self._rank_pattern_of_weights(model)
            self.allocator.mask_using_rank_pattern(model, self.rank_pattern)

    def _rank_pattern_of_weights(self, model) -> dict:
        suffix = f"lora_E.{self.adapter_name}"
        return {n: (p != 0).view(-1).tolist() for n, p in model.named_parameters() if suffix in n}


ADALORA_SCHEDULE_ATTRIBUTE = "_waveft_adalora_schedule"


def adalora_step_hook(model, global_step: int) -> None:
    """Rank allocation after each optimizer step; its state lives on the model, made at the first step."""
    from peft.utils import PeftType

    schedule = model.__dict__.get(ADALORA_SCHEDULE_ATTRIBUTE)
    if schedule is None:
        (adapter_name,) = [n for n, c in model.peft_config.items() if c.peft_type == PeftType.ADALORA]
        schedule = AdaLoraRankSchedule(model, adapter_name)
        model.__dict__[ADALORA_SCHEDULE_ATTRIBUTE] = schedule  # not a submodule: kept out of state dicts
    schedule.step(model, global_step)


# ---- the registry --------------------------------------------------------------------------------------------

# The paper's SDXL settings (../shared/reference/paper-protocol.md).
WAVEFT_PAPER_DEFAULTS = dict(n_frequency=2592, scaling=25.0, wavelet_family="db1", random_loc_seed=777)

METHODS = {
    m.name: m
    for m in [
        # `peft: {use_idwt: false}` is the paper's SHiRA: the same sparse coefficients, no wavelet transform.
        Method("waveft", "WaveFTConfig", dict(WAVEFT_PAPER_DEFAULTS, use_idwt=True)),
        # PEFT's own SHiRA: r * (out + in) sparse weights per layer, so r=1 is budget 1.
        Method("shira", "ShiraConfig", dict(r=1, mask_type="random", random_seed=777)),
        Method("lora", "LoraConfig", dict(r=1, lora_alpha=1, init_lora_weights=True)),
        Method("loha", "LoHaConfig", dict(r=1, alpha=64)),
        Method("lokr", "LoKrConfig", dict(r=20, alpha=192)),
        # The projections are regenerated from projection_prng_key: saving them needs PEFT's tuner object,
        # which attaching to a UNet does not keep (see waveft.adapters.attach).
        Method("vera", "VeraConfig", dict(r=1402, save_projection=False)),
        Method("fourierft", "FourierFTConfig", dict(n_frequency=2592, scaling=32.0)),
        Method(
            "adalora",
            "AdaLoraConfig",
            dict(target_r=1, init_r=2, lora_alpha=32),
            step_hook=adalora_step_hook,
            total_steps_field="total_step",
        ),
        Method("wara", "WaraConfig", dict(r=1, scaling=1.0, wavelet_family="db1"), config_module="waveft.adapters.wara"),
    ]
}


def get_method(name: str, source: str = "config") -> Method:
    if name not in METHODS:
        raise UserError(f"{source}: key 'adapter.type' names an unknown method {name!r} (known: {', '.join(METHODS)})")
    return METHODS[name]


def _settable_fields(config_class) -> dict:
    hints = typing.get_type_hints(config_class)
    return {f.name: hints[f.name] for f in dataclasses.fields(config_class) if f.name not in RESERVED_PEFT_FIELDS}


def resolved_peft_settings(adapter, source: str = "config") -> dict:
    """The method's defaults overlaid with `adapter.peft`, each value checked against PEFT's annotation."""
    from waveft.config import coerce_value

    method = get_method(adapter.type, source)
    fields = _settable_fields(method.config_class())
    settings = dict(method.defaults)
    for key, value in adapter.peft.items():
        if key == "target_modules":
            raise UserError(f"{source}: set target modules with 'adapter.target_modules', not 'adapter.peft.target_modules'")
        if key == method.total_steps_field:
            raise UserError(f"{source}: key 'adapter.peft.{key}' is set from 'train.max_steps'; remove it")
        if key not in fields:
            raise UserError(f"{source}: unknown key 'adapter.peft.{key}' for {method.peft_config_class_name}")
        settings[key] = coerce_value(value, fields[key], f"adapter.peft.{key}", source)
    return settings


def check_method_settings(adapter, settings: dict, source: str = "config") -> None:
    """Combinations PEFT accepts but this project cannot run, refused before any model is loaded."""
    if adapter.type == "waveft":
        from peft.tuners.waveft.constants import WAVELET_REDUCTIONS

        wavelet = settings["wavelet_family"]
        if wavelet not in WAVELET_REDUCTIONS:
            raise UserError(
                f"{source}: key 'adapter.peft.wavelet_family' names an unknown wavelet {wavelet!r} "
                f"(PEFT's WaveFT accepts db1-db38, sym2-sym20, coif1-coif17)"
            )
        if adapter.implementation == "peft" and wavelet not in peft_runnable_wavelets():
            raise UserError(
                f"{source}: wavelet {wavelet!r} is accepted by PEFT's config but its WaveFT layer cannot run it; "
                f"use adapter.implementation=structured or one of db1-db10, sym2-sym10, coif1-coif5"
            )
    if adapter.type == "vera" and settings["save_projection"]:
        raise UserError(
            f"{source}: key 'adapter.peft.save_projection' must be false for vera on a UNet: PEFT saves the shared "
            f"projections from its tuner object, which diffusers-style attaching does not keep; they are "
            f"regenerated from 'adapter.peft.projection_prng_key' instead"
        )


def build_peft_config(adapter, source: str = "config", total_steps: Optional[int] = None):
    """The PEFT config for this adapter section; PEFT's own checks surface as a UserError.

    `total_steps` (the run's train.max_steps) fills the method's `total_steps_field`; it is required for
    such a method (AdaLoRA's `total_step`).
    """
    method = get_method(adapter.type, source)
    settings = resolved_peft_settings(adapter, source)
    check_method_settings(adapter, settings, source)
    if method.total_steps_field is not None:
        if total_steps is None:
            raise ValueError(f"adapter type {adapter.type!r} needs the run's total optimizer steps (total_steps)")
        settings[method.total_steps_field] = total_steps
    try:
        return method.config_class()(target_modules=list(adapter.target_modules), **settings)
    except (ValueError, TypeError) as exc:
        raise UserError(f"{source}: adapter '{adapter.type}' settings rejected by PEFT: {str(exc).splitlines()[0]}") from None


def validate_adapter_settings(adapter, source: str = "config", total_steps: Optional[int] = None) -> None:
    """Model-free checks of the adapter section (run with the rest of the config, before loading models).

    Without `total_steps`, a method that needs it is checked up to building its PEFT config; the rest
    (e.g. AdaLoRA's schedule against train.max_steps) is checked when the adapter is attached.
    """
    from waveft.adapters.budget import check_budget_settings

    method = get_method(adapter.type, source)
    check_budget_settings(adapter, source)
    if method.total_steps_field is not None and total_steps is None:
        check_method_settings(adapter, resolved_peft_settings(adapter, source), source)
        return
    build_peft_config(adapter, source, total_steps)


def peft_runnable_wavelets() -> set:
    from peft.tuners.waveft.wavelet import wavelist

    return set(wavelist())
