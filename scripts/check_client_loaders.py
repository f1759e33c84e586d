"""Do the files `waveft.export` writes load in InvokeAI and in Forge? Runs each client's own loader code, from its
source folder, on this project's exports, and prints one table per client (file, keys, mapped, unmapped, result);
exit status 1 if any file fails.

    python scripts/check_client_loaders.py --invokeai PATH --forge PATH [--work DIR]

Files: from the built-in tiny SDXL, a random WaveFT adapter exported (fp32) as a LoRA at full rank (alpha = rank),
a LoRA with `--energy 1.0` (alpha = 1) and a full difference: each client applies them to the tiny UNet's real
weights, compared with PEFT's merged weights (`max err` column: the largest |W_client - W_peft| over the largest
|dW|). At SDXL's real shapes (its UNet config on the meta device, no weights): the 560 kohya names and shapes the
exporter gives SDXL, laid out as the tiny files are (checked equal), mapped onto each client's SDXL model.

InvokeAI (`invokeai/`, github.com/invoke-ai/InvokeAI): its model probe `ModelConfigFactory.from_model_on_disk`
classifies the SDXL LoRA file (written with zero tensors, 11 MB); the SDXL full difference (1.9 GB) is classified by
the probe's own functions on its key shapes; its loader's key conversion (`convert_sdxl_keys_to_diffusers_format`,
`lora_model_from_sd_state_dict`) and `LayerPatcher` (module lookup, `get_parameters`, patching) do the rest on a
diffusers UNet, as its denoise node does. Its package imports need, beside this project's venv: blake3,
picklescan, gguf, deprecated (`bash scripts/fetch_client_sources.sh` puts its source and them in .cache/clients/:
run with PYTHONPATH=.cache/clients/packages); the modules it imports only for
other model kinds (onnxruntime, onnx, torchvision, spandrel, cv2, compel) are stand-ins that raise if used.

Forge (`backend/`, `packages_3rdparty/`, github.com/lllyasviel/stable-diffusion-webui-forge, with
`repositories/huggingface_guess` where its launcher clones it): huggingface_guess detects the SDXL checkpoint
layout, Forge's `IntegratedUNet2DConditionModel` and `KModel` are built on the meta device, and
`model_lora_keys_unet`, `load_lora`, `ModelPatcher.add_patches` map the keys as `load_lora_for_models` does; on
the tiny model, `merge_lora_to_weight` applies them. Its imports need gguf (the same folder).
"""
import argparse
import contextlib
import importlib
import importlib.machinery
import os
import sys
import tempfile
from dataclasses import dataclass, field

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

INVOKEAI_PACKAGES = ("blake3", "picklescan", "gguf", "deprecated")
FORGE_PACKAGES = ("gguf",)
# Imported by InvokeAI's package at module level for other model kinds only (ONNX, upscalers, image utilities,
# compel prompts); torchvision and onnxruntime cannot be installed beside this CPU torch.
INVOKEAI_STAND_INS = ("onnxruntime", "onnx", "torchvision", "spandrel", "cv2", "compel")
SDXL_PREFIX = "lora_unet_"
TINY_EXPORTS = {"lora-full-rank": dict(format="lora", rank=None), "lora-energy-1.0": dict(format="lora", energy=1.0),
                "full-diff": dict(format="full-diff")}
SDXL_LORA_RANK = 4
ABSOLUTE_TOLERANCE = 1e-4  # of the largest |dW|: fp32 files, applied in fp32


