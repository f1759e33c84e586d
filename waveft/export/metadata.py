"""The safetensors metadata of an export: what A1111, Forge and kohya read (`ss_*`, `modelspec.*`), and the source."""
import datetime
import json
import statistics
from typing import Optional

from waveft.export.lora import LoraLayerResult, LoraSize
from waveft.export.source import UNET, ExportLayer, SourceAdapter, exportable_peft_types


def layers_per_model(layers: list[ExportLayer]) -> dict[str, int]:
    """{"unet": n, "text_encoder": m, ...}: how many of the file's layers each model has."""
    counts: dict[str, int] = {}
    for layer in layers:
        counts[layer.model] = counts.get(layer.model, 0) + 1
    return counts


def export_metadata(source: SourceAdapter, base: str, fmt: str, dtype_name: str, layers: list[ExportLayer],
                    results: Optional[list[LoraLayerResult]] = None,
                    size: Optional[LoraSize] = None) -> dict[str, str]:
    """safetensors metadata (strings): what A1111 / Forge read (ss_*, modelspec.*), and the source adapter (its
    text encoders' weights hashes too, where it has them)."""
    run = source.run_info
    counts = layers_per_model(layers)
    described = ", ".join(f"{n} {'UNet' if model == UNET else model} layers" for model, n in counts.items())
    title = f"{source.method} {run['subject']}" if run.get("subject") else f"{source.method} adapter"
    meta = {
        "ss_base_model_version": "sdxl_base_v1-0",
        "ss_output_name": title,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": title,
        "modelspec.resolution": "1024x1024",
        "modelspec.date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S"),
        "modelspec.description": f"{source.method} adapter exported as {fmt} ({described})",
        "waveft.format": fmt,
        "waveft.dtype": dtype_name,
        "waveft.base_model": base,
        "waveft.layers": str(len(layers)),
        "waveft.layers_per_model": json.dumps(counts),
        "waveft.method": source.method,
        "waveft.adapter_type": run.get("adapter_type") or exportable_peft_types().get(source.peft_type, ""),
        "waveft.budget": json.dumps(run.get("budget")),
        "waveft.trainable_parameters": json.dumps(run.get("trainable_parameters")),
        "waveft.adapter_sha256": source.weights_sha256,
    }
    if source.text_encoders:
        meta["waveft.text_encoder_sha256"] = json.dumps({name: part.weights_sha256
                                                         for name, part in source.text_encoders.items()})
    if run.get("instance_prompt"):
        meta["modelspec.trigger_phrase"] = run["instance_prompt"]
    if fmt == "full-diff":
        meta.update({"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps({"algo": "full"})})
        return meta
    if fmt != "lora":  # the native file adds its own keys (waveft.export.native)
        return meta
    fixed = size.rank is not None
    errors = [r.relative_error for r in results]
    meta.update({
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(size.rank) if fixed else "Dynamic",  # kohya's word for per-layer ranks
        "ss_network_alpha": str(float(size.rank)) if fixed else "1.0",
        "waveft.lora_rank" if fixed else "waveft.lora_energy": str(size.rank if fixed else size.energy),
        "waveft.relative_error_worst": f"{max(errors):.6g}",
        "waveft.relative_error_median": f"{statistics.median(errors):.6g}",
        "waveft.energy_kept_min": f"{min(r.energy_kept for r in results):.6g}",
        "waveft.layer_errors": json.dumps(
            {r.name: {"rank": r.rank, "relative_error": round(r.relative_error, 6),
                      "energy_kept": round(r.energy_kept, 6)} for r in results}
        ),
    })
    return meta
