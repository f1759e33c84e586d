"""WaveFT's own file (`--format waveft`): the trained spectrum and what places it, for tools that rebuild the
difference themselves (the ComfyUI node in `integrations/comfyui/`), at the adapter's own size.

Layout, format version 1 (a safetensors file; the reader needs torch only). Per adapted layer, named the
kohya way like the other formats (`<name>` = `lora_unet_<diffusers module path, "." -> "_">`, and for the text
encoders' adapters `lora_te1_` / `lora_te2_` + `text_model_encoder_layers_...`, as `source.kohya_name` says):

- `<name>.waveft_spectrum`  float32 (n,)   the trained coefficients, PEFT's `waveft_spectrum`, as saved
- `<name>.waveft_shape`     int32 (2,)     the layer's (out_features, in_features)
- `<name>.waveft_scaling`   float32 ()     PEFT's `scaling`
- `<name>.waveft_locations` int32 ()       k: the layer's coefficient locations are table `waveft_locations.k`

Shared by the file:

- `waveft_locations.<k>`    int32 (2, n)   rows, columns of each coefficient in the out x in grid (PEFT's
  `waveft_indices`, before padding). Layers with equal locations share one table: PEFT draws them from
  `out * in` and the seed alone, so SDXL's 560 layers need 4 tables (83 KB), not 560 (5.8 MB).
- `waveft.format_version`   int32 ()       1; a reader refuses a newer version
- `waveft.use_idwt`         int32 ()       1: WaveFT (inverse DWT of the placed coefficients), 0: SHiRA mode
- `waveft.wavelet_filters`  float64 (2, L) the reconstruction filters (rec_lo, rec_hi) the adapter was trained
  with (PEFT's table where PEFT can run the wavelet, else PyWavelets'); only where `use_idwt` is 1

The difference of a layer is PEFT's `get_delta_weight`: scaling * the coefficients placed at their locations
(SHiRA mode), or scaling * the single-level 2-D inverse DWT of them placed, centred, in PEFT's padded grid of
`(out + L - 2, in + L - 2)` rounded up to even, cropped back to `out x in` (`integrations/comfyui/
waveft_native.py` is the reader). The spectrum stays float32 whatever `--dtype` says: the values as trained,
the file within 1.1x of the PEFT file's size. The key names here and in the reader are the format: change
both, and the version, together.
"""
import os

import torch

from waveft.errors import UserError

NATIVE_FORMAT = "waveft"
NATIVE_FORMAT_VERSION = 1
PEFT_TYPE = "WAVEFT"
INT32_MAX = 2**31 - 1


def check_native_exportable(source, formats) -> None:
    """Only PEFT WaveFT adapters (SHiRA mode included) have a spectrum this format holds; `formats`: all formats.
    The text encoders' adapters must be WaveFT too, with the UNet's wavelet and mode: the file holds one of each."""
    from waveft.export.source import exportable_peft_types

    for part in (source, *source.text_encoders.values()):
        if part.peft_type != PEFT_TYPE:
            others = [f for f in formats if f != NATIVE_FORMAT] if part.peft_type in exportable_peft_types() else []
            has = f"a {part.method} adapter exports as {', '.join(others)}" if others else "it has no export"
            raise UserError(f"{part.path}: --format {NATIVE_FORMAT} holds WaveFT adapters (SHiRA mode included), "
                            f"not {part.peft_type}: {has}")
        for key, default in (("use_idwt", True), ("wavelet_family", "db1")):
            if part.peft_config.get(key, default) != source.peft_config.get(key, default):
                raise UserError(f"{part.path}: {key} is {part.peft_config.get(key, default)!r}, the UNet's adapter "
                                f"has {source.peft_config.get(key, default)!r}: --format {NATIVE_FORMAT} holds one "
                                f"{key} per file")


def native_tensors(layers, peft_config: dict, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The file's tensors from the attached adapter's layers (`ExportLayer`s of PEFT WaveFT layers).

    Cost: a copy of the spectrum (n floats per layer) and one int32 table per distinct set of locations.
    """
    from waveft.adapters.structured_waveft.layer import peft_compatible_filters

    use_idwt = bool(peft_config.get("use_idwt", True))
    tensors = {
        "waveft.format_version": torch.tensor(NATIVE_FORMAT_VERSION, dtype=torch.int32),
        "waveft.use_idwt": torch.tensor(int(use_idwt), dtype=torch.int32),
    }
    if use_idwt:
        filters = peft_compatible_filters(peft_config["wavelet_family"])
        tensors["waveft.wavelet_filters"] = torch.tensor([filters.rec_lo, filters.rec_hi], dtype=torch.float64)
    tables: dict[bytes, int] = {}
    for layer in layers:
        if max(layer.out_features, layer.in_features) > INT32_MAX:
            raise UserError(f"layer {layer.name} ({layer.out_features}x{layer.in_features}) is too large for "
                            f"int32 locations")
        locations = layer.module.waveft_indices[adapter_name].to(torch.int32).contiguous()
        key = locations.numpy().tobytes()
        if key not in tables:
            tables[key] = len(tables)
            tensors[f"waveft_locations.{tables[key]}"] = locations
        table = tables[key]
        name = layer.kohya_name
        tensors[f"{name}.waveft_spectrum"] = layer.module.waveft_spectrum[adapter_name].detach().float().contiguous()
        tensors[f"{name}.waveft_shape"] = torch.tensor([layer.out_features, layer.in_features], dtype=torch.int32)
        tensors[f"{name}.waveft_scaling"] = torch.tensor(layer.module.waveft_scaling[adapter_name],
                                                         dtype=torch.float32)
        tensors[f"{name}.waveft_locations"] = torch.tensor(table, dtype=torch.int32)
    return tensors


def native_metadata(peft_config: dict, tensors: dict) -> dict[str, str]:
    """What the native file adds to `export_metadata`'s keys: its version and the adapter's WaveFT settings."""
    use_idwt = bool(peft_config.get("use_idwt", True))
    return {
        "ss_network_module": "waveft",  # no A1111 / kohya module reads it: the ComfyUI node does
        "waveft.format_version": str(NATIVE_FORMAT_VERSION),
        "waveft.use_idwt": str(use_idwt).lower(),
        "waveft.wavelet": peft_config.get("wavelet_family", "") if use_idwt else "none (SHiRA mode)",
        "waveft.scaling": str(peft_config.get("scaling")),
        "waveft.location_tables": str(sum(k.startswith("waveft_locations.") for k in tensors)),
    }


def write_native(out: str, source, base: str, layers, say=print) -> dict[str, str]:
    """Write the native file atomically and say its size beside the PEFT weights file's; returns its metadata."""
    from safetensors.torch import save

    from waveft.export.metadata import export_metadata
    from waveft.io.adapter_folder import AdapterFolder
    from waveft.io.files import write_atomic

    tensors = native_tensors(layers, source.peft_config)
    metadata = export_metadata(source, base, NATIVE_FORMAT, "fp32", layers)
    metadata.update(native_metadata(source.peft_config, tensors))
    write_atomic(out, lambda f: f.write(save(tensors, metadata=metadata)))
    size = os.path.getsize(out)
    peft_size = sum(AdapterFolder(part.path).weights_bytes() for part in (source, *source.text_encoders.values()))
    say(f"native WaveFT file: {size / 2**20:.2f} MiB ({size:,} bytes); the PEFT weights file(s) "
        f"{peft_size / 2**20:.2f} MiB ({peft_size:,} bytes): {size / peft_size:.2f}x")
    return metadata
