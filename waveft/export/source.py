"""The adapter being exported: its folder read and checked, and its layers attached to a weightless UNet of the base
model (and, for the text encoders' adapters in its subfolders, to weightless CLIP encoders), so that each layer's
dense difference can be built one at a time."""
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Optional

import torch

from waveft.adapters.methods import METHODS
from waveft.errors import UserError
from waveft.hub import check_model_source
from waveft.io.adapter_folder import PEFT_MODEL_PREFIX, AdapterFolder, load_adapter_weights

KOHYA_UNET_PREFIX = "lora_unet_"
# kohya's, ComfyUI's and A1111's names of SDXL's two CLIP encoders (ComfyUI's `model_lora_keys_clip`).
KOHYA_TEXT_ENCODER_PREFIXES = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
UNET = "unet"


def exportable_peft_types() -> dict[str, str]:
    """PEFT types whose layers are additive (W' = W + get_delta_weight()), to the `adapter.type` they come from:
    the methods that declare themselves additive (waveft.adapters.methods)."""
    return {m.peft_type: m.name for m in METHODS.values() if m.additive}


# Why the PEFT methods a user is most likely to bring cannot export; the rest get the generic reason.
NOT_ADDITIVE = {
    "IA3": "IA3 scales activations, it adds no weight difference",
    "OFT": "OFT multiplies the weight by a learned rotation: its change depends on the base weights",
    "BOFT": "BOFT multiplies the weight by a learned rotation: its change depends on the base weights",
    "LN_TUNING": "LN tuning replaces norm layers, it adds no weight difference to the adapted layers",
}


def kohya_name(module_path: str, model: str = UNET) -> str:
    """`down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0` -> `lora_unet_down_blocks_1_..._to_out_0`;
    a text encoder's (`model` in KOHYA_TEXT_ENCODER_PREFIXES) `text_model.encoder.layers.0.self_attn.q_proj` ->
    `lora_te1_text_model_encoder_layers_0_self_attn_q_proj`. transformers 5's CLIPTextModel has no `text_model`
    level of its own (its paths start at `encoder.`): kohya's names have it, so it is put back."""
    if model == UNET:
        return KOHYA_UNET_PREFIX + module_path.replace(".", "_")
    if not module_path.startswith("text_model."):
        module_path = "text_model." + module_path
    return KOHYA_TEXT_ENCODER_PREFIXES[model] + module_path.replace(".", "_")


@dataclass
class SourceAdapter:
    path: str
    peft_config: dict  # adapter_config.json
    run_info: dict  # waveft_run.json ({} for an adapter this project's trainer did not write)
    weights_sha256: str  # of adapter_model.safetensors, the file's bytes
    # The text encoders' adapters (AdapterFolder.text_encoder_adapters()), each read like the UNet's (run_info {}).
    text_encoders: dict[str, "SourceAdapter"] = field(default_factory=dict)

    @property
    def peft_type(self) -> str:
        return str(self.peft_config.get("peft_type", "?"))

    @property
    def method(self) -> str:
        return self.run_info.get("method") or exportable_peft_types().get(self.peft_type, self.peft_type.lower())


def read_source_adapter(path: str) -> SourceAdapter:
    """The adapter folder's config, run record and weights hash, and its text encoders' adapters; `path` may be
    a training run's folder (its adapter/); a folder that is no adapter is a UserError."""
    folder = AdapterFolder.find(path)
    source = _read_peft_folder(folder, folder.read_run_record)
    source.text_encoders = {name: _read_peft_folder(part, dict)
                            for name, part in folder.text_encoder_adapters().items()}
    return source


