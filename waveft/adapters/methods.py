"""Adapter methods selectable by `adapter.type`, each declared once, and the resolution of an adapter section.

A `Method` holds everything that is particular to one method: the PEFT config it builds with this project's
defaults (the WaveFT paper's SDXL settings, docs/protocol.md), the size setting `adapter.budget` chooses and
its parameter count (`waveft.adapters.budget` does the arithmetic), its own checks, what follows attaching
it, and its hook after each optimizer step. `adapter.peft` holds fields of the method's PEFT config class;
every field is exposed, type-checked against PEFT's own annotations, and unknown keys are refused by name.
`adapter.target_modules` is the one place target modules are set.
"""
import dataclasses
import importlib
import math
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional

from waveft.adapters.budget import (
    BudgetPlan,
    LayerShape,
    SizeSetting,
    coefficients,
    low_rank,
    nearest_size,
    smallest_layer,
)
from waveft.errors import UserError
from waveft.io.schema import coerce_value

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

# Settings that change a method's parameter count in ways the size settings do not model (extra trainable
# biases or vectors, per-layer sizes, fewer layers); with a budget they must keep their neutral value.
COUNT_CHANGING_SETTINGS = (
    "rank_pattern",
    "n_frequency_pattern",
    "proportional_parameters",
    "use_dora",
    "bias",
    "lora_bias",
    "modules_to_save",
    "layers_to_transform",
    "trainable_token_indices",
    "target_parameters",
)


@dataclass(frozen=True)
class Method:
    name: str
    peft_config_class_name: str  # attribute of `config_module`
    size: SizeSetting  # what adapter.budget sets, and the parameters each value holds
    defaults: dict = field(default_factory=dict)  # this project's defaults (the paper's settings)
    # Model-free checks of combinations PEFT accepts but this project cannot run: (the ResolvedAdapter).
    check_settings: Optional[Callable] = None
    # Checks against the layers about to be adapted, before injecting: (peft_config, {name: nn.Linear}).
    check_layers: Optional[Callable] = None
    # Called once the adapter is injected: (unet, the ResolvedAdapter).
    after_attach: Optional[Callable] = None
    # Made once per run from the adapted model: an object called after every optimizer step, before gradients
    # are cleared, as hook(unet, global_step); it holds whatever state the method keeps across steps, which
    # checkpoints save and restore through its state_dict() and load_state_dict(state, device).
    make_step_hook: Optional[Callable] = None
    # The PEFT field that must equal the run's optimizer steps (train.max_steps), if the method has one.
    total_steps_field: Optional[str] = None
    # Its PEFT type (adapter_config.json's `peft_type`), by which an adapter folder names its method.
    peft_type: str = field(kw_only=True)
    # Whether its layers add a difference to the frozen weight (W' = W + dW): what waveft.export can write.
    additive: bool = field(default=True, kw_only=True)
    # Importing it makes the config class available (and registers a method of this project with PEFT).
    config_module: str = "peft"
    # model.quantize kinds the method cannot train over, with the reason.
    quantization_refusals: dict = field(default_factory=dict)

    def config_class(self):
        return getattr(importlib.import_module(self.config_module), self.peft_config_class_name)


# ---- WaveFT ----------------------------------------------------------------------------------------------------

# The paper's SDXL settings (docs/protocol.md).
WAVEFT_PAPER_DEFAULTS = dict(n_frequency=2592, scaling=25.0, wavelet_family="db1", random_loc_seed=777)


def _check_waveft_settings(adapter) -> None:
    from peft.tuners.waveft.constants import WAVELET_REDUCTIONS

    from waveft.adapters.structured_waveft.layer import peft_runnable_wavelets

    wavelet = adapter.settings["wavelet_family"]
    if wavelet not in WAVELET_REDUCTIONS:
        raise UserError(
            f"{adapter.source}: key 'adapter.peft.wavelet_family' names an unknown wavelet {wavelet!r} "
            f"(PEFT's WaveFT accepts db1-db38, sym2-sym20, coif1-coif17)"
        )
    if adapter.implementation == "peft" and wavelet not in peft_runnable_wavelets():
        raise UserError(
            f"{adapter.source}: wavelet {wavelet!r} is accepted by PEFT's config but its WaveFT layer cannot run it; "
            f"use adapter.implementation=structured or one of db1-db10, sym2-sym10, coif1-coif4"
        )


