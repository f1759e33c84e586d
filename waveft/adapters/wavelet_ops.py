"""Single-level 2-D inverse DWT of a weight update, applied without forming the `out x in` matrix.

PEFT rebuilds a delta weight `delta_W` (out x in) from an (H, W) coefficient matrix with a single-level 2-D
inverse DWT. That transform is separable: `delta_W = R M C^T`, where `R` (out x H) and `C` (in x W) are 1-D
synthesis operators and `M` is the coefficient matrix rearranged as described under `idwt2_columns`. Each
column of `R` and `C` holds at most `filter_length` non-zeros, so `x @ C` and `z @ R^T` are strided 1-D
convolutions along the feature axis: O(N * filter_length * features) for N tokens.

Pieces, for adapters built on this (WaveFT, WaRA):
- `wavelet_filters(name)`: a PyWavelets reconstruction filter bank.
- `SynthesisAxis`: one 1-D operator (`R` or `C`), with `synthesize` (coeffs @ S^T), `analyze` (signal @ S),
  `matrix()` and `columns()`; `SynthesisAxis.identity(n)` for adapters without a transform.
- `synthesis_axis(length, filters)`: a cached `SynthesisAxis`, shared by all layers of one shape.
- `idwt2_columns`: where a coefficient of PEFT's (H, W) quadrant layout enters `R` and `C`.
- `synthesize2` / `idwt2`: dense `delta_W`, for merging and for references.

Coefficient order: `analyze` returns and `synthesize` takes the coefficients of one axis *interleaved*,
column `2 j + band` for position `j` of band 0 (low-pass) or 1 (high-pass). PEFT stacks them in blocks
(`[lo_0 .. lo_{h-1}, hi_0 .. hi_{h-1}]`); `SynthesisAxis.columns` maps block indices to interleaved columns.
Interleaving makes the Haar transform one (N, h, 2) @ (2, 2) matmul and the others a few shifted ones.
"""
import functools
from dataclasses import dataclass
from typing import Optional

import pywt
import torch

from waveft.errors import UserError


@dataclass(frozen=True)
class WaveletFilters:
    """A wavelet's reconstruction (synthesis) filters, as PyWavelets' `rec_lo` and `rec_hi`."""

    name: str
    rec_lo: tuple
    rec_hi: tuple

    @property
    def length(self) -> int:
        return len(self.rec_lo)


def wavelet_filters(name: str) -> WaveletFilters:
    """The reconstruction filter bank of PyWavelets' discrete wavelet `name` (e.g. 'db1', 'sym4', 'coif2')."""
    try:
        wavelet = pywt.Wavelet(name)
    except (ValueError, TypeError):
        raise UserError(f"unknown wavelet {name!r}: expected a discrete PyWavelets wavelet such as 'db1' or 'sym4'")
    return WaveletFilters(name, tuple(wavelet.rec_lo), tuple(wavelet.rec_hi))


def padded_length(length: int, filter_length: int) -> int:
    """PEFT's coefficient count for a signal of `length`: `length + filter_length - 2`, rounded up to even.

    `filter_length - 2` is the size the transform's boundary crop removes; it equals PEFT's
    `WAVELET_REDUCTIONS` for every wavelet listed there.
    """
    padded = length + filter_length - 2
    return padded + padded % 2


