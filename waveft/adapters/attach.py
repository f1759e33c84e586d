"""Attach the configured adapter to a model (the UNet, a CLIP text encoder) through its library's PEFT integration
(diffusers' and transformers' `add_adapter`), after checking it fits the model."""
from dataclasses import dataclass
from typing import Optional

import torch

from waveft.adapters.budget import BudgetPlan, LayerShape
from waveft.adapters.methods import Method, ResolvedAdapter, as_resolved
from waveft.adapters.waveft_locations import shared_waveft_locations
from waveft.errors import UserError
from waveft.models import is_linear_layer


def module_matches(name: str, target: str) -> bool:
    """PEFT's rule for a list entry: the full module name, or its dotted suffix."""
    return name == target or name.endswith("." + target)


@dataclass(frozen=True)
class AdaptedModel:
    """Which model an adapter goes on, for messages: its name and the config key holding its target modules."""

    name: str = "UNet"
    key: str = "adapter.target_modules"


UNET = AdaptedModel()


def target_layers(model: torch.nn.Module, target_modules: list[str],
                  which: AdaptedModel = UNET) -> dict[str, torch.nn.Linear]:
    """The modules the adapter will wrap; each target entry must match something, and only Linear layers (plain
    or quantized by `model.quantize`)."""
    found = {}
    for target in target_modules:
        matches = [(n, m) for n, m in model.named_modules() if module_matches(n, target)]
        if not matches:
            raise UserError(f"{which.key} entry {target!r} matches no module of the {which.name}")
        for name, module in matches:
            if not is_linear_layer(module):
                raise UserError(
                    f"{which.key} entry {target!r} matches {name} of the {which.name}, a {type(module).__name__}, "
                    f"not a Linear layer"
                )
            found[name] = module
    return found


@dataclass
class AdaptedLayer:
    name: str
    out_features: int
    in_features: int
    trainable_parameters: int


def adapted_layers(model: torch.nn.Module) -> list[AdaptedLayer]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    rows = []
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            base = module.get_base_layer()
            trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
            rows.append(AdaptedLayer(name, base.out_features, base.in_features, trainable))
    return rows


def inject_adapter(model, peft_config, adapter_name: str = "default", which: AdaptedModel = UNET) -> None:
    """The model's `add_adapter` (diffusers' or transformers' PEFT integration), or the same steps for PEFT tuners
    that `add_adapter` refuses.

    PEFT's `inject_adapter_in_model` (behind `add_adapter`) refuses tuners with state shared between layers
    (VeRA's random projections) because it drops the tuner object. Every VeRA layer holds the shared
    projections itself, so only saving them needs the tuner; our VeRA configs keep `save_projection=False`
    and the projections are regenerated from their seed when loaded.
    """
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    tuner_class = PEFT_TYPE_TO_TUNER_MAPPING[peft_config.peft_type]
    if not tuner_class.uses_shared_state:
        with shared_waveft_locations():  # WaveFT: one location draw per layer size, PEFT's values
            model.add_adapter(peft_config, adapter_name=adapter_name)
        return
    if getattr(model, "peft_config", None):
        raise UserError(f"{peft_config.peft_type.value} cannot be added beside another adapter of the {which.name}")
    peft_config.base_model_name_or_path = None
    tuner_class(model, peft_config, adapter_name=adapter_name)  # wraps the layers in place, sets model.peft_config
    model._hf_peft_config_loaded = True  # what both libraries' integrations set
    model.set_adapter(adapter_name)