@dataclass
class Row:
    file: str
    keys: int
    mapped: int = 0
    unmapped: list = field(default_factory=list)
    problems: list = field(default_factory=list)
    error_vs_file: float | None = None  # client's weights vs W + the file's kohya difference, of max |dW|
    error_vs_peft: float | None = None  # client's weights vs PEFT's merge, of max |dW|

    @property
    def ok(self) -> bool:
        return not self.unmapped and not self.problems and self.mapped == self.keys

    def cells(self) -> list[str]:
        result = "ok" if self.ok else "FAIL: " + "; ".join(self.problems + [f"unmapped {k}" for k in self.unmapped[:3]])
        errors = ["" if e is None else f"{e:.1e}" for e in (self.error_vs_file, self.error_vs_peft)]
        return [self.file, str(self.keys), str(self.mapped), str(len(self.unmapped)), *errors, result]

    def check_weights(self, weights: dict, reference: "TinyReference", state: dict, label: str) -> None:
        self.error_vs_file = reference.error(weights, reference.from_file(state))
        self.error_vs_peft = reference.error(weights, reference.merged)
        if self.error_vs_file > ABSOLUTE_TOLERANCE:
            self.problems.append(f"applied weights differ from the file's difference by {self.error_vs_file:.1e}")
        if self.error_vs_peft > PEFT_TOLERANCE[label]:
            self.problems.append(f"applied weights differ from PEFT's merge by {self.error_vs_peft:.1e}")


