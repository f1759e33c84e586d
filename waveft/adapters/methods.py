"""Adapter methods selectable by `adapter.type`: which PEFT config each one builds, with this project's defaults.

`adapter.peft` holds fields of the method's PEFT config class; every field is exposed, type-checked against
PEFT's own annotations, and unknown keys are refused by name. `adapter.target_modules` is the one place
target modules are set.
"""
import dataclasses
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
    peft_config_class_name: str  # attribute of the `peft` package
    defaults: dict = field(default_factory=dict)  # this project's defaults (the paper's settings)
    # Called after every optimizer step, before gradients are cleared, as step_hook(unet, global_step).
    step_hook: Optional[Callable] = None

    def config_class(self):
        import peft

        return getattr(peft, self.peft_config_class_name)


# The paper's SDXL settings (../shared/reference/paper-protocol.md).
WAVEFT_PAPER_DEFAULTS = dict(n_frequency=2592, scaling=25.0, wavelet_family="db1", random_loc_seed=777)

METHODS = {
    m.name: m
    for m in [
        Method("waveft", "WaveFTConfig", dict(WAVEFT_PAPER_DEFAULTS, use_idwt=True)),
        Method("lora", "LoraConfig", dict(r=1, lora_alpha=1, init_lora_weights=True)),
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
        if key not in fields:
            raise UserError(f"{source}: unknown key 'adapter.peft.{key}' for {method.peft_config_class_name}")
        settings[key] = coerce_value(value, fields[key], f"adapter.peft.{key}", source)
    return settings


def build_peft_config(adapter, source: str = "config"):
    """The PEFT config for this adapter section; PEFT's own checks surface as a UserError."""
    method = get_method(adapter.type, source)
    settings = resolved_peft_settings(adapter, source)
    try:
        return method.config_class()(target_modules=list(adapter.target_modules), **settings)
    except (ValueError, TypeError) as exc:
        raise UserError(f"{source}: adapter '{adapter.type}' settings rejected by PEFT: {str(exc).splitlines()[0]}") from None


def validate_adapter_settings(adapter, source: str = "config") -> None:
    """Model-free checks of the adapter section (run with the rest of the config, before loading models)."""
    if adapter.type == "waveft":
        from peft.tuners.waveft.constants import WAVELET_REDUCTIONS

        wavelet = resolved_peft_settings(adapter, source)["wavelet_family"]
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
    build_peft_config(adapter, source)


def peft_runnable_wavelets() -> set:
    from peft.tuners.waveft.wavelet import wavelist

    return set(wavelist())
