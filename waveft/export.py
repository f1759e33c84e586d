"""Export an adapter to the files ComfyUI, Forge / A1111, InvokeAI and diffusers' `load_lora_weights` read.

`python -m waveft.export --adapter RUN/adapter --format full-diff|lora --out FILE.safetensors
[--rank N | --energy F] [--dtype fp16|bf16|fp32] [--base MODEL] [--overwrite]`

Both formats name SDXL UNet layers the kohya way, `lora_unet_<diffusers module path, "." -> "_">`:
- `full-diff`: `<name>.diff` (out x in), the adapter's weight difference itself: lossless.
- `lora`: `<name>.lora_down.weight` (rank x in), `<name>.lora_up.weight` (out x rank) and `<name>.alpha`, from
  PEFT's `convert_to_lora` (an SVD of each layer's difference at a fixed rank, or the smallest rank keeping an
  `--energy` fraction of its squared singular values); every tool applies (alpha / rank) up @ down. The
  relative error |dW - (alpha / rank) up down|_F / |dW|_F of every layer is printed and stored in the metadata.

Methods whose layers add a difference to the frozen weight (W' = W + dW) export: `EXPORTABLE_PEFT_TYPES`.
Layer shapes come from the base model's UNet config alone: the UNet is built on the meta device and no base
weight is loaded. Differences are built one layer at a time, and a `full-diff` file is streamed to disk, so
an export holds one layer's dense difference (plus, for `lora`, the low-rank output) at a time.
"""
import argparse
import dataclasses
import datetime
import hashlib
import json
import os
import statistics
import struct
from dataclasses import dataclass
from typing import Optional

import torch
from tqdm.auto import tqdm

from waveft.checkpointing import ADAPTER_WEIGHTS_NAME, PEFT_MODEL_PREFIX, load_adapter_weights
from waveft.errors import UserError, cli_entry
from waveft.files import write_atomic

FORMATS = ("full-diff", "lora")
EXPORT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
SAFETENSORS_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}
KOHYA_UNET_PREFIX = "lora_unet_"
DEFAULT_LORA_RANK = 32
# PEFT types whose layers are additive (W' = W + get_delta_weight()), by the `adapter.type` they come from.
EXPORTABLE_PEFT_TYPES = {
    "WAVEFT": "waveft", "SHIRA": "shira", "LORA": "lora", "LOHA": "loha", "LOKR": "lokr",
    "FOURIERFT": "fourierft", "VERA": "vera", "ADALORA": "adalora", "WARA": "wara",
}
# Why the PEFT methods a user is most likely to bring cannot export; the rest get the generic reason.
NOT_ADDITIVE = {
    "IA3": "IA3 scales activations, it adds no weight difference",
    "OFT": "OFT multiplies the weight by a learned rotation: its change depends on the base weights",
    "BOFT": "BOFT multiplies the weight by a learned rotation: its change depends on the base weights",
    "LN_TUNING": "LN tuning replaces norm layers, it adds no weight difference to the adapted layers",
}


def kohya_name(module_path: str) -> str:
    """`down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0` -> `lora_unet_down_blocks_1_..._to_out_0`."""
    return KOHYA_UNET_PREFIX + module_path.replace(".", "_")


# ---- the source adapter ---------------------------------------------------------------------------------------


@dataclass
class SourceAdapter:
    path: str
    peft_config: dict  # adapter_config.json
    run_info: dict  # waveft_run.json ({} for an adapter this project's trainer did not write)
    weights_sha256: str  # of adapter_model.safetensors, the file's bytes

    @property
    def peft_type(self) -> str:
        return str(self.peft_config.get("peft_type", "?"))

    @property
    def method(self) -> str:
        return self.run_info.get("method") or EXPORTABLE_PEFT_TYPES.get(self.peft_type, self.peft_type.lower())


