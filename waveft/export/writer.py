"""One export: check the request, attach the source adapter's layers, write the file atomically."""
import os
from dataclasses import dataclass
from typing import Optional

from tqdm.auto import tqdm

from waveft.export.lora import (
    LoraLayerResult,
    LoraSize,
    check_rank,
    format_error_table,
    lora_tensors,
)
from waveft.export.metadata import export_metadata
from waveft.export.native import NATIVE_FORMAT, check_native_exportable, write_native
from waveft.export.request import DEFAULT_LORA_RANK, FORMATS, ExportRequest, check_request
from waveft.export.safetensors_stream import write_safetensors_streamed
from waveft.export.source import (
    attach_source_adapter,
    base_model_of,
    check_exportable,
    dense_delta,
    read_source_adapter,
)
from waveft.io.files import write_atomic
from waveft.models import DTYPES


@dataclass
class ExportResult:
    path: str
    bytes: int
    metadata: dict
    layers: int
    lora_layers: Optional[list[LoraLayerResult]] = None


def export_adapter(request: ExportRequest, progress: bool = True, say=print) -> ExportResult:
    """Write the export file atomically: a failure at any point leaves no file (and any earlier one intact)."""
    check_request(request)
    source = read_source_adapter(request.adapter)
    check_exportable(source)
    if request.format == NATIVE_FORMAT:
        check_native_exportable(source, FORMATS)
    base = base_model_of(source, request.base)
    layers = attach_source_adapter(source, base)
    dtype = DTYPES[request.dtype]
    if request.format == NATIVE_FORMAT:
        metadata = write_native(request.out, source, base, layers, say=say)
        result = ExportResult(request.out, os.path.getsize(request.out), metadata, len(layers))
    elif request.format == "full-diff":
        metadata = export_metadata(source, base, request.format, request.dtype, layers)
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
        metadata = export_metadata(source, base, request.format, request.dtype, layers, results, size)
        write_atomic(request.out, lambda f: f.write(save(tensors, metadata=metadata)))
        say(format_error_table(results))
        result = ExportResult(request.out, os.path.getsize(request.out), metadata, len(layers), results)
    say(f"wrote {request.out}: {request.format}, {len(layers)} layers ({result.metadata['waveft.layers_per_model']}), "
        f"{result.metadata['waveft.dtype']}, "
        f"{result.bytes / 1e6:.1f} MB")
    return result
