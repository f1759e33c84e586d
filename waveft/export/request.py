"""What an export is asked for, and its checks that need no model: importing this loads no model library, so the
export command answers --help and refuses a bad request at once."""
import os
from dataclasses import dataclass
from typing import Optional

from waveft.errors import UserError
from waveft.io.files import check_can_write

FORMATS = ("full-diff", "lora", "waveft")  # waveft: WaveFT's own file (waveft.export.native.NATIVE_FORMAT)
EXPORT_DTYPES = ("fp16", "bf16", "fp32")  # names in waveft.models.DTYPES
DEFAULT_LORA_RANK = 32


@dataclass
class ExportRequest:
    adapter: str
    format: str
    out: str
    rank: Optional[int] = None  # lora: fixed rank (default DEFAULT_LORA_RANK unless energy is given)
    energy: Optional[float] = None  # lora: energy threshold in (0, 1]
    dtype: str = "fp16"
    base: Optional[str] = None  # default: the adapter's recorded base model
    overwrite: bool = False


def check_request(request: ExportRequest) -> None:
    """Everything about the request that needs no model."""
    if request.format not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {request.format!r}")
    if request.dtype not in EXPORT_DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(EXPORT_DTYPES)}, got {request.dtype!r}")
    if request.rank is not None and request.energy is not None:
        raise UserError("give --rank or --energy, not both")
    if request.format != "lora" and (request.rank is not None or request.energy is not None):
        raise UserError(f"--rank and --energy are for --format lora; a {request.format} file is lossless")
    if request.rank is not None and request.rank < 1:
        raise UserError(f"--rank must be >= 1, got {request.rank}")
    if request.energy is not None and not 0 < request.energy <= 1:
        raise UserError(f"--energy must be in (0, 1], got {request.energy}")
    if not request.out.endswith(".safetensors"):
        raise UserError(f"--out {request.out} must be a .safetensors file")
    if os.path.exists(request.out) and not request.overwrite:
        raise UserError(f"--out {request.out} exists; pass --overwrite to replace it")
    check_can_write(request.out, "--out", folder=False)
