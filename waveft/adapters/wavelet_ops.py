"""Single-level 2-D inverse DWT of a weight update, applied without forming the `out x in` matrix.

PEFT rebuilds a delta weight `delta_W` (out x in) from an (H, W) coefficient matrix with a single-level 2-D
inverse DWT. That transform is separable: `delta_W = R M C^T`, where `R` (out x H) and `C` (in x W) are 1-D
synthesis operators and `M` is the coefficient matrix rearranged as described under `idwt2_columns`. Each
column of `R` and `C` holds at most `filter_length` non-zeros, so `x @ C` and `z @ R^T` cost
O(N * filter_length * features) for N tokens, not O(N * out * in).

Pieces, for adapters built on this (WaveFT, WaRA):
- `wavelet_filters(name)`: a PyWavelets reconstruction filter bank.
- `SynthesisAxis`: one 1-D operator `S` (`R` or `C`); `SynthesisAxis.identity(n)` for adapters without a
  transform. Token-major (rows = tokens): `analyze(x) = x @ S`, `synthesize(c) = c @ S^T`.
  Feature-major ("transposed", rows = coefficients, columns = tokens): `analyze_transposed(x) = (x @ S)^T`
  and `synthesize_transposed(c_t, add_to) = add_to + c_t^T @ S^T`, which take and give token-major
  activations. The transposition rides along in the transform's GEMMs, so sparse couplings between
  coefficients can use row-wise kernels (`embedding_bag`, `sampled_addmm`) on contiguous token vectors.
- `synthesis_axis(length, filters)`: a cached `SynthesisAxis`, shared by all layers of one shape;
  `cached_tensors`: how anything cached builds its tensors (outside inference mode, safe in any grad mode).
- `idwt2_columns`: where a coefficient of PEFT's (H, W) quadrant layout enters `R` and `C`.
- `synthesize2` / `idwt2`: dense `delta_W`, for merging and for references.

Coefficient order: the coefficients of one axis are *interleaved*, index `2 j + band` for position `j` of
band 0 (low-pass) or 1 (high-pass). PEFT stacks them in blocks (`[lo_0 .. lo_{h-1}, hi_0 .. hi_{h-1}]`);
`SynthesisAxis.columns` maps block indices to interleaved ones. Interleaving makes every transform a few
small matmuls on (even, odd) pairs.
"""
import functools
import math
from dataclasses import dataclass

import pywt
import torch

from waveft.errors import UserError

# Coefficient rows per GEMM in the transposed transforms (fastest measured on CPU; a multiple of 2).
TRANSPOSED_BLOCK = 16


def cached_tensors(build):
    """Decorate a function whose tensors are kept and reused by later calls (kernels, index plans): it runs
    outside inference mode, so what it returns is a normal tensor that autograd may save, whichever grad mode
    the first call happened under. (A tensor made under `torch.inference_mode()` and reused later in a
    computation autograd records fails with "Inference tensors cannot be saved for backward".) Costs nothing
    on cache hits: only the build is wrapped."""
    return torch.inference_mode(False)(build)


@dataclass(frozen=True)
class WaveletFilters:
    """A wavelet's reconstruction (synthesis) filters, as PyWavelets' `rec_lo` and `rec_hi`."""

    name: str
    rec_lo: tuple
    rec_hi: tuple

    @property
    def length(self) -> int:
        return len(self.rec_lo)


# The identity as a two-tap "filter bank": coefficient 2 j + band reconstructs sample 2 j + band.
_IDENTITY_BANK = WaveletFilters("identity", (1.0, 0.0), (0.0, 1.0))


def wavelet_filters(name: str) -> WaveletFilters:
    """The reconstruction filter bank of PyWavelets' discrete wavelet `name` (e.g. 'db1', 'sym4', 'coif2')."""
    try:
        wavelet = pywt.Wavelet(name)
    except (ValueError, TypeError):
        raise UserError(
            f"unknown wavelet {name!r}: expected a discrete PyWavelets wavelet such as 'db1' or 'sym4'"
        ) from None
    return WaveletFilters(name, tuple(wavelet.rec_lo), tuple(wavelet.rec_hi))


def padded_length(length: int, filter_length: int) -> int:
    """PEFT's coefficient count for a signal of `length`: `length + filter_length - 2`, rounded up to even.

    `filter_length - 2` is what the transform's boundary crop removes; it equals PEFT's `WAVELET_REDUCTIONS`
    for every wavelet listed there.
    """
    padded = length + filter_length - 2
    return padded + padded % 2


