"""Reading WaveFT's own file (torch only: no PEFT, no PyWavelets, no random generator).

The format is written by the WaveFT project's `python -m waveft.export --format waveft` (its module
`waveft/export_native.py` documents the layout; the key names below must match it). A layer's difference is
PEFT's `WaveFTLinear.get_delta_weight`:

- SHiRA mode (`waveft.use_idwt` 0): `scaling * M`, M (out x in) zero but for the spectrum at its locations.
- WaveFT: the spectrum placed at its locations shifted by `((H - out) // 2, (W - in) // 2)` in an (H, W) grid,
  `H = out + L - 2` and `W = in + L - 2` each rounded up to even (L: the filter length); the grid's quadrants
  cA (top left), cH (top right), cV (bottom left), cD (bottom right) go through a single-level 2-D inverse
  DWT with the stored reconstruction filters (PEFT's `waverec2d`: the 2-D filters are outer products, rows
  filter first: cA lo x lo, cH hi x lo, cV lo x hi, cD hi x hi), whose result, cropped by `(2 L - 3) // 2` at
  each end and centred on (out, in), times `scaling`, is the difference. It is computed here separably (two
  strided 1-D transposed convolutions), O(out * in * L), the same numbers up to float rounding.
"""
import torch

FORMAT_VERSION = 1
VERSION_KEY = "waveft.format_version"
USE_IDWT_KEY = "waveft.use_idwt"
FILTERS_KEY = "waveft.wavelet_filters"
LOCATIONS_TABLE = "waveft_locations.{}"
SPECTRUM, SHAPE, SCALING, LOCATIONS = ".waveft_spectrum", ".waveft_shape", ".waveft_scaling", ".waveft_locations"


class NativeFormatError(ValueError):
    """A file this reader cannot use (a newer version, a missing piece); the message says which and why."""


def is_native_file(tensors) -> bool:
    return VERSION_KEY in tensors


def check_version(tensors) -> None:
    """A file this reader can read: it has a format version, and not a newer one."""
    if VERSION_KEY not in tensors:
        raise NativeFormatError(f"the file lacks {VERSION_KEY}")
    version = int(tensors[VERSION_KEY].item())
    if version > FORMAT_VERSION:
        raise NativeFormatError(f"written by WaveFT format version {version}; this node reads version "
                                f"{FORMAT_VERSION} and older: update the WaveFT custom node")


class NativeLayer:
    """One layer of a native file: references to its tensors (nothing is computed until `delta`)."""

    def __init__(self, name: str, tensors):
        self.name = name
        missing = [name + s for s in (SPECTRUM, SHAPE, SCALING, LOCATIONS) if name + s not in tensors]
        table = None if missing else LOCATIONS_TABLE.format(int(tensors[name + LOCATIONS].item()))
        missing += [k for k in (table, USE_IDWT_KEY) if k is not None and k not in tensors]
        self.use_idwt = USE_IDWT_KEY in tensors and bool(tensors[USE_IDWT_KEY].item())
        if self.use_idwt and FILTERS_KEY not in tensors:
            missing.append(FILTERS_KEY)
        if missing:
            raise NativeFormatError(f"layer {name}: the file lacks {', '.join(missing)}")
        self.spectrum = tensors[name + SPECTRUM]
        self.out_features, self.in_features = (int(v) for v in tensors[name + SHAPE].tolist())
        self.scaling = float(tensors[name + SCALING].item())
        self.locations = tensors[table]  # (2, n): rows, columns in the out x in grid
        self.filters = tensors[FILTERS_KEY] if self.use_idwt else None  # (2, L): rec_lo, rec_hi
        if self.locations.shape != (2, self.spectrum.numel()):
            raise NativeFormatError(f"layer {name}: {self.spectrum.numel()} coefficients but locations of shape "
                                    f"{list(self.locations.shape)}")
        self.keys = {name + s for s in (SPECTRUM, SHAPE, SCALING, LOCATIONS)} | {table, USE_IDWT_KEY, VERSION_KEY}
        if self.use_idwt:
            self.keys.add(FILTERS_KEY)

    @property
    def shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    def delta(self, device=None, dtype=torch.float32) -> torch.Tensor:
        """The dense difference (out x in) in `dtype`. Cost: a few (out + L) x (in + L) matrices, once."""
        spectrum = self.spectrum.to(device=device, dtype=dtype)
        rows, cols = (self.locations.to(device=device, dtype=torch.long)).unbind(0)
        if not self.use_idwt:
            grid = spectrum.new_zeros(self.shape)
            grid[rows, cols] = spectrum
            return grid * self.scaling
        bank = self.filters.to(device=device, dtype=dtype)
        taps = bank.shape[1]
        height, width = (_padded(n, taps) for n in self.shape)
        grid = spectrum.new_zeros(height, width)
        grid[rows + (height - self.out_features) // 2, cols + (width - self.in_features) // 2] = spectrum
        half_h, half_w = height // 2, width // 2
        c_a, c_h = grid[:half_h, :half_w], grid[:half_h, half_w:]
        c_v, c_d = grid[half_h:, :half_w], grid[half_h:, half_w:]
        # Along the input axis first: the low-row-band pair (cA, cV), the high-row-band pair (cH, cD).
        rows_lo = _synthesize_last_axis(c_a, c_v, bank, self.in_features)  # (half_h, in)
        rows_hi = _synthesize_last_axis(c_h, c_d, bank, self.in_features)
        delta = _synthesize_last_axis(rows_lo.T, rows_hi.T, bank, self.out_features).T
        return delta * self.scaling


def _padded(length: int, taps: int) -> int:
    padded = length + taps - 2
    return padded + padded % 2


def _synthesize_last_axis(low: torch.Tensor, high: torch.Tensor, bank: torch.Tensor, length: int) -> torch.Tensor:
    """Single-level 1-D inverse DWT along the last axis of (N, k) low and high bands -> (N, length), cropped as
    PEFT's `waverec2d` and `get_delta_weight` crop: `(2 L - 3) // 2` at each end, then centred on `length`."""
    taps = bank.shape[1]
    bands = torch.stack([low, high], dim=1)  # (N, 2, k)
    full = torch.nn.functional.conv_transpose1d(bands, bank.unsqueeze(1), stride=2)[:, 0]  # (N, 2 k + L - 2)
    crop = (2 * taps - 3) // 2
    full = full[:, crop: full.shape[1] - crop]
    start = (full.shape[1] - length) // 2
    return full[:, start: start + length]
