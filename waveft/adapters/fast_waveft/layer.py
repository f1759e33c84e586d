"""WaveFT layer computing PEFT's output without building the dense `out x in` delta weight.

PEFT's `WaveFTLinear` rebuilds `delta_W = scaling * IDWT2(scatter(spectrum))` on every forward and adds
`x @ delta_W^T`. The IDWT is separable (`waveft.adapters.wavelet_ops`), so for N tokens x (N, in):

    u = x C                                   analysis along the input features      (N, W)
    z[:, s] += u[:, g] * scaling * spectrum   one term per trainable coefficient      (N, H)
    delta  = z R^T                            synthesis along the output features    (N, out)

with cost O(N (L (in + out) + n_frequency)). Backward recomputes `u` from the saved input instead of
keeping it, so the layer saves what LoRA's `lora_A` saves: its input.
"""
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from peft.tuners.waveft import wavelet as peft_wavelet
from peft.tuners.waveft.layer import WaveFTLinear

from waveft.adapters.wavelet_ops import (
    SynthesisAxis,
    WaveletFilters,
    idwt2_columns,
    synthesis_axis,
    synthesize2,
    wavelet_filters,
)


def peft_compatible_filters(name: str) -> WaveletFilters:
    """The filters stock PEFT uses for `name` where it can run it, else PyWavelets' (with a warning).

    PEFT ships its own filter table (db1-db10, sym2-sym10, coif1-coif5). Its coif4 differs from PyWavelets'
    by up to 1.2e-2 and is what PEFT-trained coif4 adapters were trained with, so it is kept; its coif5 has
    48 taps instead of 30 and fails in PEFT's forward, so PyWavelets' coif5 is used, like every wavelet
    PEFT's config accepts but its table lacks.
    """
    filters = wavelet_filters(name)
    if name in peft_wavelet.wavelist():
        peft_filters = peft_wavelet.Wavelet(name)
        if len(peft_filters.rec_lo) == filters.length:
            return WaveletFilters(name, tuple(peft_filters.rec_lo), tuple(peft_filters.rec_hi))
    warnings.warn(
        f"wavelet {name!r}: stock PEFT cannot run it (its filter table lacks it or has it wrong), so an adapter "
        f"trained here with it loads in stock PEFT but fails there at the first forward"
    )
    return filters


@dataclass(frozen=True)
class AdapterPlan:
    """What the structured forward needs for one adapter of one layer, on one device."""

    indices: torch.Tensor  # PEFT's `waveft_indices[adapter]` it was built from: a new tensor means a new adapter
    wavelet: str
    use_idwt: bool
    output_axis: SynthesisAxis  # R
    input_axis: SynthesisAxis  # C
    output_columns: torch.Tensor  # s: column of R (and of z) per spectrum entry
    input_columns: torch.Tensor  # g: column of C (and of u) per spectrum entry

    @classmethod
    def build(cls, layer: WaveFTLinear, adapter: str, device: torch.device) -> "AdapterPlan":
        indices = layer.waveft_indices[adapter]
        wavelet, use_idwt = layer.waveft_wavelet_family[adapter], layer.waveft_use_idwt[adapter]
        rows, cols = indices.to(device)
        if use_idwt:
            filters = peft_compatible_filters(wavelet)
            output_axis = synthesis_axis(layer.out_features, filters)
            input_axis = synthesis_axis(layer.in_features, filters)
            output_columns, input_columns = idwt2_columns(rows, cols, output_axis, input_axis)
        else:
            output_axis = SynthesisAxis.identity(layer.out_features)
            input_axis = SynthesisAxis.identity(layer.in_features)
            output_columns, input_columns = rows, cols
        return cls(indices, wavelet, use_idwt, output_axis, input_axis, output_columns, input_columns)

    def matches(self, layer: WaveFTLinear, adapter: str, device: torch.device) -> bool:
        return (
            self.indices is layer.waveft_indices[adapter]
            and self.wavelet == layer.waveft_wavelet_family[adapter]
            and self.use_idwt == layer.waveft_use_idwt[adapter]
            and self.output_columns.device == device
        )