def _check_waveft_fits(peft_config, layers: dict) -> None:
    """PEFT refuses n_frequency > out*in without naming the layer; name it before injecting."""
    from peft.utils.other import get_pattern_key

    if peft_config.proportional_parameters:
        return
    patterns = list(peft_config.n_frequency_pattern)
    for name, layer in layers.items():
        n = peft_config.n_frequency_pattern.get(get_pattern_key(patterns, name), peft_config.n_frequency)
        capacity = layer.out_features * layer.in_features
        if not 0 < n <= capacity:
            raise UserError(
                f"adapter.peft.n_frequency={n} is out of range for layer {name} "
                f"({layer.out_features}x{layer.in_features} holds 1..{capacity})"
            )


def _use_structured_waveft(unet, adapter) -> None:
    if adapter.implementation == "structured":
        from waveft.adapters.structured_waveft import enable_structured_waveft

        enable_structured_waveft(unet)


# ---- SHiRA, LoKr, VeRA, WaRA: their counts and checks -----------------------------------------------------------


def _shira_largest_rank(shapes: list[LayerShape], settings: dict) -> int:
    """SHiRA's r * (out + in) sparse weights must fit in every layer."""
    return min(s.out_features * s.in_features // (s.out_features + s.in_features) for s in shapes)


def _lokr_factors(shape: LayerShape, settings: dict) -> tuple:
    """PEFT's LoKr split of a Linear layer: out = out_l * out_k, in = in_m * in_n, W = kron(w1, w2)."""
    from peft.tuners.lokr.layer import factorization

    out_l, out_k = factorization(shape.out_features, settings["decompose_factor"])
    in_m, in_n = factorization(shape.in_features, settings["decompose_factor"])
    return out_l, out_k, in_m, in_n


def _lokr_layer(r: int, shape: LayerShape, settings: dict) -> int:
    # As LoKrLayer.update_layer: a factor is low-rank (r * (rows + cols)) while r < max(rows, cols) / 2,
    # else full; w1 is low-rank only with decompose_both.
    out_l, out_k, in_m, in_n = _lokr_factors(shape, settings)
    w1_low_rank = settings["decompose_both"] and r < max(out_l, in_m) / 2
    w2_low_rank = r < max(out_k, in_n) / 2
    w1 = r * (out_l + in_m) if w1_low_rank else out_l * in_m
    w2 = r * (out_k + in_n) if w2_low_rank else out_k * in_n
    return w1 + w2


def _lokr_largest_useful_rank(shapes: list[LayerShape], settings: dict) -> int:
    """Above this rank every factor of every layer is full: the count no longer changes."""
    return max(math.ceil(max(_lokr_factors(s, settings)) / 2) for s in shapes)


def _check_vera_settings(adapter) -> None:
    if adapter.settings["save_projection"]:
        raise UserError(
            f"{adapter.source}: key 'adapter.peft.save_projection' must be false for vera on a UNet: PEFT saves the "
            f"shared projections from its tuner object, which diffusers-style attaching does not keep; they are "
            f"regenerated from 'adapter.peft.projection_prng_key' instead"
        )


def _wara_layer(r: int, shape: LayerShape, settings: dict) -> int:
    from waveft.adapters.wavelet_ops import padded_length, wavelet_filters

    filter_length = wavelet_filters(settings["wavelet_family"]).length
    return r * (padded_length(shape.out_features, filter_length) + padded_length(shape.in_features, filter_length))


# ---- AdaLoRA's rank allocation -------------------------------------------------------------------------------


class AdaLoraRankSchedule:
    """`AdaLoraModel.update_and_allocate` for a model adapted by diffusers' `add_adapter`, which keeps no tuner.

    The same three phases with PEFT's `RankAllocator`: warm-up (no masking), budget decrease (mask the least
    important singular values every `deltaT` steps), final fine-tuning (keep the final mask). Unlike PEFT, the
    rank pattern is not written into the adapter's config: `get_peft_model_state_dict` would then shrink the
    saved tensors through `AdaLoraModel.resize_state_dict_by_rank_pattern`, which a bare UNet lacks. The
    adapter is saved at its initial rank with the pruned singular values at zero, which gives the same outputs.
    """

    def __init__(self, model):
        """The schedule of the model's AdaLoRA adapter (made once per run, after attaching)."""
        from peft.tuners.adalora.layer import RankAllocator
        from peft.utils import PeftType

        (self.adapter_name,) = [n for n, c in model.peft_config.items() if c.peft_type == PeftType.ADALORA]
        self.config = model.peft_config[self.adapter_name]
        self.allocator = RankAllocator(model, self.config, self.adapter_name)
        self.rank_pattern = None

    def __call__(self, model, global_step: int) -> None:
        """Rank allocation after optimizer step `global_step`."""
        final_step = self.config.total_step - self.config.tfinal
        if global_step < final_step:
            _, rank_pattern = self.allocator.update_and_allocate(model, global_step)
            self.rank_pattern = rank_pattern or self.rank_pattern
        elif global_step == final_step:
            if not self.allocator.exp_avg_ipt:  # no step scored yet (the final allocation is the first step)
                self.allocator.update_ipt(model)
            _, self.rank_pattern = self.allocator.update_and_allocate(model, global_step, force_mask=True)
            self.allocator.reset_ipt()
        else:
            # A run resumed after the final allocation finds the mask in the saved singular values.
            self.rank_pattern = self.rank_pattern or self._rank_pattern_of_weights(model)
            self.allocator.mask_using_rank_pattern(model, self.rank_pattern)

    def state_dict(self) -> dict:
        """What a checkpoint keeps so that a resumed run allocates as the uninterrupted one does: the importance
        scores and their running averages over the steps so far, and the rank pattern."""
        a = self.allocator
        return {"ipt": a.ipt, "exp_avg_ipt": a.exp_avg_ipt, "exp_avg_unc": a.exp_avg_unc,
                "rank_pattern": self.rank_pattern}

    def load_state_dict(self, state: dict, device) -> None:
        def to_device(scores: dict) -> dict:
            return {name: score.to(device) for name, score in scores.items()}

        a = self.allocator
        a.ipt, a.exp_avg_ipt, a.exp_avg_unc = (to_device(state[k]) for k in ("ipt", "exp_avg_ipt", "exp_avg_unc"))
        self.rank_pattern = state["rank_pattern"]

    def _rank_pattern_of_weights(self, model) -> dict:
        suffix = f"lora_E.{self.adapter_name}"
        return {n: (p != 0).view(-1).tolist() for n, p in model.named_parameters() if suffix in n}


# LyCORIS layers shape their delta like the base weight; bitsandbytes' nf4 weight is packed.
NF4_PACKED_WEIGHT = ("PEFT's {} layer reshapes its delta to the base layer's weight tensor, which bitsandbytes "
                     "packs into (out * in / 2, 1) bytes in nf4 (int8 works)")


# ---- the registry --------------------------------------------------------------------------------------------

# WaveFT's and FourierFT's size: n_frequency trainable coefficients per layer, at most the smallest layer's weights.
N_FREQUENCY_COEFFICIENTS = SizeSetting("n_frequency", coefficients, max_value=smallest_layer,
                                       explanation="n_frequency coefficients per layer")

METHODS = {
    m.name: m
    for m in [
        # `peft: {use_idwt: false}` is the paper's SHiRA: the same sparse coefficients, no wavelet transform.
        Method(
            "waveft", "WaveFTConfig",
            N_FREQUENCY_COEFFICIENTS,
            dict(WAVEFT_PAPER_DEFAULTS, use_idwt=True),
            check_settings=_check_waveft_settings,
            check_layers=_check_waveft_fits,
            after_attach=_use_structured_waveft,
            peft_type="WAVEFT",
        ),
        # PEFT's own SHiRA: r * (out + in) sparse weights per layer, so r=1 is budget 1.
        Method(
            "shira", "ShiraConfig",
            SizeSetting("r", low_rank, max_value=_shira_largest_rank,
                        explanation="r * (out + in) sparse weights per layer"),
            dict(r=1, mask_type="random", random_seed=777),
            peft_type="SHIRA",
        ),
        Method(
            "lora", "LoraConfig",
            SizeSetting("r", low_rank, explanation="r * (out + in) per layer"),
            dict(r=1, lora_alpha=1, init_lora_weights=True),
            peft_type="LORA",
        ),
        Method(
            "loha", "LoHaConfig",
            SizeSetting("r", lambda r, shape, settings: 2 * low_rank(r, shape, settings),
                        explanation="two rank-r pairs, 2 r (out + in) per layer"),
            dict(r=1, alpha=64),
            peft_type="LOHA",
            quantization_refusals={"nf4": NF4_PACKED_WEIGHT.format("LoHa")},
        ),
        Method(
            "lokr", "LoKrConfig",
            SizeSetting("r", _lokr_layer, max_value=_lokr_largest_useful_rank, monotone=False,
                        explanation="Kronecker factors per layer, the second of rank r until it is full"),
            dict(r=20, alpha=192),
            peft_type="LOKR",
            quantization_refusals={"nf4": NF4_PACKED_WEIGHT.format("LoKr")},
        ),
        # The projections are regenerated from projection_prng_key: saving them needs PEFT's tuner object,
        # which attaching to a UNet does not keep (see waveft.adapters.attach).
        Method(
            "vera", "VeraConfig",
            SizeSetting("r", lambda r, shape, settings: shape.out_features + r,
                        explanation="out + r scaling vectors per layer"),
            dict(r=1402, save_projection=False),
            check_settings=_check_vera_settings,
            peft_type="VERA",
        ),
        Method(
            "fourierft", "FourierFTConfig",
            N_FREQUENCY_COEFFICIENTS,
            dict(n_frequency=2592, scaling=32.0),
            peft_type="FOURIERFT",
        ),
        # The budget counts what AdaLoRA ends at: target_r singular triplets (out + in + 1) per layer on
        # average, from init_r = 2 target_r as in the paper.
        Method(
            "adalora", "AdaLoraConfig",
            SizeSetting("target_r", lambda r, shape, settings: low_rank(r, shape, settings) + r,
                        derived=lambda r: {"init_r": 2 * r},
                        explanation="target_r (out + in + 1) per layer after rank allocation, "
                                    "from init_r = 2 target_r"),
            dict(target_r=1, init_r=2, lora_alpha=32),
            make_step_hook=AdaLoraRankSchedule,
            total_steps_field="total_step",
            peft_type="ADALORA",
        ),
        Method(
            "wara", "WaraConfig",
            SizeSetting("r", _wara_layer, explanation="r * (H + W) per layer over the padded wavelet grid"),
            dict(r=1, scaling=1.0, wavelet_family="db1"),
            config_module="waveft.adapters.wara",
            peft_type="WARA",
        ),
    ]
}


# ---- resolving an adapter section through its method, once ------------------------------------------------------


def get_method(name: str, source: str = "config") -> Method:
    if name not in METHODS:
        raise UserError(f"{source}: key 'adapter.type' names an unknown method {name!r} (known: {', '.join(METHODS)})")
    return METHODS[name]


@dataclass(frozen=True)
class ResolvedAdapter:
    """A run's adapter section resolved once, by `resolve_adapter` (which `load_config` calls): its method, its
    PEFT settings typed and checked, its target modules and budget. Attach, the trainer and run_info.json read
    this record; nothing downstream resolves the section again. Budget sizing needs the adapted layers' shapes,
    known once the UNet is built: `sized` does that one step (in `waveft.adapters.attach`)."""

    method: Method
    settings: dict  # the PEFT settings: the method's defaults < adapter.peft (< the budget's, once sized)
    target_modules: tuple[str, ...]
    implementation: str  # WaveFT's layer: "structured" (ours) or "peft"
    label: str  # the method's name in reports: adapter.label or adapter.type
    budget: Optional[float]  # adapter.budget, in LoRA-rank-1 units; None: `settings` as given
    plan: Optional[BudgetPlan] = None  # how the budget was met, once `sized`
    source: str = "config"  # the file that errors found later (sizing, PEFT's checks) name

    @property
    def type(self) -> str:
        return self.method.name

    def count_settings(self) -> dict:
        """`settings` over PEFT's own defaults: every field a parameter count may read."""
        defaults = {}
        for f in dataclasses.fields(self.method.config_class()):
            if f.default is not dataclasses.MISSING:
                defaults[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                defaults[f.name] = f.default_factory()
        return {**defaults, **self.settings}

    def sized(self, shapes: list[LayerShape]) -> "ResolvedAdapter":
        """With a budget: the record with the size setting that brings the method nearest to it on these layers
        (a UserError naming the nearest reachable budgets when none is near enough); without one: itself."""
        if self.budget is None or self.plan is not None:
            return self
        plan = nearest_size(self.type, self.method.size, self.budget, shapes, self.count_settings(), self.source)
        return dataclasses.replace(self, settings={**self.settings, **plan.settings}, plan=plan)

    def peft_config(self):
        """The PEFT config these settings make; PEFT's own checks surface as a UserError."""
        field_name = self.method.total_steps_field
        if field_name is not None and field_name not in self.settings:
            raise ValueError(f"adapter type {self.type!r} needs the run's total optimizer steps (total_steps)")
        try:
            return self.method.config_class()(target_modules=list(self.target_modules), **self.settings)
        except (ValueError, TypeError) as exc:
            reason = str(exc).splitlines()[0]
            raise UserError(f"{self.source}: adapter '{self.type}' settings rejected by PEFT: {reason}") from None


def _settable_fields(config_class) -> dict:
    hints = typing.get_type_hints(config_class)
    return {f.name: hints[f.name] for f in dataclasses.fields(config_class) if f.name not in RESERVED_PEFT_FIELDS}


def _typed_peft_settings(method: Method, peft: dict, source: str) -> dict:
    """The method's defaults overlaid with `adapter.peft`, each value checked against PEFT's annotation."""
    fields = _settable_fields(method.config_class())
    settings = dict(method.defaults)
    for key, value in peft.items():
        if key == "target_modules":
            raise UserError(
                f"{source}: set target modules with 'adapter.target_modules', not 'adapter.peft.target_modules'"
            )
        if key == method.total_steps_field:
            raise UserError(f"{source}: key 'adapter.peft.{key}' is set from 'train.max_steps'; remove it")
        if key not in fields:
            raise UserError(f"{source}: unknown key 'adapter.peft.{key}' for {method.peft_config_class_name}")
        settings[key] = coerce_value(value, fields[key], f"adapter.peft.{key}", source)
    return settings


def _is_neutral(value) -> bool:
    return value is None or value is False or value == "none" or (isinstance(value, (dict, list, set)) and not value)


def _check_budget_settings(adapter: ResolvedAdapter, peft: dict) -> None:
    """Model-free: with a budget, `adapter.peft` sets nothing the budget sets or cannot count."""
    if adapter.budget is None:
        return
    for key in adapter.method.size.budget_keys():
        if key in peft:
            raise UserError(f"{adapter.source}: key 'adapter.peft.{key}' is set by 'adapter.budget' for "
                            f"{adapter.type}; set one of them")
    for key in COUNT_CHANGING_SETTINGS:
        if key in adapter.settings and not _is_neutral(adapter.settings[key]):
            raise UserError(
                f"{adapter.source}: key 'adapter.peft.{key}'={adapter.settings[key]!r} changes the parameter count "
                f"in a way 'adapter.budget' does not model; leave it unset or drop the budget"
            )


def resolve_adapter(section, total_steps: Optional[int] = None, source: str = "config") -> ResolvedAdapter:
    """The adapter section (`waveft.config.AdapterConfig`) resolved and checked without a model.

    `total_steps` (the run's train.max_steps) fills the method's `total_steps_field` (AdaLoRA's `total_step`);
    without it such a method is checked up to building its PEFT config, which then needs it.
    """
    method = get_method(section.type, source)
    settings = _typed_peft_settings(method, section.peft, source)
    if method.total_steps_field is not None and total_steps is not None:
        settings[method.total_steps_field] = total_steps
    adapter = ResolvedAdapter(method, settings, tuple(section.target_modules), section.implementation,
                              section.label or section.type, section.budget, source=source)
    _check_budget_settings(adapter, section.peft)
    if method.check_settings is not None:
        method.check_settings(adapter)
    if method.total_steps_field is None or total_steps is not None:
        adapter.peft_config()  # PEFT's own checks of the settings, before any model is loaded
    return adapter


def as_resolved(adapter, total_steps: Optional[int] = None) -> ResolvedAdapter:
    """A resolved record as it is; a bare adapter section (tests, scripts, notebooks) resolved here, once."""
    return adapter if isinstance(adapter, ResolvedAdapter) else resolve_adapter(adapter, total_steps)


def resolved_peft_settings(adapter) -> dict:
    """The method's defaults overlaid with `adapter.peft`, typed (before any budget sizing)."""
    return dict(as_resolved(adapter).settings)


def settings_with_peft_defaults(adapter) -> dict:
    """The adapter's resolved PEFT settings over PEFT's own defaults: every field the counts may read."""
    return as_resolved(adapter).count_settings()


def plan_budget(adapter, shapes: list[LayerShape]) -> BudgetPlan:
    """The size setting that brings the method nearest to `adapter.budget` on these layers, or a UserError naming
    the nearest budgets it can reach."""
    return as_resolved(adapter).sized(shapes).plan


def build_peft_config(adapter, total_steps: Optional[int] = None):
    """The PEFT config of an adapter (resolved record or section); PEFT's own checks surface as a UserError."""
    return as_resolved(adapter, total_steps).peft_config()
