"""`adapter.budget`, in the WaveFT paper's unit, turned into a method's own size setting: arithmetic only.

Budget 1 is the trainable parameter count of LoRA rank 1 over the adapted layers, sum(out + in): 1,451,520
on SDXL's 560 attention projections. Each method has one integer setting that sizes it (a rank, a number of
coefficients), and a count of its parameters as a function of that setting and the layer shapes, the same
count PEFT's layers hold (a `SizeSetting`, declared with the method in `waveft.adapters.methods`). The
budget picks the value whose count is nearest to budget x unit; a budget whose nearest count is off by more
than `BUDGET_TOLERANCE` cannot be reached by that method and is refused, naming the nearest budgets it can
reach. Nothing here knows a method by name.
"""
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

from waveft.errors import UserError

# Relative distance between a budget's parameter count and the count a method reaches that still counts as
# that budget. Coefficient methods land within 1/2592 of any budget; rank methods only on whole budgets.
BUDGET_TOLERANCE = 0.01


@dataclass(frozen=True)
class LayerShape:
    out_features: int
    in_features: int


def lora_rank_one_parameters(shapes: list[LayerShape]) -> int:
    """The budget unit: LoRA rank 1's trainable parameters over these layers."""
    return sum(s.out_features + s.in_features for s in shapes)


@dataclass(frozen=True)
class SizeSetting:
    """The one integer setting that sizes a method, and the parameters each of its values holds."""

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
        """Trainable parameters over `shapes` (a Counter of LayerShape) with `key` = `value`."""
        return sum(n * self.layer_parameters(value, shape, settings) for shape, n in shapes.items())

    def budget_keys(self) -> tuple[str, ...]:
        """Every setting a budget sets: `key` and the settings derived from it."""
        return (self.key, *self.derived(1))


# ---- counts several methods share ------------------------------------------------------------------------


def coefficients(n: int, shape: LayerShape, settings: dict) -> int:
    """`n` trainable coefficients per layer, whatever its shape."""
    return n


def low_rank(r: int, shape: LayerShape, settings: dict) -> int:
    """A rank-r pair of factors: r * (out + in)."""
    return r * (shape.out_features + shape.in_features)


def smallest_layer(shapes: list[LayerShape], settings: dict) -> int:
    """Sparse coefficients per layer cannot outnumber the smallest layer's weights."""
    return min(s.out_features * s.in_features for s in shapes)


# ---- the plan ------------------------------------------------------------------------------------------------


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
            f"budget {self.budget:g} x {self.unit:,} = {self.target_parameters:,} parameters -> "
            f"{self.method} {settings}: {self.parameters:,} parameters ({self.relative_error:+.3%})"
        )


def _format_reachable(size: SizeSetting, value: int, count: int, unit: int) -> str:
    return f"{count / unit:.4g} ({size.key}={value})"


def nearest_size(method: str, size: SizeSetting, budget: float, shapes: list[LayerShape], settings: dict,
                 source: str = "config") -> BudgetPlan:
    """The value of `size.key` that brings `method` nearest to `budget` on these layers, or a UserError
    naming the nearest budgets it can reach. `settings` are the method's other settings, every field the
    count may read. Cost: O(log(value)) counts for a monotone size, else one count per allowed value."""
    by_shape = Counter(shapes)
    unit = lora_rank_one_parameters(shapes)
    target = round(budget * unit)

    def count(value: int) -> int:
        return size.parameters(value, by_shape, {**settings, **size.derived(value)})

    max_value = size.max_value(shapes, settings) if size.max_value is not None else None
    below, above = _bracket(count, target, max_value, size.monotone)
    nearest = min((v for v in (below, above) if v is not None), key=lambda v: abs(count(v) - target))
    if abs(count(nearest) - target) > BUDGET_TOLERANCE * target:
        reachable = " and ".join(_format_reachable(size, v, count(v), unit) for v in (below, above) if v is not None)
        raise UserError(
            f"{source}: key 'adapter.budget'={budget:g} cannot be reached by {method} "
            f"({size.explanation}); the nearest reachable budget{'s are' if below and above else ' is'} {reachable}"
        )
    return BudgetPlan(
        method=method,
        budget=budget,
        settings={size.key: nearest, **size.derived(nearest)},
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