def _read_peft_folder(folder: AdapterFolder, read_run_record) -> SourceAdapter:
    path = folder.root
    for needed in (folder.config, folder.weights):
        if not os.path.isfile(needed):
            raise UserError(f"--adapter {path} is not an adapter folder: {os.path.basename(needed)} is missing")
    try:
        with open(folder.config) as f:
            peft_config = json.load(f)
        run_info = read_run_record()
    except json.JSONDecodeError as exc:
        raise UserError(f"--adapter {path}: not valid JSON ({exc})") from None
    folder.check_weights()
    digest = hashlib.sha256()
    with open(folder.weights, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return SourceAdapter(path, peft_config, run_info, digest.hexdigest())


def check_exportable(source: SourceAdapter) -> None:
    """Refuse, with the reason, an adapter (or a text encoder's) whose change of the weights is not a difference
    the file can hold."""
    for part in (source, *source.text_encoders.values()):
        _check_part_exportable(part)


def _check_part_exportable(source: SourceAdapter) -> None:
    peft_type = source.peft_type
    exportable = exportable_peft_types()
    if peft_type not in exportable:
        reason = NOT_ADDITIVE.get(peft_type, f"{peft_type} is not one of the additive methods this export knows")
        raise UserError(
            f"{source.path}: a {peft_type} adapter cannot be exported: {reason} "
            f"(exportable: {', '.join(sorted(set(exportable.values())))})"
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
    check_model_source(base, "the base model")
    from diffusers import UNet2DConditionModel

    errors = []
    for subfolder in ("unet", None):
        try:
            return dict(UNet2DConditionModel.load_config(base, subfolder=subfolder))
        except (OSError, ValueError) as exc:
            errors.append(str(exc).splitlines()[0])
    raise UserError(f"could not read the UNet config of the base model {base!r}: {errors[0]}")


def read_text_encoder_config(base: str, component: str):
    """The transformers config of one SDXL text encoder (`component`: its subfolder) of a diffusers pipeline folder
    or Hub id (no weights are read)."""
    check_model_source(base, "the base model")
    from transformers import CLIPTextConfig

    try:
        return CLIPTextConfig.from_pretrained(base, subfolder=component)
    except (OSError, ValueError) as exc:
        raise UserError(f"could not read the {component} config of the base model {base!r}: "
                        f"{str(exc).splitlines()[0]}") from None


def unet_skeleton(config: dict) -> torch.nn.Module:
    """The UNet on the meta device, except that every Linear weight is a zero of stride 0 on the CPU (4 bytes):
    PEFT then creates the adapter's tensors on the CPU, and only shapes are ever read from the base weights."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    return _weightless_linears(unet)


def text_encoder_skeleton(config, component: str) -> torch.nn.Module:
    """A text encoder (`component` in waveft.models.TEXT_ENCODER_CLASSES) built as `unet_skeleton` builds the
    UNet."""
    from waveft.models import text_encoder_class

    with torch.device("meta"):
        encoder = text_encoder_class(component)(config)
    return _weightless_linears(encoder)


def _weightless_linears(model: torch.nn.Module) -> torch.nn.Module:
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            zero = torch.zeros((), dtype=torch.float32).expand(module.out_features, module.in_features)
            module.weight = torch.nn.Parameter(zero, requires_grad=False)
    return model.requires_grad_(False).eval()


@dataclass
class ExportLayer:
    name: str  # module path in its model (diffusers' UNet, transformers' CLIP encoder)
    module: torch.nn.Module  # the adapter's PEFT layer
    out_features: int
    in_features: int
    model: str = UNET  # or a text encoder's component name (KOHYA_TEXT_ENCODER_PREFIXES)

    @property
    def kohya_name(self) -> str:
        return kohya_name(self.name, self.model)


def attach_source_adapter(source: SourceAdapter, base: str, adapter_name: str = "default") -> list[ExportLayer]:
    """The adapter's layers on a weightless UNet of `base`, then its text encoders' on weightless encoders of
    `base`, with the saved weights loaded, checked to fit."""
    unet = unet_skeleton(read_unet_config(base))
    check_recorded_shapes(source, unet, base)
    layers = _attach(source, unet, UNET, base, adapter_name)
    for component, part in source.text_encoders.items():
        encoder = text_encoder_skeleton(read_text_encoder_config(base, component), component)
        check_recorded_shapes(source, encoder, base, component)
        layers += _attach(part, encoder, component, base, adapter_name)
    return layers


def _attach(source: SourceAdapter, model, model_name: str, base: str, adapter_name: str) -> list[ExportLayer]:
    from peft import PeftConfig
    from peft.tuners.tuners_utils import BaseTunerLayer

    from waveft.adapters.attach import inject_adapter
    from waveft.adapters.structured_waveft import enable_structured_waveft

    peft_config = PeftConfig.from_pretrained(source.path)
    peft_config.inference_mode = True
    try:
        inject_adapter(model, peft_config, adapter_name)
    except ValueError as exc:
        raise UserError(f"{source.path} could not be attached to {base}'s {model_name}: "
                        f"{str(exc).splitlines()[0]}") from None
    check_saved_shapes(source, model, base, adapter_name)
    load_adapter_weights(model, source.path, adapter_name)
    enable_structured_waveft(model)  # our WaveFT layer builds the difference for wavelets PEFT's layer cannot run
    layers = []
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            if not isinstance(module.get_base_layer(), torch.nn.Linear):
                raise UserError(f"{source.path}: layer {name} is a {type(module.get_base_layer()).__name__}; "
                                f"only Linear layers export")
            layers.append(ExportLayer(name, module, module.out_features, module.in_features, model_name))
    return layers


def check_recorded_shapes(source: SourceAdapter, model, base: str, model_name: str = UNET) -> None:
    """The trainer records each adapted layer's shape (waveft_run.json `layer_shapes`, and each text encoder's in
    `text_encoders.<component>.layer_shapes`); each must be the base's. For methods whose saved tensors do not
    depend on the layer shape (WaveFT, FourierFT, SHiRA) this is the only way to tell that an adapter was
    trained on another model."""
    record = source.run_info if model_name == UNET else source.run_info.get("text_encoders", {}).get(model_name, {})
    modules = dict(model.named_modules())
    for name, (out_features, in_features) in record.get("layer_shapes", {}).items():
        module = modules.get(name)
        if module is None:
            raise UserError(f"{source.path}: adapted layer {name} ({out_features}x{in_features}) is not in the "
                            f"{model_name} of the base model {base}")
        if (module.out_features, module.in_features) != (out_features, in_features):
            raise UserError(f"{source.path}: {model_name} layer {name} is {out_features}x{in_features} in the "
                            f"adapter but {module.out_features}x{module.in_features} in the base model {base}")


def check_saved_shapes(source: SourceAdapter, model, base: str, adapter_name: str) -> None:
    """Every saved tensor must be one the base model's layers take, of the shape they take."""
    from peft import get_peft_model_state_dict
    from peft.tuners.tuners_utils import BaseTunerLayer
    from safetensors import safe_open

    expected = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(model, adapter_name=adapter_name).items()}
    tuner_layers = {n: m for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)}
    with safe_open(AdapterFolder(source.path).weights, framework="pt") as f:
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
