"""`adapter.budget`, in the WaveFT paper's unit, turned into each method's own size setting.

Budget 1 is the trainable parameter count of LoRA rank 1 over the adapted layers, sum(out + in): 1,451,520
on SDXL's 560 attention projections. Each method has one integer setting that sizes it (a rank, a number of
coefficients), and a count of its parameters as a function of that setting and the layer shapes, the same
count PEFT's layers hold. The budget picks the value whose count is nearest to budget x unit; a budget whose
nearest count is off by more than `BUDGET_TOLERANCE` cannot be reached by that method and is refused,
naming the nearest budgets it can reach.
"""
import dataclasses
import math
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Optional

from waveft.errors import UserError

# Relative distance between a budget's parameter count and the count a method reaches that still counts as
# that budget. Coefficient methods land within 1/2592 of any budget; rank methods only on whole budgets.
BUDGET_TOLERANCE = 0.01

# Settings that change a method's parameter count in ways the counts below do not model (extra trainable
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
class LayerShape:
    out_features: int
    in_features: int


def lora_rank_one_parameters(shapes: list[LayerShape]) -> int:
    """The budget unit: LoRA rank 1's trainable parameters over these layers."""
    return sum(s.out_features + s.in_features for s in shapes)


# ---- each method's count -------------------------------------------------------------------------------------


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


def _wara_layer(r: int, shape: LayerShape, settings: dict) -> int:
    from waveft.adapters.wavelet_ops import padded_length, wavelet_filters

    filter_length = wavelet_filters(settings["wavelet_family"]).length
    return r * (padded_length(shape.out_features, filter_length) + padded_length(shape.in_features, filter_length))


def _coefficients(n: int, shape: LayerShape, settings: dict) -> int:
    return n


def _low_rank(r: int, shape: LayerShape, settings: dict) -> int:
    return r * (shape.out_features + shape.in_features)


def _smallest_layer(shapes: list[LayerShape], settings: dict) -> int:
    """Sparse coefficients per layer cannot outnumber the smallest layer's weights."""
    return min(s.out_features * s.in_features for s in shapes)


