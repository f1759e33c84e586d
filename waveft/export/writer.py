"""One export: check the request, attach the source adapter's layers, write the file atomically."""
import os
from dataclasses import dataclass
from typing import Optional

import torch
from tqdm.auto import tqdm

from waveft.errors import UserError
from waveft.export.lora import (
    DEFAULT_LORA_RANK,
    LoraLayerResult,
    LoraSize,
    check_rank,
    format_error_table,
    lora_tensors,
)
from waveft.export.metadata import export_metadata
from waveft.export.native import NATIVE_FORMAT, check_native_exportable, write_native
from waveft.export.safetensors_stream import write_safetensors_streamed
from waveft.export.source import (
    attach_source_adapter,
    base_model_of,
    check_exportable,
    dense_delta,
    read_source_adapter,
)
from waveft.io.files import check_can_write, write_atomic

FORMATS = ("full-diff", "lora", "waveft")  # waveft: WaveFT's own file (waveft.export.native)
EXPORT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


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


@dataclass
class ExportResult:
    path: str
    bytes: int
    metadata: dict
    layers: int
    lora_layers: Optional[list[LoraLayerResult]] = None


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


def export_adapter(request: ExportRequest, progress: bool = True, say=print) -> ExportResult:
    """Write the export file atomically: a failure at any point leaves no file (and any earlier one intact)."""
    check_request(request)
    source = read_source_adapter(request.adapter)
    check_exportable(source)
    if request.format == NATIVE_FORMAT:
        check_native_exportable(source, FORMATS)
    base = base_model_of(source, request.base)
    layers = attach_source_adapter(source, base)
    dtype = EXPORT_DTYPES[request.dtype]
    if request.format == NATIVE_FORMAT:
        metadata = write_native(request.out, source, base, layers, say=say)
        result = ExportResult(request.out, os.path.getsize(request.out), metadata, len(layers))
    elif request.format == "full-diff":
        metadata = export_metadata(source, base, request.format, request.dtype, len(layers))
        specs = [(f"{layer.kohya_name}.diff", dtype, (layer.out_features, layer.in_features)) for layer in layers]
        deltas = (dense_delta(layer).to(dtype) for layer in tqdm(layers, desc="full-diff", disable=not progress))
        write_atomic(request.out, lambda f: write_safetensors_streamed(f, specs, deltas, metadata))
        result = ExportResult(request.out, os.path.getsize(request.out), metadata, len(layers))
    else:
        from safetensors.torch import save

        size = LoraSize(energy=request.energy) if request.energy is not None else \
            LoraSize(rank=request.rank or DEFAULT_LORA_RANK)
        if size.rank is not None:
            check_rank(layers, size.rank, f"--rank {size.rank}")
        tensors, results = lora_tensors(layers, size, dtype, progress)
        metadata = export_metadata(source, base, request.format, request.dtype, len(layers), results, size)
        write_atomic(request.out, lambda f: f.write(save(tensors, metadata=metadata)))
        say(format_error_table(results))
        result = ExportResult(request.out, os.path.getsize(request.out), metadata, len(layers), results)
    say(f"wrote {request.out}: {request.format}, {len(layers)} layers, {result.metadata['waveft.dtype']}, "
        f"{result.bytes / 1e6:.1f} MB")
    return result
