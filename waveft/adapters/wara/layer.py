"""WaRA's layer: `x @ delta_W^T` for `delta_W = scaling * R (B A) C^T` without forming `delta_W`.

`R` (out x H) and `C` (in x W) are the 1-D inverse DWTs of the output and input axes
(`waveft.adapters.wavelet_ops`; the 2-D inverse DWT is separable). For N tokens x (N, in):

    u = x C             analysis along the input features        (N, W)
    t = u A^T           into the rank-r space                    (N, r)
    delta = (t B^T) R^T  synthesis along the output features      (N, out), times scaling

O(N (L (in + out) + r (H + W))) for filter length L. Backward recomputes `u` from the saved input, so the
layer keeps only its input and the (N, r) `t` for backward, like LoRA. Merging builds `delta_W` once.
"""
import functools
import math
import warnings
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from waveft.adapters.tuner_forward import additive_forward
from waveft.adapters.wavelet_ops import (
    SynthesisAxis,
    cached_tensors,
    synthesis_axis,
    synthesize2,
    wavelet_filters,
)

from .config import WaraConfig


@functools.cache
@cached_tensors
def _block_order(axis: SynthesisAxis, device: torch.device) -> torch.Tensor:
    """For each interleaved operator column of `axis`, the row of B (or column of A) in block order
    (all low-pass coefficients, then all high-pass) that multiplies it."""
    return torch.argsort(axis.columns(torch.arange(axis.padded))).to(device)


class WaveletLowRankDelta(torch.autograd.Function):
    """`scaling * x C A^T B^T R^T` for x (N, in), with A and B in interleaved operator order.

    Runs with autocast off in the factors' dtype (x arrives cast to it, as in PEFT's layers), so mixed
    precision trains fp32 factors.
    """

    @staticmethod
    def forward(ctx, x, a, b, scaling: float, output_axis: SynthesisAxis, input_axis: SynthesisAxis):
        with torch.autocast(x.device.type, enabled=False):
            t = input_axis.analyze(x) @ a.T
            delta = output_axis.synthesize(t @ b.T).mul_(scaling)
        ctx.save_for_backward(x, a, b, t)
        ctx.scaling, ctx.output_axis, ctx.input_axis = scaling, output_axis, input_axis
        return delta

    @staticmethod
    def backward(ctx, grad_delta):
        x, a, b, t = ctx.saved_tensors
        need_x, need_a, need_b = ctx.needs_input_grad[:3]
        grad_x = grad_a = grad_b = None
        with torch.autocast(x.device.type, enabled=False):
            w = ctx.output_axis.analyze(grad_delta.to(x.dtype)).mul_(ctx.scaling)  # gradient w.r.t. t B^T: (N, H)
            if need_b:
                grad_b = w.T @ t
            grad_t = w @ b  # (N, r)
            if need_a:
                grad_a = grad_t.T @ ctx.input_axis.analyze(x)
            if need_x:
                grad_x = ctx.input_axis.synthesize(grad_t @ a)
        return grad_x, grad_a, grad_b, None, None, None


class WaraLayer(BaseTunerLayer):
    # Names of the trainable adapter weights, and of the other per-adapter state.
    adapter_layer_names = ("wara_A", "wara_B")
    other_param_names = ("wara_r", "wara_scaling", "wara_wavelet_family")

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.wara_r = {}
        self.wara_scaling = {}
        self.wara_wavelet_family = {}
        self.wara_A = nn.ParameterDict({})  # (r, W): columns in block order over the input axis
        self.wara_B = nn.ParameterDict({})  # (H, r): rows in block order over the output axis
        self._disable_adapters = False
        self.merged_adapters = []
        self.kwargs = kwargs

        base_layer = self.get_base_layer()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"WaRA adapts torch.nn.Linear layers only, got {type(base_layer).__name__}")
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features

    def update_layer(self, adapter_name: str, config: WaraConfig, **kwargs) -> None:
        self.wara_r[adapter_name] = config.r
        self.wara_scaling[adapter_name] = config.scaling
        self.wara_wavelet_family[adapter_name] = config.wavelet_family
        output_axis, input_axis = self.wavelet_axes(adapter_name)
        self.wara_A[adapter_name] = nn.Parameter(torch.empty(config.r, input_axis.padded))
        self.wara_B[adapter_name] = nn.Parameter(torch.empty(output_axis.padded, config.r))
        self.reset_wara_parameters(adapter_name, config.init_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    @torch.no_grad()
    def reset_wara_parameters(self, adapter_name: str, init_weights: bool) -> None:
        # LoRA's initialisation on the wavelet grid: A Kaiming-uniform, B zero so the update starts at zero.
        nn.init.kaiming_uniform_(self.wara_A[adapter_name], a=math.sqrt(5))
        if init_weights:
            nn.init.zeros_(self.wara_B[adapter_name])
        else:
            nn.init.kaiming_uniform_(self.wara_B[adapter_name], a=math.sqrt(5))

    def wavelet_axes(self, adapter_name: str) -> tuple[SynthesisAxis, SynthesisAxis]:
        """(R, C): the inverse DWT of the output axis and of the input axis."""
        filters = wavelet_filters(self.wara_wavelet_family[adapter_name])
        return synthesis_axis(self.out_features, filters), synthesis_axis(self.in_features, filters)

    def operator_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A and B with their coefficient axes in the interleaved order `SynthesisAxis` works in."""
        output_axis, input_axis = self.wavelet_axes(adapter_name)
        a, b = self.wara_A[adapter_name], self.wara_B[adapter_name]
        return a[:, _block_order(input_axis, a.device)], b[_block_order(output_axis, b.device)]

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The dense `delta_W` (out x in): for merging, built once."""
        output_axis, input_axis = self.wavelet_axes(adapter_name)
        a, b = self.operator_factors(adapter_name)
        return synthesize2(b @ a, output_axis, input_axis) * self.wara_scaling[adapter_name]

    def wavelet_delta(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """`x @ delta_W^T` through the structured transforms."""
        output_axis, input_axis = self.wavelet_axes(adapter_name)
        a, b = self.operator_factors(adapter_name)
        delta = WaveletLowRankDelta.apply(
            x.reshape(-1, self.in_features), a, b, self.wara_scaling[adapter_name], output_axis, input_axis
        )
        return delta.reshape(*x.shape[:-1], self.out_features)


class WaraLinear(nn.Module, WaraLayer):
    """WaRA on an nn.Linear."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: WaraConfig, **kwargs) -> None:
        super().__init__()
        WaraLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        base_layer = self.get_base_layer()
        for adapter in adapter_names:
            if adapter not in self.wara_A:
                continue
            merged = base_layer.weight.data + self.get_delta_weight(adapter).to(base_layer.weight.dtype)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken")
            base_layer.weight.data = merged
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        base_layer = self.get_base_layer()
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter in self.wara_A:
                base_layer.weight.data -= self.get_delta_weight(adapter).to(base_layer.weight.dtype)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        def add_delta(adapter, result, x):
            return result + self.wavelet_delta(adapter, x)

        return additive_forward(self, x, self.wara_A, add_delta, *args, **kwargs)

    def __repr__(self) -> str:
        return "wara." + super().__repr__()
