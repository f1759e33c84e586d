"""WaRA's PEFT config and its PEFT type."""
import enum
from dataclasses import dataclass, field
from typing import Optional, Union

import pywt
from peft.config import PeftConfig


class WaraPeftType(str, enum.Enum):
    """PEFT names each method by a `PeftType` member; that enum is closed, so this project's method has its own.

    PEFT accepts str-valued types that are not its own (huggingface/peft#2634): the value "WARA" is what
    `adapter_config.json` stores, and it keys PEFT's method tables like PEFT's own members do.
    """

    WARA = "WARA"


@dataclass
class WaraConfig(PeftConfig):
    """WaRA (Wavelet Low-Rank Adaptation, arXiv 2506.24092): a rank-r update learned in the wavelet domain.

    Each adapted Linear layer (out x in) learns B (H x r) and A (r x W) on the padded wavelet coefficient grid
    (H = out + filter_length - 2 and W = in + filter_length - 2, each rounded up to even, as PEFT's WaveFT
    pads), and adds `delta_W = scaling * IDWT2(B A)`, centre-cropped to (out, in). In `B A` the top and
    bottom row halves are the output axis' low- and high-pass coefficients, the left and right column halves
    the input axis': LL top-left, HH bottom-right. B starts at zero (`init_weights=True`), so the adapted
    model starts as the base model. Trainable parameters per layer: r * (H + W).
    """

    r: int = field(default=1, metadata={"help": "Rank of the wavelet-domain update B A."})
    scaling: float = field(default=1.0, metadata={"help": "Factor on the reconstructed update."})
    wavelet_family: str = field(
        default="db1",
        metadata={"help": "A discrete PyWavelets wavelet for the inverse DWT, e.g. 'db1' (Haar), 'sym4'."},
    )
    init_weights: bool = field(
        default=True,
        metadata={"help": "True: B = 0 so the update starts at zero; False: B random too (for tests)."},
    )
    target_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Names (or a regex) of the Linear modules to adapt."}
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Names (or a regex) of modules not to adapt."}
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = WaraPeftType.WARA
        self.target_modules = set(self.target_modules) if isinstance(self.target_modules, list) else self.target_modules
        self.exclude_modules = (
            set(self.exclude_modules) if isinstance(self.exclude_modules, list) else self.exclude_modules
        )
        if self.r <= 0:
            raise ValueError(f"`r` must be a positive integer, got {self.r}")
        if self.wavelet_family not in pywt.wavelist(kind="discrete"):
            raise ValueError(
                "`wavelet_family` must be a discrete PyWavelets wavelet (e.g. db1, sym4, coif2), "
                f"got {self.wavelet_family!r}"
            )