def read_source_adapter(path: str) -> SourceAdapter:
    """The adapter folder's config, run record and weights hash; a folder that is no adapter is a UserError."""
    config_file, weights_file = os.path.join(path, "adapter_config.json"), os.path.join(path, ADAPTER_WEIGHTS_NAME)
    for needed in (config_file, weights_file):
        if not os.path.isfile(needed):
            raise UserError(f"--adapter {path} is not an adapter folder: {os.path.basename(needed)} is missing")
    try:
        with open(config_file) as f:
            peft_config = json.load(f)
        run_info = {}
        if os.path.isfile(os.path.join(path, "waveft_run.json")):
            with open(os.path.join(path, "waveft_run.json")) as f:
                run_info = json.load(f)
    except json.JSONDecodeError as exc:
        raise UserError(f"--adapter {path}: not valid JSON ({exc})") from None
    digest = hashlib.sha256()
    with open(weights_file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return SourceAdapter(path, peft_config, run_info, digest.hexdigest())


def check_exportable(source: SourceAdapter) -> None:
    """Refuse, with the reason, an adapter whose change of the weights is not a difference the file can hold."""
    peft_type = source.peft_type
    if peft_type not in EXPORTABLE_PEFT_TYPES:
        reason = NOT_ADDITIVE.get(peft_type, f"{peft_type} is not one of the additive methods this export knows")
        raise UserError(
            f"{source.path}: a {peft_type} adapter cannot be exported: {reason} "
            f"(exportable: {', '.join(sorted(set(EXPORTABLE_PEFT_TYPES.values())))})"
        )
    if source.peft_config.get("use_dora"):
        raise UserError(
            f"{source.path}: a DoRA adapter cannot be exported: its weight is a learned magnitude times the "
            f"normalised W + BA, so its change depends on the base weights, which this export does not load"
        )
    bias = source.peft_config.get("bias", "none")
    if bias not in (None, "none") or source.peft_config.get("lora_bias"):
        raise UserError(f"{source.path}: an adapter that trains biases (bias={bias!r}) cannot be exported as a LoRA")


def base_model_of(source: SourceAdapter, base: Optional[str]) -> str:
    base = base or source.run_info.get("base_model") or source.peft_config.get("base_model_name_or_path")
    if not base:
        raise UserError(f"{source.path} does not record its base model; name it with --base")
    return base


def read_unet_config(base: str) -> dict:
    """The UNet config of a diffusers pipeline folder, a UNet folder or a Hub id (no weights are read)."""
    from diffusers import UNet2DConditionModel

    errors = []
    for subfolder in ("unet", None):
        try:
            return dict(UNet2DConditionModel.load_config(base, subfolder=subfolder))
        except (OSError, ValueError) as exc:
            errors.append(str(exc).splitlines()[0])
    raise UserError(f"could not read the UNet config of the base model {base!r}: {errors[0]}")


def unet_skeleton(config: dict) -> torch.nn.Module:
    """The UNet on the meta device, except that every Linear weight is a zero of stride 0 on the CPU (4 bytes):
    PEFT then creates the adapter's tensors on the CPU, and only shapes are ever read from the base weights."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    for module in unet.modules():
        if isinstance(module, torch.nn.Linear):
            zero = torch.zeros((), dtype=torch.float32).expand(module.out_features, module.in_features)
            module.weight = torch.nn.Parameter(zero, requires_grad=False)
    return unet.requires_grad_(False).eval()


@dataclass
class ExportLayer:
    name: str  # diffusers module path
    module: torch.nn.Module  # the adapter's PEFT layer
    out_features: int
    in_features: int

    @property
    def kohya_name(self) -> str:
        return kohya_name(self.name)


def attach_source_adapter(source: SourceAdapter, base: str, adapter_name: str = "default") -> list[ExportLayer]:
    """The adapter's layers on a weightless UNet of `base`, with its saved weights loaded, checked to fit."""
    from peft import PeftConfig
    from peft.tuners.tuners_utils import BaseTunerLayer

    import waveft.adapters.wara  # noqa: F401  (registers WaRA with PEFT, so its adapters load)
    from waveft.adapters.attach import inject_adapter
    from waveft.adapters.structured_waveft import enable_structured_waveft

    unet = unet_skeleton(read_unet_config(base))
    check_recorded_shapes(source, unet, base)
    peft_config = PeftConfig.from_pretrained(source.path)
    peft_config.inference_mode = True
    try:
        inject_adapter(unet, peft_config, adapter_name)
    except ValueError as exc:
        raise UserError(f"{source.path} could not be attached to {base}'s UNet: {str(exc).splitlines()[0]}") from None
    check_saved_shapes(source, unet, base, adapter_name)
    load_adapter_weights(unet, source.path, adapter_name)
    enable_structured_waveft(unet)  # our WaveFT layer builds the difference for wavelets PEFT's layer cannot run
    layers = []
    for name, module in unet.named_modules():
        if isinstance(module, BaseTunerLayer):
            if not isinstance(module.get_base_layer(), torch.nn.Linear):
                raise UserError(f"{source.path}: layer {name} is a {type(module.get_base_layer()).__name__}; "
                                f"only Linear layers export")
            layers.append(ExportLayer(name, module, module.out_features, module.in_features))
    return layers


def check_recorded_shapes(source: SourceAdapter, unet, base: str) -> None:
    """The trainer records each adapted layer's shape (waveft_run.json `layer_shapes`); each must be the base's.
    For methods whose saved tensors do not depend on the layer shape (WaveFT, FourierFT, SHiRA) this is the
    only way to tell that an adapter was trained on another model."""
    modules = dict(unet.named_modules())
    for name, (out_features, in_features) in source.run_info.get("layer_shapes", {}).items():
        module = modules.get(name)
        if module is None:
            raise UserError(f"{source.path}: adapted layer {name} ({out_features}x{in_features}) is not in the "
                            f"UNet of the base model {base}")
        if (module.out_features, module.in_features) != (out_features, in_features):
            raise UserError(f"{source.path}: layer {name} is {out_features}x{in_features} in the adapter but "
                            f"{module.out_features}x{module.in_features} in the base model {base}")


def check_saved_shapes(source: SourceAdapter, unet, base: str, adapter_name: str) -> None:
    """Every saved tensor must be one the base model's layers take, of the shape they take."""
    from peft import get_peft_model_state_dict
    from peft.tuners.tuners_utils import BaseTunerLayer
    from safetensors import safe_open

    expected = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(unet, adapter_name=adapter_name).items()}
    tuner_layers = {n: m for n, m in unet.named_modules() if isinstance(m, BaseTunerLayer)}
    with safe_open(os.path.join(source.path, ADAPTER_WEIGHTS_NAME), framework="pt") as f:
        names = f.keys()  # noqa: SIM118 (safe_open is no dict)
        saved = {k.removeprefix(PEFT_MODEL_PREFIX): tuple(f.get_slice(k).get_shape()) for k in names}

    def layer_of(key: str) -> str:
        parts = key.split(".")
        prefixes = (".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1))
        return next((p for p in prefixes if p in tuner_layers), key.rsplit(".", 2)[0])

    for key in sorted(set(saved) | set(expected)):
        layer = layer_of(key)
        if key not in expected:
            raise UserError(f"{source.path}: layer {layer} ({key}) is not an adapted layer of the base model {base}")
        if key not in saved:
            raise UserError(f"{source.path}: the base model {base} has layer {layer}, which the adapter lacks "
                            f"({key}); was it trained on another model?")
        if saved[key] != expected[key]:
            module = tuner_layers[layer]
            raise UserError(f"{source.path}: layer {layer} does not match the base model {base}: "
                            f"{key.removeprefix(layer + '.')} is {list(saved[key])} in the adapter, the base "
                            f"model's {module.out_features}x{module.in_features} layer needs {list(expected[key])}")


@torch.no_grad()
def dense_delta(layer: ExportLayer, adapter_name: str = "default") -> torch.Tensor:
    """The layer's weight difference dW (out x in), fp32. Cost: one dense out x in matrix."""
    delta = layer.module.get_delta_weight(adapter_name)
    if delta.is_sparse:  # SHiRA's
        delta = delta.to_dense()
    delta = delta.float()
    if tuple(delta.shape) != (layer.out_features, layer.in_features):
        raise UserError(f"layer {layer.name}: its difference is {list(delta.shape)}, the base model's layer is "
                        f"{layer.out_features}x{layer.in_features}")
    return delta


# ---- LoRA through PEFT's converter -----------------------------------------------------------------------------


def _dense_delta_layer(delta: torch.Tensor):
    """One layer as PEFT's `convert_to_lora` reads it: a tuner layer whose `get_delta_weight` is `delta`.

    PEFT's converter asks each layer whether it supports conversion; SHiRA (sparse difference), AdaLoRA and
    WaRA say no only because nobody declared it, so the difference is handed over already dense.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    class DenseDelta(torch.nn.Module, BaseTunerLayer):
        def get_delta_weight(self, adapter_name):
            return delta

        def supports_lora_conversion(self, adapter_name="default"):
            return True

    holder = torch.nn.Module()
    holder.layer = DenseDelta()
    return holder


@dataclass
class LoraLayerResult:
    name: str  # kohya name
    out_features: int
    in_features: int
    rank: int
    relative_error: float  # |dW - up @ down|_F / |dW|_F, with the factors as written (in the export dtype)
    energy_kept: float  # sum of the kept squared singular values / |dW|_F^2


def lora_factors(delta: torch.Tensor, rank, dtype) -> tuple[torch.Tensor, torch.Tensor, float, float, float]:
    """(down: r x in, up: out x r, alpha, relative error, energy kept) of PEFT's conversion of one difference.

    `rank` is an int (fixed: alpha = rank, the factors are PEFT's) or a float in (0, 1] (energy threshold:
    alpha = 1 and both factors carry sqrt(r)). Either way the tools' (alpha / r) up @ down is PEFT's B @ A. A
    file with per-layer ranks needs one alpha for all layers: diffusers maps kohya alphas to layers by the most
    common value only. Cost: an SVD of the out x in matrix.
    """
    import warnings

    from peft import convert_to_lora

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, state = convert_to_lora(_dense_delta_layer(delta), rank)
    down, up = state["layer.lora_A.weight"], state["layer.lora_B.weight"]
    r = down.shape[0]
    norm = torch.linalg.matrix_norm(delta)
    energy = min(float((torch.linalg.matrix_norm(up) / norm) ** 2), 1.0) if norm > 0 else 1.0
    alpha = float(r)
    if not isinstance(rank, int):
        alpha, root = 1.0, r**0.5
        down, up = down * root, up * root
    down, up = down.to(dtype), up.to(dtype)
    product = (alpha / r) * (up.float() @ down.float())  # what the tools apply, from the factors as written
    error = float(torch.linalg.matrix_norm(delta - product) / norm) if norm > 0 else 0.0
    return down, up, alpha, error, energy


def check_rank(layers: list[ExportLayer], rank: int) -> None:
    for layer in layers:
        if rank > min(layer.out_features, layer.in_features):
            raise UserError(f"--rank {rank} is larger than layer {layer.name} ({layer.out_features}x"
                            f"{layer.in_features}) allows: at most {min(layer.out_features, layer.in_features)}")


def lora_tensors(layers: list[ExportLayer], rank, dtype, progress: bool = True):
    """The kohya LoRA's tensors and each layer's result; one dense difference alive at a time."""
    tensors, results = {}, []
    for layer in tqdm(layers, desc="LoRA (SVD per layer)", disable=not progress):
        delta = dense_delta(layer)
        down, up, alpha, error, energy = lora_factors(delta, rank, dtype)
        del delta
        name = layer.kohya_name
        tensors[f"{name}.lora_down.weight"] = down
        tensors[f"{name}.lora_up.weight"] = up
        tensors[f"{name}.alpha"] = torch.tensor(alpha, dtype=dtype)
        results.append(LoraLayerResult(name, layer.out_features, layer.in_features, down.shape[0], error, energy))
    return tensors, results


def format_error_table(results: list[LoraLayerResult]) -> str:
    """Relative error per layer shape (median, worst), ranks and energy kept, and the worst layer by name."""
    by_shape: dict[tuple, list[LoraLayerResult]] = {}
    for r in results:
        by_shape.setdefault((r.out_features, r.in_features), []).append(r)
    lines = ["| out x in | layers | rank | rel. error median | rel. error worst | energy kept (min) |",
             "|---|---|---|---|---|---|"]

    def row(label, group):
        ranks = sorted({r.rank for r in group})
        rank = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"
        errors = [r.relative_error for r in group]
        return (f"| {label} | {len(group)} | {rank} | {statistics.median(errors):.4f} | {max(errors):.4f} | "
                f"{min(r.energy_kept for r in group):.4f} |")

    for (out_f, in_f), group in sorted(by_shape.items()):
        lines.append(row(f"{out_f} x {in_f}", group))
    lines.append(row("all", results))
    worst = max(results, key=lambda r: r.relative_error)
    lines.append(f"worst layer: {worst.name} (rank {worst.rank}, relative error {worst.relative_error:.4f})")
    return "\n".join(lines)


# ---- files -------------------------------------------------------------------------------------------------------


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


def export_metadata(source: SourceAdapter, base: str, fmt: str, dtype_name: str, layers: int,
                    results: Optional[list[LoraLayerResult]] = None, rank=None) -> dict[str, str]:
    """safetensors metadata (strings): what A1111 / Forge read (ss_*, modelspec.*), and the source adapter."""
    run = source.run_info
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
        "modelspec.description": f"{source.method} adapter exported as {fmt} ({layers} UNet layers)",
        "waveft.format": fmt,
        "waveft.dtype": dtype_name,
        "waveft.base_model": base,
        "waveft.layers": str(layers),
        "waveft.method": source.method,
        "waveft.adapter_type": run.get("adapter_type") or EXPORTABLE_PEFT_TYPES.get(source.peft_type, ""),
        "waveft.budget": json.dumps(run.get("budget")),
        "waveft.trainable_parameters": json.dumps(run.get("trainable_parameters")),
        "waveft.adapter_sha256": source.weights_sha256,
    }
    if run.get("instance_prompt"):
        meta["modelspec.trigger_phrase"] = run["instance_prompt"]
    if fmt == "full-diff":
        meta.update({"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps({"algo": "full"})})
        return meta
    fixed = isinstance(rank, int)
    errors = [r.relative_error for r in results]
    meta.update({
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank) if fixed else "Dynamic",  # kohya's word for per-layer ranks
        "ss_network_alpha": str(float(rank)) if fixed else "1.0",
        "waveft.lora_rank" if isinstance(rank, int) else "waveft.lora_energy": str(rank),
        "waveft.relative_error_worst": f"{max(errors):.6g}",
        "waveft.relative_error_median": f"{statistics.median(errors):.6g}",
        "waveft.energy_kept_min": f"{min(r.energy_kept for r in results):.6g}",
        "waveft.layer_errors": json.dumps(
            {r.name: {"rank": r.rank, "relative_error": round(r.relative_error, 6),
                      "energy_kept": round(r.energy_kept, 6)} for r in results}
        ),
    })
    return meta


# ---- the export ------------------------------------------------------------------------------------------------


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
    if request.format == "full-diff" and (request.rank is not None or request.energy is not None):
        raise UserError("--rank and --energy are for --format lora; a full-diff file is lossless")
    if request.rank is not None and request.rank < 1:
        raise UserError(f"--rank must be >= 1, got {request.rank}")
    if request.energy is not None and not 0 < request.energy <= 1:
        raise UserError(f"--energy must be in (0, 1], got {request.energy}")
    if not request.out.endswith(".safetensors"):
        raise UserError(f"--out {request.out} must be a .safetensors file")
    if os.path.exists(request.out) and not request.overwrite:
        raise UserError(f"--out {request.out} exists; pass --overwrite to replace it")


def return_freed_blocks_to_the_system() -> None:
    """glibc raises its mmap threshold to the size of each large block freed, after which blocks of one layer's
    size come from a heap that does not shrink: measured on SDXL, 5 MB more resident per layer exported (5.8 GB
    for a full difference). A fixed 1 MiB threshold keeps such blocks mmapped, so freeing one returns it."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc
        pass


def export_adapter(request: ExportRequest, progress: bool = True, say=print) -> ExportResult:
    """Write the export file atomically: a failure at any point leaves no file (and any earlier one intact)."""
    check_request(request)
    return_freed_blocks_to_the_system()
    source = read_source_adapter(request.adapter)
    check_exportable(source)
    base = base_model_of(source, request.base)
    layers = attach_source_adapter(source, base)
    dtype = EXPORT_DTYPES[request.dtype]
    if request.format == "full-diff":
        metadata = export_metadata(source, base, request.format, request.dtype, len(layers))
        specs = [(f"{layer.kohya_name}.diff", dtype, (layer.out_features, layer.in_features)) for layer in layers]
        deltas = (dense_delta(layer).to(dtype) for layer in tqdm(layers, desc="full-diff", disable=not progress))
        write_atomic(request.out, lambda f: write_safetensors_streamed(f, specs, deltas, metadata))
        result = ExportResult(request.out, os.path.getsize(request.out), metadata, len(layers))
    else:
        from safetensors.torch import save

        rank = request.energy if request.energy is not None else (request.rank or DEFAULT_LORA_RANK)
        if isinstance(rank, int):
            check_rank(layers, rank)
        tensors, results = lora_tensors(layers, rank, dtype, progress)
        metadata = export_metadata(source, base, request.format, request.dtype, len(layers), results, rank)
        write_atomic(request.out, lambda f: f.write(save(tensors, metadata=metadata)))
        say(format_error_table(results))
        result = ExportResult(request.out, os.path.getsize(request.out), metadata, len(layers), results)
    say(f"wrote {request.out}: {request.format}, {len(layers)} layers, {request.dtype}, {result.bytes / 1e6:.1f} MB")
    return result


# ---- at the end of a training run (the `export:` section) --------------------------------------------------------


def planned_exports(export_cfg, run_info: dict) -> list[dict]:
    """The files an `export:` section asks for, named so that A1111's `<lora:NAME:1>` says what they are."""
    stem = "_".join(str(run_info.get(k) or "") for k in ("subject", "method")).strip("_") or "adapter"
    stem = "".join(c if c.isalnum() or c in "-_" else "-" for c in stem)
    planned = []
    for fmt in export_cfg.formats:
        if fmt == "full-diff":
            planned.append({"format": fmt, "file": f"{stem}_full_diff.safetensors", "dtype": export_cfg.dtype})
        elif export_cfg.lora_energy is not None:
            planned.append({"format": fmt, "file": f"{stem}_lora_energy{export_cfg.lora_energy:g}.safetensors",
                            "energy": export_cfg.lora_energy, "dtype": export_cfg.dtype})
        else:
            rank = export_cfg.lora_rank or DEFAULT_LORA_RANK
            planned.append({"format": fmt, "file": f"{stem}_lora_r{rank}.safetensors", "rank": rank,
                            "dtype": export_cfg.dtype})
    return planned


def check_export_fits(export_cfg, layers) -> None:
    """Before training: a fixed LoRA rank must fit every adapted layer (`layers`: rows with out/in_features)."""
    if "lora" not in export_cfg.formats or export_cfg.lora_energy is not None:
        return
    rank = export_cfg.lora_rank or DEFAULT_LORA_RANK
    for layer in layers:
        if rank > min(layer.out_features, layer.in_features):
            raise UserError(f"export.lora_rank={rank} is larger than layer {layer.name} ({layer.out_features}x"
                            f"{layer.in_features}) allows: at most {min(layer.out_features, layer.in_features)}")


def export_run(adapter_dir: str, planned: list[dict], say=print) -> None:
    """Write the planned files into the saved adapter folder (each atomically, replacing an earlier export)."""
    for item in planned:
        request = ExportRequest(adapter=adapter_dir, format=item["format"], out=os.path.join(adapter_dir, item["file"]),
                                rank=item.get("rank"), energy=item.get("energy"), dtype=item["dtype"], overwrite=True)
        export_adapter(request, say=say)


def parse_args(argv=None) -> ExportRequest:
    parser = argparse.ArgumentParser(
        prog="python -m waveft.export",
        description="Export an adapter as a kohya-named full weight difference or LoRA for ComfyUI, Forge / "
        "A1111, InvokeAI and diffusers.",
    )
    parser.add_argument("--adapter", required=True, help="the adapter folder (RUN/adapter)")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--out", required=True, help="the .safetensors file to write")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--rank", type=int, help=f"lora: the same rank for every layer (default {DEFAULT_LORA_RANK})")
    size.add_argument("--energy", type=float, help="lora: per-layer rank keeping this fraction of the squared "
                      "singular values, in (0, 1]; 1.0 is exact")
    parser.add_argument("--dtype", default="fp16", choices=list(EXPORT_DTYPES))
    parser.add_argument("--base", help="base model (Hub id or folder) for the layer shapes; default: the "
                        "adapter's recorded base model; only its UNet config is read")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = parser.parse_args(argv)
    return ExportRequest(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ExportRequest)})


@cli_entry
def main(argv=None) -> None:
    export_adapter(parse_args(argv))


if __name__ == "__main__":
    main()