@dataclass
class AttachedAdapter:
    """What `attach_adapter` attached: the run's resolved adapter, sized to these layers, and the layers."""

    adapter: ResolvedAdapter  # with the budget's settings (adapter.plan) when adapter.budget is set
    layers: list[AdaptedLayer]

    @property
    def method(self) -> Method:
        return self.adapter.method

    @property
    def budget(self) -> Optional[BudgetPlan]:
        """None without adapter.budget; its settings are in the attached PEFT config."""
        return self.adapter.plan

    @property
    def trainable_parameters(self) -> int:
        return sum(layer.trainable_parameters for layer in self.layers)

    def describe(self) -> str:
        """The per-shape table of trainable parameters, and how the budget was met."""
        lines = [format_adapter_table(self.layers)]
        if self.budget is not None:
            lines.append(self.budget.describe())
        return "\n".join(lines)


def attach_adapter(model, adapter, adapter_name: str = "default", total_steps: Optional[int] = None,
                   which: AdaptedModel = UNET) -> AttachedAdapter:
    """Add the adapter to `model` (frozen beforehand), keep its trainable weights in fp32, return what it attached.

    `model` is the UNet or a CLIP text encoder (`which` names it and its target modules' key in messages).
    `adapter` is the run's `ResolvedAdapter` (`RunConfig.resolved_adapter`, or
    `RunConfig.text_encoder_adapter()`); a bare adapter section is resolved here, with `total_steps`, the run's
    optimizer step count that methods with a schedule (AdaLoRA) need. With a budget, the method's size setting
    comes from the budget and this model's layer shapes: the same LoRA-rank-1 unit, counted per model.
    """
    adapter = as_resolved(adapter, total_steps)
    method = adapter.method
    layers = target_layers(model, list(adapter.target_modules), which)
    adapter = adapter.sized([LayerShape(m.out_features, m.in_features) for m in layers.values()])
    peft_config = adapter.peft_config()
    if method.check_layers is not None:
        method.check_layers(peft_config, layers)
    model.requires_grad_(False)
    try:
        inject_adapter(model, peft_config, adapter_name, which)
    except ValueError as exc:
        raise UserError(f"adapter '{adapter.type}' could not be attached to the {which.name}: "
                        f"{str(exc).splitlines()[0]}") from None
    if method.after_attach is not None:
        method.after_attach(model, adapter)
    # Under fp16/bf16 the optimizer must step fp32 master weights ("Attempting to unscale FP16 gradients").
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    return AttachedAdapter(adapter, adapted_layers(model))


def attach_text_encoder_adapter(encoder, component: str, adapter) -> AttachedAdapter:
    """`attach_adapter` on SDXL's text encoder `component`, its messages naming it and the setting its target
    modules come from (`adapter`: `RunConfig.text_encoder_adapter()`)."""
    return attach_adapter(encoder, adapter, which=AdaptedModel(component, "adapter.text_encoders.target_modules"))


def format_adapter_table(rows: list[AdaptedLayer]) -> str:
    """One line per distinct layer shape: how many layers, trainable parameters per layer and in total."""
    by_shape: dict[tuple, list[AdaptedLayer]] = {}
    for row in rows:
        by_shape.setdefault((row.out_features, row.in_features, row.trainable_parameters), []).append(row)
    lines = ["| out x in | layers | trainable / layer | trainable |", "|---|---|---|---|"]
    for (out_f, in_f, per_layer), group in sorted(by_shape.items()):
        lines.append(f"| {out_f} x {in_f} | {len(group)} | {per_layer:,} | {per_layer * len(group):,} |")
    total = sum(r.trainable_parameters for r in rows)
    lines.append(f"| total | {len(rows)} | | {total:,} |")
    return "\n".join(lines)


def format_model_table(attached: dict[str, AttachedAdapter]) -> str:
    """One line per adapted model ({"UNet": ..., "text_encoder": ...}): its adapted layers and trainable
    parameters, and how its budget was met."""
    lines = ["| model | layers | trainable | budget |", "|---|---|---|---|"]
    for name, adapter in attached.items():
        budget = adapter.budget.describe() if adapter.budget is not None else "settings as given"
        lines.append(f"| {name} | {len(adapter.layers)} | {adapter.trainable_parameters:,} | {budget} |")
    return "\n".join(lines)
