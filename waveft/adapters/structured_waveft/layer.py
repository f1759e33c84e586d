"""WaveFT layer computing PEFT's output without building the dense `out x in` delta weight.

PEFT's `WaveFTLinear` rebuilds `delta_W = scaling * IDWT2(scatter(spectrum))` on every forward and adds
`x @ delta_W^T`. The IDWT is separable (`waveft.adapters.wavelet_ops`: `delta_W = R M C^T`, M holding the
spectrum at (s_k, g_k)), so for N tokens x (N, in):

    u^T = (x C)^T                                analysis, feature-major         (W, N)
    z^T[s_k] += scaling * spectrum[k] * u^T[g_k]  one term per spectrum entry     (H, N)
    out = base(x) + z R^T                         synthesis, back to token-major  (N, out)

with cost O(N (L (in + out) + n_frequency)). Keeping coefficients feature-major makes the middle step a
row-wise `embedding_bag` (and its backward a `sampled_addmm`) over contiguous token vectors, where
column gathers and scatters on token-major tensors would be several times slower. Backward recomputes
`u^T` from the saved input instead of keeping it, so the layer saves what LoRA's `lora_A` saves: its input.
"""
import contextlib
import functools
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from peft.tuners.waveft import wavelet as peft_wavelet
from peft.tuners.waveft.layer import WaveFTLinear

