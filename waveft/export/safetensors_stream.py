"""A safetensors file written one tensor at a time, so a large export never holds all its tensors in memory."""
import json
import struct

import torch

SAFETENSORS_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}


def write_safetensors_streamed(f, specs: list[tuple[str, torch.dtype, tuple]], tensors, metadata: dict) -> None:
    """Write a safetensors file whose tensors come one at a time, in `specs` order (name, dtype, shape).

    The format is an 8-byte little-endian header length, a JSON header (dtype, shape, byte offsets of each
    tensor; `__metadata__`), then the tensors' bytes. The safetensors library only writes a file from tensors
    all in memory; knowing every shape beforehand lets the header go first and each tensor follow as built.
    """
    header, offset = {"__metadata__": metadata}, 0
    for name, dtype, shape in specs:
        size = torch.Size(shape).numel() * dtype.itemsize
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # the tensors start 8-byte aligned
    f.write(struct.pack("<Q", len(encoded)) + encoded)
    for (name, dtype, shape), tensor in zip(specs, tensors, strict=True):
        if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"{name}: got {tensor.dtype} {list(tensor.shape)}, the header says {dtype} {list(shape)}")
        f.write(tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