def _gather_columns(values: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    return torch.gather(values, 1, columns.expand(values.shape[0], -1))


def _scatter_add_columns(values: torch.Tensor, columns: torch.Tensor, width: int) -> torch.Tensor:
    return values.new_zeros(values.shape[0], width).scatter_add_(1, columns.expand_as(values), values)


class StructuredWaveFTDelta(torch.autograd.Function):
    """`x @ delta_W^T` for x (N, in), from the spectrum, never forming `delta_W`.

    Runs with autocast off, in the spectrum's dtype (x arrives cast to it, as in PEFT), so the scatter's
    operands agree in dtype whatever the caller's autocast state.
    """

    @staticmethod
    def forward(ctx, x, spectrum, scaling: float, plan: AdapterPlan):
        with torch.autocast(x.device.type, enabled=False):
            coefficients = _gather_columns(plan.input_axis.analyze(x), plan.input_columns)
            coefficients.mul_(spectrum * scaling)
            z = _scatter_add_columns(coefficients, plan.output_columns, plan.output_axis.padded)
            delta = plan.output_axis.synthesize(z)
        ctx.save_for_backward(x, spectrum)
        ctx.scaling, ctx.plan = scaling, plan
        return delta

    @staticmethod
    def backward(ctx, grad_delta):
        x, spectrum = ctx.saved_tensors
        plan, scaling = ctx.plan, ctx.scaling
        grad_x = grad_spectrum = None
        with torch.autocast(x.device.type, enabled=False):
            w = _gather_columns(plan.output_axis.analyze(grad_delta.to(x.dtype)), plan.output_columns)
            if ctx.needs_input_grad[1]:
                u = _gather_columns(plan.input_axis.analyze(x), plan.input_columns)
                grad_spectrum = torch.linalg.vecdot(w, u, dim=0).mul_(scaling)
            if ctx.needs_input_grad[0]:
                du = _scatter_add_columns(w.mul_(spectrum * scaling), plan.input_columns, plan.input_axis.padded)
                grad_x = plan.input_axis.synthesize(du)
        return grad_x, grad_spectrum, None, None


class FastWaveFTLinear(WaveFTLinear):
    """PEFT's `WaveFTLinear` with the structured forward: same parameters, state dict, config and results.

    Made by switching `__class__` of existing layers (`enable_fast_waveft`); merging still builds the dense
    delta, once.
    """

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        previous_dtype = x.dtype

        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            result = self.base_layer(x, *args, **kwargs)
        elif self.merged:
            result = self.base_layer(x, *args, **kwargs)
        else:
            result = self.base_layer(x, *args, **kwargs)
            for active_adapter in self.active_adapters:
                if active_adapter not in self.waveft_spectrum.keys():
                    continue
                spectrum = self.waveft_spectrum[active_adapter]
                x = self._cast_input_dtype(x, spectrum.dtype)
                result = result + self._structured_delta(active_adapter, x)

        return result.to(previous_dtype)

    def get_delta_weight(self, adapter) -> torch.Tensor:
        spectrum = self.waveft_spectrum[adapter]
        plan = self._plan(adapter, spectrum.device)
        coefficients = spectrum.new_zeros(plan.output_axis.padded, plan.input_axis.padded)
        coefficients = coefficients.index_put((plan.output_columns, plan.input_columns), spectrum)
        return synthesize2(coefficients, plan.output_axis, plan.input_axis) * self.waveft_scaling[adapter]

    def _structured_delta(self, adapter: str, x: torch.Tensor) -> torch.Tensor:
        plan = self._plan(adapter, x.device)
        delta = StructuredWaveFTDelta.apply(
            x.reshape(-1, self.in_features), self.waveft_spectrum[adapter], self.waveft_scaling[adapter], plan
        )
        return delta.reshape(*x.shape[:-1], self.out_features)

    def _plan(self, adapter: str, device: torch.device) -> AdapterPlan:
        plans = self.__dict__.setdefault("_fast_waveft_plans", {})
        plan = plans.get(adapter)
        if plan is None or not plan.matches(self, adapter, device):
            plan = plans[adapter] = AdapterPlan.build(self, adapter, device)
        return plan