from waveft.adapters.tuner_forward import additive_forward
from waveft.adapters.wavelet_ops import (
    SynthesisAxis,
    WaveletFilters,
    cached_tensors,
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
    if name in peft_runnable_wavelets():
        peft_filters = peft_wavelet.Wavelet(name)
        return WaveletFilters(name, tuple(peft_filters.rec_lo), tuple(peft_filters.rec_hi))
    warnings.warn(
        f"wavelet {name!r}: stock PEFT cannot run it (its filter table lacks it or has it wrong), so an adapter "
        f"trained here with it loads in stock PEFT but fails there at the first forward"
    )
    return wavelet_filters(name)


@functools.cache
def peft_runnable_wavelets() -> frozenset[str]:
    """The wavelets stock PEFT's WaveFT layer runs: those of its filter table with their true number of taps
    (db1-db10, sym2-sym10, coif1-coif4; its coif5 has 48 taps instead of 30 and fails in its forward). Cached:
    every layer's plan asks."""
    return frozenset(name for name in peft_wavelet.wavelist()
                     if len(peft_wavelet.Wavelet(name).rec_lo) == wavelet_filters(name).length)


@dataclass(frozen=True)
class AdapterPlan:
    """What the structured forward needs for one adapter of one layer, on one device.

    The spectrum couples input coefficient g_k to output coefficient s_k (`idwt2_columns`). The forward
    sums, for each output coefficient, its weighted input coefficients (CSR order: by s, then g); the
    backward does the reverse (CSC order: by g, then s). Both run as `embedding_bag` over feature-major
    coefficient rows.
    """

    indices: torch.Tensor  # PEFT's `waveft_indices[adapter]` it was built from: a new tensor means a new adapter
    wavelet: str
    use_idwt: bool
    output_axis: SynthesisAxis  # R
    input_axis: SynthesisAxis  # C
    output_columns: torch.Tensor  # s_k
    input_columns: torch.Tensor  # g_k
    csr_order: torch.Tensor  # spectrum entries sorted by (s, g)
    csr_rows: torch.Tensor  # (R rows + 1,) bag offsets
    csr_columns: torch.Tensor  # g in CSR order
    csc_order: torch.Tensor  # spectrum entries sorted by (g, s)
    csc_columns: torch.Tensor  # (C rows + 1,) bag offsets
    csc_rows: torch.Tensor  # s in CSC order
    _patterns: dict  # dtype -> sparse CSR pattern of the coupling, for sampled_addmm

    @classmethod
    @cached_tensors
    def build(cls, layer: WaveFTLinear, adapter: str, device: torch.device) -> "AdapterPlan":
        indices = layer.waveft_indices[adapter]
        wavelet, use_idwt = layer.waveft_wavelet_family[adapter], layer.waveft_use_idwt[adapter]
        rows, cols = indices.to(device, copy=True)  # a normal tensor even if PEFT's buffer is an inference one
        if use_idwt:
            filters = peft_compatible_filters(wavelet)
            output_axis = synthesis_axis(layer.out_features, filters)
            input_axis = synthesis_axis(layer.in_features, filters)
            s, g = idwt2_columns(rows, cols, output_axis, input_axis)
        else:
            output_axis = SynthesisAxis.identity(layer.out_features)
            input_axis = SynthesisAxis.identity(layer.in_features)
            s, g = rows, cols
        out_rows, in_rows = output_axis.transposed_rows, input_axis.transposed_rows
        csr_order = torch.argsort(s * in_rows + g)
        csc_order = torch.argsort(g * out_rows + s)
        return cls(
            indices, wavelet, use_idwt, output_axis, input_axis, s, g,
            csr_order, _bag_offsets(s[csr_order], out_rows), g[csr_order],
            csc_order, _bag_offsets(g[csc_order], in_rows), s[csc_order],
            {},
        )  # fmt: skip

    def matches(self, layer: WaveFTLinear, adapter: str, device: torch.device) -> bool:
        return (
            self.indices is layer.waveft_indices[adapter]
            and self.wavelet == layer.waveft_wavelet_family[adapter]
            and self.use_idwt == layer.waveft_use_idwt[adapter]
            and self.output_columns.device == device
        )

    def sampled_products(self, w_t: torch.Tensor, u_t: torch.Tensor) -> torch.Tensor:
        """`sum_n w_t[s_k, n] * u_t[g_k, n]` for every spectrum entry k, in spectrum order."""
        if w_t.device.type == "meta":  # shapes only (waveft.train.memory_estimate): one value per entry either way
            return w_t.new_empty(len(self.csr_columns))
        if w_t.dtype in (torch.float32, torch.float64):
            products = self.sampled_addmm_products(w_t, u_t)
        else:  # sampled_addmm has no half-precision kernels
            products = self.gathered_products(w_t, u_t)
        return torch.empty_like(products).index_copy_(0, self.csr_order, products)

    def sampled_addmm_products(self, w_t: torch.Tensor, u_t: torch.Tensor) -> torch.Tensor:
        """The products in CSR order by `torch.sparse.sampled_addmm` (fp32 / fp64; on CUDA cuSPARSE, whose setup
        runs on every call): no temporary beyond the values."""
        return torch.sparse.sampled_addmm(self._pattern(w_t.dtype), w_t, u_t.T, beta=0.0).values()

    def gathered_products(self, w_t: torch.Tensor, u_t: torch.Tensor) -> torch.Tensor:
        """The products in CSR order by gathering both rows of every entry and `vecdot`: any dtype, two
        (n_frequency, N) temporaries."""
        return torch.linalg.vecdot(w_t[self.output_columns[self.csr_order]], u_t[self.csr_columns])

    def _pattern(self, dtype) -> torch.Tensor:
        if dtype not in self._patterns:
            self._patterns[dtype] = self._build_pattern(dtype)
        return self._patterns[dtype]

    @cached_tensors
    def _build_pattern(self, dtype) -> torch.Tensor:
        with warnings.catch_warnings():  # "sparse CSR support is in beta" and friends, once per process
            warnings.simplefilter("ignore")
            return torch.sparse_csr_tensor(
                self.csr_rows,
                self.csr_columns,
                torch.zeros(len(self.csr_columns), dtype=dtype, device=self.csr_rows.device),
                (self.output_axis.transposed_rows, self.input_axis.transposed_rows),
            )


def _bag_offsets(sorted_keys: torch.Tensor, bags: int) -> torch.Tensor:
    """Start of each key's run in `sorted_keys`, plus the end: offsets for `embedding_bag(include_last_offset=True)`."""
    return torch.searchsorted(sorted_keys, torch.arange(bags + 1, device=sorted_keys.device))


def _weighted_bags(indices, offsets, rows, weights):
    """`out[b] = sum_{i in bag b} weights[i] * rows[indices[i]]`: the sparse coupling, row-wise."""
    if rows.shape[1] == 0:  # no tokens, which embedding_bag rejects
        return rows.new_zeros(len(offsets) - 1, 0)
    return torch.nn.functional.embedding_bag(
        indices, rows, offsets, mode="sum", per_sample_weights=weights, include_last_offset=True
    )


def _autocast_off(device_type: str):
    # Entering a disabling autocast context costs more than this layer's small ops: only when needed.
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


class StructuredWaveFTDelta(torch.autograd.Function):
    """`base_output + x @ delta_W^T` for x (N, in), from the spectrum, never forming `delta_W`.

    Coefficients live feature-major (rows = coefficients, columns = tokens) between the transforms. Runs with
    autocast off, in the spectrum's dtype (x arrives cast to it, as in PEFT).
    """

    @staticmethod
    def forward(ctx, base_output, x, spectrum, scaling: float, plan: AdapterPlan):
        with _autocast_off(x.device.type):
            weights = spectrum * scaling
            u_t = plan.input_axis.analyze_transposed(x)
            z_t = _weighted_bags(plan.csr_columns, plan.csr_rows, u_t, weights[plan.csr_order])
            del u_t
            output = plan.output_axis.synthesize_transposed(z_t, add_to=base_output)
        ctx.save_for_backward(x, spectrum)
        ctx.scaling, ctx.plan, ctx.base_dtype = scaling, plan, base_output.dtype
        return output

    @staticmethod
    def backward(ctx, grad_output):
        x, spectrum = ctx.saved_tensors
        plan, scaling = ctx.plan, ctx.scaling
        grad_base = grad_output.to(ctx.base_dtype) if ctx.needs_input_grad[0] else None
        grad_x = grad_spectrum = None
        with _autocast_off(x.device.type):
            w_t = plan.output_axis.analyze_transposed(grad_output.to(x.dtype))
            if ctx.needs_input_grad[2]:
                u_t = plan.input_axis.analyze_transposed(x)
                grad_spectrum = plan.sampled_products(w_t, u_t).mul_(scaling)
                del u_t
            if ctx.needs_input_grad[1]:
                weights = spectrum * scaling
                du_t = _weighted_bags(plan.csc_rows, plan.csc_columns, w_t, weights[plan.csc_order])
                del w_t
                grad_x = plan.input_axis.synthesize_transposed(du_t)
        return grad_base, grad_x, grad_spectrum, None, None


class StructuredWaveFTLinear(WaveFTLinear):
    """PEFT's `WaveFTLinear` with the structured forward: same parameters, state dict, config and results.

    Made by switching `__class__` of existing layers (`enable_structured_waveft`); merging still builds the dense
    delta, once.
    """

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return additive_forward(self, x, self.waveft_spectrum, self._add_structured_delta, *args, **kwargs)

    def get_delta_weight(self, adapter) -> torch.Tensor:
        spectrum = self.waveft_spectrum[adapter]
        plan = self._plan(adapter, spectrum.device)
        coefficients = spectrum.new_zeros(plan.output_axis.padded, plan.input_axis.padded)
        coefficients = coefficients.index_put((plan.output_columns, plan.input_columns), spectrum)
        return synthesize2(coefficients, plan.output_axis, plan.input_axis) * self.waveft_scaling[adapter]

    def _add_structured_delta(self, adapter: str, result: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """`result + x @ delta_W^T` as PEFT's forward computes it, with the structured delta."""
        plan = self._plan(adapter, x.device)
        output = StructuredWaveFTDelta.apply(
            result.reshape(-1, self.out_features),
            x.reshape(-1, self.in_features),
            self.waveft_spectrum[adapter],
            self.waveft_scaling[adapter],
            plan,
        )
        return output.reshape(*result.shape[:-1], self.out_features)

    def _plan(self, adapter: str, device: torch.device) -> AdapterPlan:
        plans = self.__dict__.setdefault("_structured_waveft_plans", {})
        plan = plans.get(adapter)
        if plan is None or not plan.matches(self, adapter, device):
            plan = plans[adapter] = AdapterPlan.build(self, adapter, device)
        return plan