def print_table(client: str, rows: list[Row]) -> None:
    print(f"\n{client}\n| file | keys | mapped | unmapped | err vs file | err vs PEFT | result |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row.cells()) + " |")


# ---- the files ---------------------------------------------------------------------------------------------------


@dataclass
class ExportedFiles:
    tiny_base: str
    tiny_adapter: str
    tiny: dict  # label -> path of the exported file
    sdxl: dict  # label -> {key: tensor on the meta device} (the exporter's SDXL names and shapes)
    sdxl_lora_file: str  # the SDXL LoRA's keys written with zero tensors


def kohya_layout(state: dict) -> dict:
    """{key with the layer name replaced by '<layer>': shape written in terms of the layer's (out, in, rank)}."""
    layout = {}
    for key, tensor in state.items():
        layer, suffix = key.split(".", 1)
        layout.setdefault(layer, {})[suffix] = tuple(tensor.shape)
    return layout


def shape_rule(suffix: str, out_features: int, in_features: int, rank: int) -> tuple:
    return {"diff": (out_features, in_features), "lora_down.weight": (rank, in_features),
            "lora_up.weight": (out_features, rank), "alpha": ()}[suffix]


def check_layout(label: str, state: dict, layers) -> set:
    """The file's keys are, per exported layer, the same suffixes with the shapes `shape_rule` gives; returns the
    suffixes (so that SDXL's names can be laid out the same way)."""
    layout = kohya_layout(state)
    by_name = {layer.kohya_name: layer for layer in layers}
    if set(layout) != set(by_name):
        raise SystemExit(f"error: {label}: its layers are not the exporter's ({len(layout)} vs {len(by_name)})")
    suffixes = {frozenset(parts) for parts in layout.values()}
    if len(suffixes) != 1:
        raise SystemExit(f"error: {label}: layers differ in their keys: {sorted(map(sorted, suffixes))}")
    for name, parts in layout.items():
        layer = by_name[name]
        rank = parts.get("lora_down.weight", (0,))[0]
        for suffix, shape in parts.items():
            if shape != shape_rule(suffix, layer.out_features, layer.in_features, rank):
                raise SystemExit(f"error: {label}: {name}.{suffix} has shape {shape}")
    return set(next(iter(suffixes)))


def sdxl_tensor(suffix: str, layer) -> torch.Tensor:
    """A tensor of the shape the exporter writes for SDXL's `layer`: on the meta device, but for alpha (read with
    .item() by the clients), the exporter's alpha = rank."""
    if suffix == "alpha":
        return torch.tensor(float(SDXL_LORA_RANK))
    return torch.empty(shape_rule(suffix, layer.out_features, layer.in_features, SDXL_LORA_RANK), device="meta")


def build_files(work: str) -> ExportedFiles:
    from safetensors.torch import load_file, save_file

    from scripts.bench_export import make_waveft_adapter
    from waveft.export.request import ExportRequest
    from waveft.export.source import attach_source_adapter, read_source_adapter, unet_skeleton
    from waveft.export.writer import export_adapter
    from waveft.fixtures.tiny import SDXL_UNET_CONFIG, build_tiny_sdxl

    base = os.path.join(work, "tiny-sdxl")
    if not os.path.isdir(base):
        build_tiny_sdxl(base)
    adapter = os.path.join(work, "adapter")
    from diffusers import UNet2DConditionModel

    make_waveft_adapter(adapter, base, UNet2DConditionModel.from_pretrained(base, subfolder="unet"),
                        n_frequency=300, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    tiny_layers = attach_source_adapter(read_source_adapter(adapter), base)
    full_rank = min(min(x.out_features, x.in_features) for x in tiny_layers)
    tiny = {}
    for label, settings in TINY_EXPORTS.items():
        path = os.path.join(work, f"tiny_{label}.safetensors")
        settings = dict(settings, rank=full_rank) if "rank" in settings else settings
        export_adapter(ExportRequest(adapter=adapter, out=path, dtype="fp32", overwrite=True, **settings),
                       progress=False, say=lambda *_: None)
        tiny[label] = path

    sdxl_base = os.path.join(work, "sdxl")
    sdxl_unet = unet_skeleton(SDXL_UNET_CONFIG)
    sdxl_unet.save_config(os.path.join(sdxl_base, "unet"))
    sdxl_adapter = os.path.join(work, "sdxl-adapter")
    make_waveft_adapter(sdxl_adapter, sdxl_base, sdxl_unet, n_frequency=16,
                        target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    sdxl_layers = attach_source_adapter(read_source_adapter(sdxl_adapter), sdxl_base)
    sdxl = {}
    for label, fmt in (("lora", "lora-full-rank"), ("full-diff", "full-diff")):
        suffixes = check_layout(fmt, load_file(tiny[fmt]), tiny_layers)
        sdxl[label] = {f"{layer.kohya_name}.{suffix}": sdxl_tensor(suffix, layer) for layer in sdxl_layers
                       for suffix in sorted(suffixes)}
    lora_file = os.path.join(work, "sdxl_lora_zeros.safetensors")
    save_file({k: v if k.endswith(".alpha") else torch.zeros(v.shape, dtype=torch.float16)
               for k, v in sdxl["lora"].items()}, lora_file,
              metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    return ExportedFiles(base, adapter, tiny, sdxl, lora_file)


# How far each tiny file's applied weights may be from PEFT's merge, of the largest |dW|: a full-rank LoRA and a full
# difference are the difference itself; a LoRA cut at 100% energy drops only singular values lost to fp32 rounding
# (4.6e-04 measured), while a wrong alpha or scale is off by 1e-1 or more.
PEFT_TOLERANCE = {"lora-full-rank": ABSOLUTE_TOLERANCE, "full-diff": ABSOLUTE_TOLERANCE, "lora-energy-1.0": 1e-2}


@dataclass
class TinyReference:
    """The tiny UNet's Linear weights by module path: the base's, PEFT's merge of the adapter, the largest |dW|."""

    base: dict
    merged: dict
    scale: float

    @classmethod
    def build(cls, files: ExportedFiles) -> "TinyReference":
        from diffusers import UNet2DConditionModel

        from waveft.infer.pipeline import merge_adapter

        unet = UNet2DConditionModel.from_pretrained(files.tiny_base, subfolder="unet")
        base = {n: m.weight.detach().clone() for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear)}
        unet = merge_adapter(unet, files.tiny_adapter)
        merged = {n: m.weight.detach().clone() for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear)}
        return cls(base, merged, max(float((merged[n] - base[n]).abs().max()) for n in base))

    def from_file(self, state: dict) -> dict:
        """W + diff, or W + (alpha / rank) up @ down: the kohya / LyCORIS meaning of the file's keys."""
        from waveft.export.source import kohya_name

        weights = dict(self.base)
        for name, weight in self.base.items():
            key = kohya_name(name)
            if f"{key}.diff" in state:
                weights[name] = weight + state[f"{key}.diff"].float()
            elif f"{key}.lora_up.weight" in state:
                up, down = state[f"{key}.lora_up.weight"].float(), state[f"{key}.lora_down.weight"].float()
                weights[name] = weight + float(state[f"{key}.alpha"]) / down.shape[0] * (up @ down)
        return weights

    def error(self, weights: dict, reference: dict) -> float:
        return max(float((weights[n].detach().float() - reference[n]).abs().max()) for n in reference) / self.scale


# ---- putting a client on sys.path --------------------------------------------------------------------------------


def missing_packages(names, extra_path: str | None = None) -> list[str]:
    """Which of these top-level packages neither this interpreter nor `extra_path` has."""
    path = [extra_path, *sys.path] if extra_path else sys.path
    return [name for name in names if importlib.machinery.PathFinder.find_spec(name, path) is None]


def put_on_path(*folders) -> None:
    for folder in reversed(folders):
        sys.path.insert(0, os.path.abspath(folder))


# ---- InvokeAI ----------------------------------------------------------------------------------------------------


def check_invokeai(source: str, files: ExportedFiles, reference: "TinyReference") -> list[Row]:
    from waveft.fixtures.stand_ins import install_stand_ins

    put_on_path(source)
    install_stand_ins(INVOKEAI_STAND_INS)
    # layer_patcher first, as InvokeAI's app imports it (its patches and model-manager packages import each other)
    importlib.import_module("invokeai.backend.patches.layer_patcher")
    from diffusers import UNet2DConditionModel
    from invokeai.backend.model_manager.configs.factory import ModelConfigFactory
    from invokeai.backend.model_manager.configs.lora import _state_dict_looks_like_sdxl_unet_lora
    from invokeai.backend.model_manager.taxonomy import BaseModelType, ModelFormat, ModelType
    from invokeai.backend.model_manager.util.model_util import lora_token_vector_length
    from invokeai.backend.patches.layer_patcher import LayerPatcher
    from invokeai.backend.patches.lora_conversions.formats import flux_format_from_state_dict
    from invokeai.backend.patches.lora_conversions.sd_lora_conversion_utils import lora_model_from_sd_state_dict
    from invokeai.backend.patches.lora_conversions.sdxl_lora_conversion_utils import (
        convert_sdxl_keys_to_diffusers_format,
    )
    from safetensors.torch import load_file

    from waveft.export.source import unet_skeleton
    from waveft.fixtures.tiny import SDXL_UNET_CONFIG

    def load_patch(state):
        """What its LoRALoader does for a LoRA whose base is SDXL (model_loaders/lora.py)."""
        return lora_model_from_sd_state_dict(state_dict=convert_sdxl_keys_to_diffusers_format(state))

    def map_layers(row, state, patch, unet):
        """Its LayerPatcher's lookup of each layer (flattened kohya keys, prefix lora_unet_, as denoise_latents)
        and the parameters it would add, checked against the module's weight."""
        consumed = {}
        for layer_key, layer in patch.layers.items():
            keys = [k for k in state if k.split(".", 1)[0] == layer_key]
            try:
                _, module = LayerPatcher._get_submodule(unet, layer_key[len(SDXL_PREFIX):], layer_key_is_flattened=True)
                params = layer.get_parameters(dict(module.named_parameters(recurse=False)), weight=1.0)
            except Exception as exc:  # what its patcher would raise while generating, or log and skip
                row.problems.append(f"{layer_key}: {type(exc).__name__} {exc}")
                continue
            if set(params) != {"weight"} or tuple(params["weight"].shape) != tuple(module.weight.shape):
                row.problems.append(f"{layer_key}: adds {sorted(params)} of shape {tuple(params['weight'].shape)}")
                continue
            consumed.update(dict.fromkeys(keys))
        row.mapped = len(consumed)
        row.unmapped = [k for k in state if k not in consumed]

    def probe_sdxl(row, result):
        config = result.config
        if (config is None or config.type is not ModelType.LoRA or config.base is not BaseModelType.StableDiffusionXL
                or config.format is not ModelFormat.LyCORIS):
            row.problems.append(f"probed as {config and (config.type, config.base, config.format)}")

    rows = []
    for label, path in files.tiny.items():
        state = load_file(path)
        row = Row(f"tiny {label}", len(state))
        unet = UNet2DConditionModel.from_pretrained(files.tiny_base, subfolder="unet")
        patch = load_patch(dict(state))
        map_layers(row, state, patch, unet)
        if row.problems:  # its patcher would fail the same way
            rows.append(row)
            continue
        with LayerPatcher.apply_smart_model_patches(model=unet, patches=[(patch, 1.0)], prefix=SDXL_PREFIX,
                                                    dtype=torch.float32, force_direct_patching=True):
            patched = {n: m.weight.detach().clone() for n, m in unet.named_modules() if n in reference.base}
        row.check_weights(patched, reference, state, label)
        if reference.error({n: m.weight for n, m in unet.named_modules() if n in reference.base}, reference.base):
            row.problems.append("unpatching did not restore the base weights")
        rows.append(row)

    sdxl_unet = unet_skeleton(SDXL_UNET_CONFIG)
    for label, state in files.sdxl.items():
        row = Row(f"sdxl {label}", len(state))
        map_layers(row, state, load_patch(dict(state)), sdxl_unet)
        if label == "lora":
            probe_sdxl(row, ModelConfigFactory.from_model_on_disk(files.sdxl_lora_file, allow_unknown=False))
            row.file += " (probe: file)"
        else:  # the probe's own tests on the key shapes (LoRA_LyCORIS_Config_Base._get_base_or_raise)
            if not any(k.startswith(SDXL_PREFIX) for k in state):
                row.problems.append("no lora_unet_ key: not taken for a LoRA")
            if flux_format_from_state_dict(state, {}) is not None:
                row.problems.append("taken for a FLUX LoRA")
            length = lora_token_vector_length(state)
            if length != 2048 and not _state_dict_looks_like_sdxl_unet_lora(state):
                row.problems.append(f"token vector length {length}: not SDXL")
            row.file += " (probe: functions)"
        rows.append(row)
    return rows


# ---- Forge -------------------------------------------------------------------------------------------------------


def check_forge(source: str, files: ExportedFiles, reference: "TinyReference") -> list[Row]:
    from waveft.fixtures.stand_ins import command_line

    put_on_path(source, os.path.join(source, "repositories", "huggingface_guess"))
    with command_line("--always-cpu"):  # Forge's backend reads its command line when imported
        import huggingface_guess
        from backend.modules.k_model import KModel
        from backend.nn.unet import IntegratedUNet2DConditionModel
        from backend.patcher.base import ModelPatcher
        from backend.patcher.lora import load_lora, merge_lora_to_weight, model_lora_keys_unet
    from diffusers import EulerDiscreteScheduler
    from safetensors.torch import load_file

    from waveft.export.source import kohya_name, unet_skeleton
    from waveft.fixtures.tiny import SDXL_UNET_CONFIG

    def forge_sdxl_model():
        """Forge's SDXL model as its loader builds it from a checkpoint, on the meta device: huggingface_guess
        reads the checkpoint's (original-layout) keys and shapes, the UNet is built from the guessed config."""
        diffusers_unet = unet_skeleton(SDXL_UNET_CONFIG).state_dict()
        diffusers_layout = huggingface_guess.model_config_from_diffusers_unet(diffusers_unet)
        config = {k: v for k, v in diffusers_layout.unet_config.items() if k != "dtype"}
        with torch.device("meta"):
            checkpoint = IntegratedUNet2DConditionModel.from_config(config).state_dict()
        guess = huggingface_guess.guess({f"model.diffusion_model.{k}": v for k, v in checkpoint.items()})
        if type(guess).__name__ != "SDXL":
            raise SystemExit(f"error: huggingface_guess took SDXL's layout for {type(guess).__name__}")
        with torch.device("meta"):
            unet = IntegratedUNet2DConditionModel.from_config(guess.unet_config)
        unet._internal_dict = guess.unet_config  # as backend/loader.py does
        unet.storage_dtype = unet.computation_dtype = torch.float16
        scheduler = EulerDiscreteScheduler.from_pretrained(
            os.path.join(source, "backend", "huggingface", guess.huggingface_repo, "scheduler"))
        return KModel(unet, scheduler, config=guess)

    rows = []
    model = forge_sdxl_model()
    patcher = ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
    unet_keys = model_lora_keys_unet(model, {})
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for label, state in files.sdxl.items():
        row = Row(f"sdxl {label}", len(state))
        patches, unmatched = load_lora(dict(state), unet_keys)  # as extensions-builtin/sd_forge_lora/networks.py
        loaded = patcher.add_patches(filename=label, patches=patches, strength_patch=1.0)
        for target, (kind, values) in patches.items():
            weight = values[0] if kind == "diff" else values[0] @ values[1]
            if tuple(weight.shape) != shapes.get(target):
                row.problems.append(f"{target}: {kind} of shape {tuple(weight.shape)} for {shapes.get(target)}")
        if set(loaded) != set(patches):
            row.problems.append(f"{len(set(patches) - set(loaded))} patches skipped by add_patches")
        row.unmapped = sorted(unmatched)
        row.mapped = len(state) - len(unmatched)
        rows.append(row)

    tiny_keys = {kohya_name(name): f"{name}.weight" for name in reference.base}  # the tiny UNet, diffusers' layout
    for label, path in files.tiny.items():
        state = load_file(path)
        row = Row(f"tiny {label} (our key map)", len(state))
        patches, unmatched = load_lora(dict(state), tiny_keys)
        weights = dict(reference.base)
        for target, value in patches.items():  # as its LoraLoader.refresh, one patch at strength 1
            name = target.removesuffix(".weight")
            weights[name] = merge_lora_to_weight([[1.0, value, 1.0, None, None]], weights[name].clone(), target)
        row.unmapped = sorted(unmatched)
        row.mapped = len(state) - len(unmatched)
        row.check_weights(weights, reference, state, label)
        rows.append(row)
    return rows


# ---- main --------------------------------------------------------------------------------------------------------


def check_sources(invokeai: str | None, forge: str | None) -> None:
    for path, marker, name in ((invokeai, "invokeai/backend/patches/layer_patcher.py", "--invokeai"),
                               (forge, "backend/patcher/lora.py", "--forge"),
                               (forge and os.path.join(forge, "repositories", "huggingface_guess"),
                                "huggingface_guess/detection.py", "--forge (repositories/huggingface_guess)")):
        if path is not None and not os.path.isfile(os.path.join(path, marker)):
            raise SystemExit(f"error: {name} {path}: {marker} is not there")
    missing = missing_packages((INVOKEAI_PACKAGES if invokeai else ()) + (FORGE_PACKAGES if forge else ()))
    if missing:
        raise SystemExit(f"error: the clients' imports need {', '.join(sorted(set(missing)))}: install them in a "
                         f"separate venv that sees this one (see README, 'Checking InvokeAI and Forge')")


def main(argv_=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--invokeai", help="InvokeAI's source folder (holds invokeai/)")
    parser.add_argument("--forge", help="Forge's source folder (holds backend/, packages_3rdparty/)")
    parser.add_argument("--work", help="folder for the tiny model and the files (default: a temporary one)")
    args = parser.parse_args(argv_)
    if not (args.invokeai or args.forge):
        parser.error("name at least one client: --invokeai PATH, --forge PATH")
    check_sources(args.invokeai, args.forge)
    with contextlib.ExitStack() as stack:
        work = args.work or stack.enter_context(tempfile.TemporaryDirectory(prefix="client-loaders-"))
        files = build_files(work)
        reference = TinyReference.build(files)  # PEFT's merge, which every client's applied weights are held to
        tables = {}
        if args.invokeai:
            tables["InvokeAI"] = check_invokeai(args.invokeai, files, reference)
        if args.forge:
            tables["Forge"] = check_forge(args.forge, files, reference)
    for client, rows in tables.items():
        print_table(client, rows)
    failed = [f"{client} {row.file}" for client, rows in tables.items() for row in rows if not row.ok]
    print("\nresult: " + ("FAIL: " + ", ".join(failed) if failed else "every file loads in every client checked"))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