class SynthesisAxis:
    """The 1-D single-level inverse DWT of one axis, as PEFT's `waverec2d` applies it, plus its adjoint.

    As a matrix `S` (length x padded): `synthesize(c) = c @ S^T` and `analyze(x) = x @ S`, both on the
    last axis of 2-D tensors (tokens x features). Coefficients are interleaved (module docstring).
    `offset` is PEFT's centring offset: data index `i` sits at padded index `i + offset`.
    """

    def __init__(self, length: int, filters: Optional[WaveletFilters]):
        self.length = length
        self.filters = filters
        if filters is None:
            self.padded, self.offset = length, 0
            return
        if filters.length % 2:
            raise ValueError(f"wavelet {filters.name!r} has an odd filter length {filters.length}")
        self.padded = padded_length(length, filters.length)
        self.offset = (self.padded - length) // 2
        # waverec2d crops `filter_length - 2` from the transposed convolution's output, then PEFT centre-crops
        # to `length`: the signal starts at index `first` of the full convolution output.
        reconstructed = self.padded - filters.length + 2
        first = filters.length - 2 + (reconstructed - length) // 2
        # Work on whole (even, odd) pairs: `lead` zeros put the signal's first sample on an even index,
        # and pair p of the aligned signal is pair p + `base` of the full output.
        self._lead = first % 2
        self._base = (first - self._lead) // 2
        self._aligned_pairs = (self._lead + length + 1) // 2
        self._mixers = {}  # (dtype, device) -> (taps, 2, 2) analysis matrices F_q[r, band] = rec_band[2 q + r]

    @classmethod
    def identity(cls, length: int) -> "SynthesisAxis":
        """The identity operator, for adapters that use coefficients directly (WaveFT's `use_idwt=False`)."""
        return cls(length, None)

    @property
    def is_identity(self) -> bool:
        return self.filters is None

    def analyze(self, signal: torch.Tensor) -> torch.Tensor:
        """(N, length) -> (N, padded): `signal @ S`, i.e. `x @ C` on the input side or `dy @ R` on the output side."""
        if self.is_identity:
            return signal
        pairs = self._align(signal)
        mixers = self._mixers_for(signal)
        shifts = [q - self._base for q in range(len(mixers))]
        return _mix_shifted_pairs(pairs, mixers, shifts, self.padded // 2).view(signal.shape[0], self.padded)

    def synthesize(self, coefficients: torch.Tensor) -> torch.Tensor:
        """(N, padded) -> (N, length): `coefficients @ S^T`, i.e. `z @ R^T` on the output side or `du @ C^T` on the input side."""
        if self.is_identity:
            return coefficients
        rows = coefficients.shape[0]
        pairs = coefficients.view(rows, self.padded // 2, 2)
        mixers = self._mixers_for(coefficients).transpose(1, 2)
        shifts = [self._base - q for q in range(len(mixers))]
        aligned = _mix_shifted_pairs(pairs, mixers, shifts, self._aligned_pairs).view(rows, 2 * self._aligned_pairs)
        return aligned[:, self._lead : self._lead + self.length]

    def matrix(self, dtype=torch.float32, device=None) -> torch.Tensor:
        """The dense operator `S`, (length x padded), interleaved columns."""
        return self.synthesize(torch.eye(self.padded, dtype=dtype, device=device)).T

    def columns(self, block_index: torch.Tensor) -> torch.Tensor:
        """Interleaved column of each coefficient given by its PEFT block index (`lo` block first, then `hi`)."""
        if self.is_identity:
            return block_index
        half = self.padded // 2
        return torch.where(block_index < half, 2 * block_index, 2 * (block_index - half) + 1)

    def _align(self, signal: torch.Tensor) -> torch.Tensor:
        rows = signal.shape[0]
        trailing = 2 * self._aligned_pairs - self._lead - self.length
        if self._lead or trailing:
            signal = torch.nn.functional.pad(signal, (self._lead, trailing))
        return signal.reshape(rows, self._aligned_pairs, 2)

    def _mixers_for(self, like: torch.Tensor) -> torch.Tensor:
        key = (like.dtype, like.device)
        if key not in self._mixers:
            taps = torch.tensor([self.filters.rec_lo, self.filters.rec_hi], dtype=torch.float64)  # (band, tap)
            # tap t = 2 q + r  ->  F_q[r, band]
            mixers = taps.T.reshape(-1, 2, 2)
            self._mixers[key] = mixers.to(dtype=like.dtype, device=like.device)
        return self._mixers[key]


def _mix_shifted_pairs(pairs: torch.Tensor, mixers: torch.Tensor, shifts: list, out_pairs: int) -> torch.Tensor:
    """`out[:, j] = sum_q pairs[:, j + shifts[q]] @ mixers[q]`, terms outside `pairs` being zero: (N, out_pairs, 2)."""
    rows, in_pairs, _ = pairs.shape
    if len(shifts) == 1 and shifts[0] == 0 and in_pairs == out_pairs:
        return pairs @ mixers[0]  # Haar: one small matmul, no accumulator
    out = pairs.new_zeros(rows, out_pairs, 2)
    for mixer, shift in zip(mixers, shifts):
        start, stop = max(0, -shift), min(out_pairs, in_pairs - shift)
        if start < stop:
            out[:, start:stop] += pairs[:, start + shift : stop + shift] @ mixer
    return out


@functools.lru_cache(maxsize=None)
def synthesis_axis(length: int, filters: Optional[WaveletFilters]) -> SynthesisAxis:
    """The `SynthesisAxis` for (length, filters), shared so its filter tensors are built once per device and dtype."""
    return SynthesisAxis(length, filters)


def idwt2_columns(rows: torch.Tensor, cols: torch.Tensor, output_axis: SynthesisAxis, input_axis: SynthesisAxis):
    """For coefficients at `(rows, cols)` of the (out x in) grid, placed in PEFT's padded (H, W) quadrant
    layout (cA top-left, cH top-right, cV bottom-left, cD bottom-right, data centred), the interleaved column
    of `R` (output side) and of `C` (input side) each one multiplies: `delta_W = sum_k v_k R[:, s_k] C[:, g_k]^T`.

    The output-side band is chosen by the coefficient's column half and the input-side band by its row half,
    as waverec2d pairs the quadrants with its 2-D filters. Returns `(s, g)`.
    """
    r = rows + output_axis.offset
    c = cols + input_axis.offset
    row_half, col_half = output_axis.padded // 2, input_axis.padded // 2
    output_block = (c >= col_half) * row_half + r % row_half
    input_block = (r >= row_half) * col_half + c % col_half
    return output_axis.columns(output_block), input_axis.columns(input_block)


def synthesize2(coefficients: torch.Tensor, output_axis: SynthesisAxis, input_axis: SynthesisAxis) -> torch.Tensor:
    """Dense `R M C^T` (out x in) from `M` (H x W) in interleaved operator order (rows: R's columns, cols: C's)."""
    partial = input_axis.synthesize(coefficients)  # M C^T: (H, in)
    return output_axis.synthesize(partial.T.contiguous()).T  # (C M^T) R^T = delta_W^T, transposed back


def idwt2(quadrants: torch.Tensor, output_axis: SynthesisAxis, input_axis: SynthesisAxis) -> torch.Tensor:
    """Dense single-level inverse DWT of an (H, W) coefficient matrix in PEFT's quadrant layout, cropped to
    (out, in) as PEFT's WaveFT does; wavelet axes only."""
    row_half, col_half = output_axis.padded // 2, input_axis.padded // 2
    # quadrants[(a, r), (b, c)] multiplies R[:, (band b, r)] and C[:, (band a, c)]: operator layout
    # M[(r, b), (c, a)] in interleaved order.
    blocks = quadrants.reshape(2, row_half, 2, col_half)  # (a, r, b, c)
    operator_layout = blocks.permute(1, 2, 3, 0).reshape(output_axis.padded, input_axis.padded)
    return synthesize2(operator_layout, output_axis, input_axis)