class SynthesisAxis:
    """The 1-D single-level inverse DWT of one axis, as PEFT's `waverec2d` applies it, and its adjoint.

    As a matrix `S` (length x padded), acting on the last axis of token-major 2-D tensors (tokens x features):
    `synthesize(c) = c @ S^T`, `analyze(x) = x @ S`. Coefficients are interleaved (module docstring).
    `offset` is PEFT's centring offset: data index `i` sits at padded index `i + offset`. The transposed
    forms use `transposed_rows >= padded` coefficient rows (whole GEMM blocks): `analyze_transposed` fills
    the extra rows with values outside the transform, to be ignored; `synthesize_transposed` needs them zero.
    """

    def __init__(self, length: int, filters: WaveletFilters | None):
        self.length = length
        self.filters = filters
        self._bank = filters or _IDENTITY_BANK
        taps = self._bank.length
        if taps % 2:
            raise ValueError(f"wavelet {self._bank.name!r} has an odd filter length {taps}")
        self.padded = length if filters is None else padded_length(length, taps)
        self.offset = (self.padded - length) // 2
        # waverec2d crops `taps - 2` samples from each end of its transposed convolution, and PEFT then
        # centre-crops to `length`, which removes nothing more: with this padding the reconstruction has
        # `length` or `length + 1` samples. So sample i of the signal is sample i + taps - 2 of the full
        # convolution, and full-output pair p holds samples 2 p, 2 p + 1.
        self._first_pair = (taps - 2) // 2
        self._pairs = (length + 1) // 2
        self._blocks_out = math.ceil(length / TRANSPOSED_BLOCK)
        needed = max(self.padded, TRANSPOSED_BLOCK * self._blocks_out + taps - 2)
        self.transposed_rows = TRANSPOSED_BLOCK * math.ceil(needed / TRANSPOSED_BLOCK)
        self._kernels = {}  # (dtype, device) -> (pair mixers, analysis block, synthesis block)

    @classmethod
    def identity(cls, length: int) -> "SynthesisAxis":
        """The identity operator, for adapters that use coefficients directly (WaveFT's `use_idwt=False`)."""
        return cls(length, None)

    @property
    def is_identity(self) -> bool:
        return self.filters is None

    def columns(self, block_index: torch.Tensor) -> torch.Tensor:
        """Interleaved index of each coefficient given by its PEFT block index (`lo` block first, then `hi`)."""
        if self.is_identity:
            return block_index
        half = self.padded // 2
        return torch.where(block_index < half, 2 * block_index, 2 * (block_index - half) + 1)

    # ---- token-major: (tokens, features)

    def analyze(self, signal: torch.Tensor) -> torch.Tensor:
        """(N, length) -> (N, padded): `signal @ S`, i.e. `x @ C` on the input side or `dy @ R` on the output side."""
        if self.is_identity:
            return signal
        tokens = signal.shape[0]
        if self.length % 2:
            signal = torch.nn.functional.pad(signal, (0, 1))
        pairs = signal.reshape(tokens, self._pairs, 2)
        mixers = self._kernels_for(signal)[0]
        shifts = [q - self._first_pair for q in range(len(mixers))]
        return _mix_shifted_pairs(pairs, mixers, shifts, self.padded // 2).view(tokens, self.padded)

    def synthesize(self, coefficients: torch.Tensor) -> torch.Tensor:
        """(N, padded) -> (N, length): `coefficients @ S^T`, i.e. `z @ R^T` (output side) or `du @ C^T` (input side)."""
        if self.is_identity:
            return coefficients
        tokens = coefficients.shape[0]
        pairs = coefficients.reshape(tokens, self.padded // 2, 2)
        mixers = self._kernels_for(coefficients)[0].transpose(1, 2)
        shifts = [self._first_pair - q for q in range(len(mixers))]
        signal = _mix_shifted_pairs(pairs, mixers, shifts, self._pairs).view(tokens, 2 * self._pairs)
        return signal[:, : self.length]

    def matrix(self, dtype=torch.float32, device=None) -> torch.Tensor:
        """The dense operator `S`, (length x padded), interleaved columns."""
        return self.synthesize(torch.eye(self.padded, dtype=dtype, device=device)).T

    # ---- feature-major coefficients: (transposed_rows, tokens), token-major signals

    def analyze_transposed(self, signal: torch.Tensor) -> torch.Tensor:
        """(N, length) -> (transposed_rows, N): `(signal @ S)^T`; ignore the rows past `padded`.

        Block q of TRANSPOSED_BLOCK coefficient rows is one GEMM of the block's analysis matrix with the
        window of the (zero-extended) signal it reads, taken in transposed form.
        """
        tokens = signal.shape[0]
        taps = self._bank.length
        width = self.transposed_rows + taps - 2  # full-convolution samples the blocks read
        if width != self.length:
            signal = torch.nn.functional.pad(signal, (taps - 2, width - (taps - 2) - self.length))
        signal = signal.contiguous()
        analysis_block = self._kernels_for(signal)[1]  # (BLOCK, BLOCK + taps - 2)
        windows = signal.as_strided(
            (self.transposed_rows // TRANSPOSED_BLOCK, analysis_block.shape[1], tokens),
            (TRANSPOSED_BLOCK, 1, width),
            signal.storage_offset(),
        )
        return torch.matmul(analysis_block, windows).view(self.transposed_rows, tokens)

    def synthesize_transposed(self, coefficients_t: torch.Tensor, add_to: torch.Tensor | None = None):
        """(transposed_rows, N) -> (N, length): `coefficients_t^T @ S^T`, plus `add_to` (N, length) if given,
        in one pass. Rows past `padded` must be zero.

        Output block q (TRANSPOSED_BLOCK samples) is one GEMM of the coefficient rows it depends on (a
        window of BLOCK + taps - 2 rows, read transposed) with the block's synthesis matrix.
        """
        rows, tokens = coefficients_t.shape
        assert rows == self.transposed_rows, (rows, self.transposed_rows)
        coefficients_t = coefficients_t.contiguous()
        synthesis_block = self._kernels_for(coefficients_t)[2]  # (BLOCK + taps - 2, BLOCK)
        windows = coefficients_t.as_strided(
            (self._blocks_out, tokens, synthesis_block.shape[0]),
            (TRANSPOSED_BLOCK * tokens, 1, tokens),
            coefficients_t.storage_offset(),
        )
        blocks = torch.matmul(windows, synthesis_block).transpose(0, 1)  # (N, blocks, BLOCK), token-major view
        fusable = add_to is not None and TRANSPOSED_BLOCK * self._blocks_out == self.length
        if not fusable or (torch.is_grad_enabled() and (add_to.requires_grad or blocks.requires_grad)):
            signal = blocks.reshape(tokens, TRANSPOSED_BLOCK * self._blocks_out)[:, : self.length]
            return signal if add_to is None else add_to + signal
        # One pass for the un-transposition and the addition (out= is not differentiable, hence the test above).
        out_dtype = torch.result_type(add_to, blocks)
        out = torch.empty(tokens, self.length, dtype=out_dtype, device=add_to.device)
        torch.add(add_to.reshape(blocks.shape), blocks, out=out.view(blocks.shape))
        return out

    def _kernels_for(self, like: torch.Tensor):
        key = (like.dtype, like.device)
        if key not in self._kernels:
            self._kernels[key] = self._build_kernels(like.dtype, like.device)
        return self._kernels[key]

    @cached_tensors
    def _build_kernels(self, dtype: torch.dtype, device: torch.device) -> tuple:
        bank = torch.tensor([self._bank.rec_lo, self._bank.rec_hi], dtype=torch.float64)  # (band, tap)
        taps = bank.shape[1]
        # Token-major pair mixers: tap t = 2 q + r  ->  mixers[q][r, band].
        mixers = bank.T.reshape(-1, 2, 2)
        # Analysis block A[r, e] = bank[r % 2, e - 2 (r // 2)]: coefficient row r of a block from the
        # block's window of samples e; synthesis block S[r, e] = bank[r % 2, e + taps - 2 - 2 (r // 2)]:
        # output sample e of a block from the window's coefficient row r.
        width = TRANSPOSED_BLOCK + taps - 2
        analysis = torch.zeros(TRANSPOSED_BLOCK, width, dtype=torch.float64)
        synthesis = torch.zeros(width, TRANSPOSED_BLOCK, dtype=torch.float64)
        for r in range(TRANSPOSED_BLOCK):
            analysis[r, 2 * (r // 2) : 2 * (r // 2) + taps] = bank[r % 2]
        for r in range(width):
            for e in range(TRANSPOSED_BLOCK):
                t = e + taps - 2 - 2 * (r // 2)
                if 0 <= t < taps:
                    synthesis[r, e] = bank[r % 2, t]
        return tuple(k.to(dtype=dtype, device=device) for k in (mixers, analysis, synthesis))


def _mix_shifted_pairs(pairs: torch.Tensor, mixers: torch.Tensor, shifts: list, out_pairs: int) -> torch.Tensor:
    """`out[:, j] = sum_q pairs[:, j + shifts[q]] @ mixers[q]`, terms outside `pairs` being zero: (N, out_pairs, 2)."""
    tokens, in_pairs, _ = pairs.shape
    if len(shifts) == 1 and shifts[0] == 0 and in_pairs == out_pairs:
        return pairs @ mixers[0]  # two taps: one small matmul, no accumulator
    out = pairs.new_zeros(tokens, out_pairs, 2)
    for mixer, shift in zip(mixers, shifts):
        start, stop = max(0, -shift), min(out_pairs, in_pairs - shift)
        if start < stop:
            out[:, start:stop] += pairs[:, start + shift : stop + shift] @ mixer
    return out


@functools.cache
def synthesis_axis(length: int, filters: WaveletFilters | None) -> SynthesisAxis:
    """The `SynthesisAxis` for (length, filters), shared so its kernels are built once per device and dtype."""
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