def _shira_largest_rank(shapes: list[LayerShape], settings: dict) -> int:
    """SHiRA's r * (out + in) sparse weights must fit in every layer."""
    return min(s.out_features * s.in_features // (s.out_features + s.in_features) for s in shapes)


@dataclass(frozen=True)
class BudgetRule:
    key: str  # the setting the budget chooses
    # Trainable parameters of one layer when `key` is `value`, given the other resolved settings.
    layer_parameters: Callable[[int, LayerShape, dict], int]
    # The largest allowed value, or None when unbounded; values from 1 up to it are allowed.
    max_value: Optional[Callable[[list[LayerShape], dict], int]] = None
    # Whether the count grows with the value (then it is bisected; else every allowed value is tried).
    monotone: bool = True
    # Settings that follow the chosen value (AdaLoRA starts at twice its final rank, as in the paper).
    derived: Callable[[int], dict] = lambda value: {}
    explanation: str = ""

    def parameters(self, value: int, shapes: Counter, settings: dict) -> int:
        return sum(n * self.layer_parameters(value, shape, settings) for shape, n in shapes.items())


BUDGET_RULES = {
    "waveft": BudgetRule("n_frequency", _coefficients, max_value=_smallest_layer,
                         explanation="n_frequency coefficients per layer"),
    "shira": BudgetRule("r", _low_rank, max_value=_shira_largest_rank,
                        explanation="r * (out + in) sparse weights per layer"),
    "lora": BudgetRule("r", _low_rank, explanation="r * (out + in) per layer"),
    "loha": BudgetRule("r", lambda r, shape, settings: 2 * _low_rank(r, shape, settings),
                       explanation="two rank-r pairs, 2 r (out + in) per layer"),
    "lokr": BudgetRule("r", _lokr_layer, max_value=_lokr_largest_useful_rank, monotone=False,
                       explanation="Kronecker factors per layer, the second of rank r until it is full"),
    "vera": BudgetRule("r", lambda r, shape, settings: shape.out_features + r,
                       explanation="out + r scaling vectors per layer"),
    "fourierft": BudgetRule("n_frequency", _coefficients, max_value=_smallest_layer,
                            explanation="n_frequency coefficients per layer"),
    # What AdaLoRA ends at: target_r singular triplets (out + in + 1) per layer on average.
    "adalora": BudgetRule("target_r", lambda r, shape, settings: _low_rank(r, shape, settings) + r,
                          derived=lambda r: {"init_r": 2 * r},
                          explanation="target_r (out + in + 1) per layer after rank allocation, from init_r = 2 target_r"),
    "wara": BudgetRule("r", _wara_layer, explanation="r * (H + W) per layer over the padded wavelet grid"),
}


# ---- the plan --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BudgetPlan:
    method: str
    budget: float
    settings: dict  # what the budget sets in adapter.peft
    target_parameters: int  # budget x unit
    parameters: int  # what the method holds with `settings`
    unit: int  # LoRA rank 1's count over the same layers

    @property
    def relative_error(self) -> float:
        return (self.parameters - self.target_parameters) / self.target_parameters

    def apply(self, adapter):
        """The adapter section with the budget's settings in `peft`."""
        return dataclasses.replace(adapter, peft={**adapter.peft, **self.settings})

    def run_info(self) -> dict:
        return {
            "budget_settings": dict(self.settings),
            "budget_target_parameters": self.target_parameters,
            "budget_parameters": self.parameters,
            "budget_relative_error": self.relative_error,
        }

    def describe(self) -> str:
        settings = ", ".join(f"{k}={v}" for k, v in self.settings.items())
        return (
            f"budget {self.budget:g} x {self.unit:,} = {self.target_parameters:,} parameters -> {self.method} {settings}: "
            f"{self.parameters:,} parameters ({self.relative_error:+.3%})"
        )


def check_budget_settings(adapter, source: str = "config") -> None:
    """Model-free: with a budget, `adapter.peft` sets nothing the budget sets or cannot count."""
    from waveft.adapters.methods import resolved_peft_settings

    if adapter.budget is None:
        return
    rule = BUDGET_RULES[adapter.type]
    for key in (rule.key, *rule.derived(1)):
        if key in adapter.peft:
            raise UserError(
                f"{source}: key 'adapter.peft.{key}' is set by 'adapter.budget' for {adapter.type}; set one of them"
            )
    settings = resolved_peft_settings(adapter, source)
    for key in COUNT_CHANGING_SETTINGS:
        if key in settings and not _is_neutral(settings[key]):
            raise UserError(
                f"{source}: key 'adapter.peft.{key}'={settings[key]!r} changes the parameter count in a way "
                f"'adapter.budget' does not model; leave it unset or drop the budget"
            )


def settings_with_peft_defaults(adapter, source: str = "config") -> dict:
    """The adapter's resolved PEFT settings over PEFT's own defaults: every field the counts may read."""
    from waveft.adapters.methods import get_method, resolved_peft_settings

    settings = {}
    for f in dataclasses.fields(get_method(adapter.type, source).config_class()):
        if f.default is not dataclasses.MISSING:
            settings[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            settings[f.name] = f.default_factory()
    return {**settings, **resolved_peft_settings(adapter, source)}


def _is_neutral(value) -> bool:
    return value is None or value is False or value == "none" or (isinstance(value, (dict, list, set)) and not value)


def _format_reachable(rule: BudgetRule, value: int, count: int, unit: int) -> str:
    return f"{count / unit:.4g} ({rule.key}={value})"


def plan_budget(adapter, shapes: list[LayerShape], source: str = "config") -> BudgetPlan:
    """The setting that brings `adapter.type` nearest to `adapter.budget` on these layers, or a UserError
    naming the nearest budgets it can reach."""
    check_budget_settings(adapter, source)
    rule = BUDGET_RULES[adapter.type]
    settings = settings_with_peft_defaults(adapter, source)
    by_shape = Counter(shapes)
    unit = lora_rank_one_parameters(shapes)
    target = round(adapter.budget * unit)

    def count(value: int) -> int:
        return rule.parameters(value, by_shape, {**settings, **rule.derived(value)})

    max_value = rule.max_value(shapes, settings) if rule.max_value is not None else None
    below, above = _bracket(count, target, max_value, rule.monotone)
    nearest = min((v for v in (below, above) if v is not None), key=lambda v: abs(count(v) - target))
    if abs(count(nearest) - target) > BUDGET_TOLERANCE * target:
        reachable = " and ".join(_format_reachable(rule, v, count(v), unit) for v in (below, above) if v is not None)
        raise UserError(
            f"{source}: key 'adapter.budget'={adapter.budget:g} cannot be reached by {adapter.type} "
            f"({rule.explanation}); the nearest reachable budget{'s are' if below and above else ' is'} {reachable}"
        )
    return BudgetPlan(
        method=adapter.type,
        budget=adapter.budget,
        settings={rule.key: nearest, **rule.derived(nearest)},
        target_parameters=target,
        parameters=count(nearest),
        unit=unit,
    )


def _bracket(count: Callable[[int], int], target: int, max_value: Optional[int], monotone: bool):
    """(v1, v2): the allowed values whose counts are nearest below and at-or-above `target` (None if none)."""
    if not monotone:
        values = range(1, max_value + 1)
        below = [v for v in values if count(v) < target]
        above = [v for v in values if count(v) >= target]
        return (max(below, key=count) if below else None), (min(above, key=count) if above else None)
    # Smallest value reaching the target: grow an upper bound, then bisect.
    high = 1
    while count(high) < target and (max_value is None or high < max_value):
        high = high * 2 if max_value is None else min(high * 2, max_value)
    if count(high) < target:
        return high, None
    low = 0  # count(low) < target, with count(0) standing for "below every allowed value"
    while high - low > 1:
        middle = (low + high) // 2
        if count(middle) < target:
            low = middle
        else:
            high = middle
    return (low or None), high


def adapted_layers_budget(adapter, layers) -> Optional[BudgetPlan]:
    """The budget plan of a run (None without a budget). `layers` have `out_features` and `in_features`."""
    if adapter.budget is None:
        return None
    return plan_budget(adapter, [LayerShape(l.out_features, l.in_features) for l in layers])
