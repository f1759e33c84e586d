"""Load SDXL's components (UNet, VAE, both text encoders and tokenizers, noise scheduler) from a Hub id or folder."""
import sys
from dataclasses import dataclass

import torch

from waveft.errors import UserError
from waveft.hub import check_model_sources

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "no": torch.float32}
# SDXL's two CLIP text encoders: their diffusers component names and transformers classes.
TEXT_ENCODER_CLASSES = {"text_encoder": "CLIPTextModel", "text_encoder_2": "CLIPTextModelWithProjection"}


def text_encoder_class(component: str):
    """The transformers class of SDXL's text encoder `component` (a key of TEXT_ENCODER_CLASSES)."""
    import transformers

    return getattr(transformers, TEXT_ENCODER_CLASSES[component])


@dataclass
class SDXLComponents:
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    text_encoder_2: torch.nn.Module
    tokenizer: object
    tokenizer_2: object
    noise_scheduler: object

    def text_encoders_to(self, device) -> None:
        """Both text encoders move together: to the accelerator to encode, back to the CPU when idle."""
        for encoder in (self.text_encoder, self.text_encoder_2):
            encoder.to(device)


def _load(what: str, source: str, loader):
    try:
        return loader()
    except (OSError, ValueError) as exc:
        raise UserError(f"could not load the {what} from {source!r}: {str(exc).splitlines()[0]}") from None


def load_sdxl(model_cfg, weight_dtype: torch.dtype = torch.float32) -> SDXLComponents:
    """Every component frozen and read from disk directly in the precision it runs in: the UNet and both text
    encoders in `weight_dtype` (the run's compute dtype; never an fp32 copy on the way in a bf16 or fp16 run),
    the VAE in `model.vae_dtype`. With `model.quantize`, the UNet's Linear layers are then quantized
    (`quantize_linear_layers`)."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer

    check_model_sources(model_cfg)
    if model_cfg.builds_tiny_model():
        from waveft.fixtures.tiny import ensure_tiny_sdxl

        ensure_tiny_sdxl(model_cfg.pretrained)
    base = model_cfg.pretrained
    common = dict(revision=model_cfg.revision)
    weights = dict(common, variant=model_cfg.variant, dtype=weight_dtype)
    components = SDXLComponents(
        # The UNet first, alone: its checkpoint's pages (mapped while it converts) are released before the text
        # encoders load, so the peak is the UNet's own (full-size fp32: the text encoders would add 2.5 GB).
        unet=_load("unet", base, lambda: UNet2DConditionModel.from_pretrained(base, subfolder="unet", **weights)),
        tokenizer=_load("tokenizer", base,
                        lambda: AutoTokenizer.from_pretrained(base, subfolder="tokenizer", **common)),
        tokenizer_2=_load(
            "tokenizer_2", base, lambda: AutoTokenizer.from_pretrained(base, subfolder="tokenizer_2", **common)
        ),
        text_encoder=_load("text_encoder", base, lambda: text_encoder_class("text_encoder").from_pretrained(
            base, subfolder="text_encoder", **weights)),
        text_encoder_2=_load("text_encoder_2", base, lambda: text_encoder_class("text_encoder_2").from_pretrained(
            base, subfolder="text_encoder_2", **weights)),
        vae=_load_vae(model_cfg),
        noise_scheduler=_load(
            "scheduler", base, lambda: DDPMScheduler.from_pretrained(base, subfolder="scheduler", **common)
        ),
    )
    if model_cfg.prediction_type is not None:
        components.noise_scheduler.register_to_config(prediction_type=model_cfg.prediction_type)
    for module in (components.unet, components.vae, components.text_encoder, components.text_encoder_2):
        module.requires_grad_(False)
        module.eval()
    if model_cfg.quantize != "none":
        quantize_linear_layers(components.unet, model_cfg.quantize, weight_dtype)
    return components


def _load_vae(model_cfg):
    from diffusers import AutoencoderKL

    dtype = DTYPES[model_cfg.vae_dtype]
    if model_cfg.vae is None:
        base = model_cfg.pretrained
        return _load(
            "vae",
            base,
            lambda: AutoencoderKL.from_pretrained(
                base, subfolder="vae", revision=model_cfg.revision, variant=model_cfg.variant, dtype=dtype
            ),
        )
    return _load("vae", model_cfg.vae, lambda: AutoencoderKL.from_pretrained(model_cfg.vae, dtype=dtype))


def quantize_linear_layers(model: torch.nn.Module, kind: str, compute_dtype: torch.dtype) -> int:
    """Replace every quantizable `nn.Linear` of `model` by bitsandbytes' quantized layer, in place, one layer at
    a time (so the peak is the model plus one layer): `nf4` (4-bit NormalFloat, `Linear4bit`, blocks of 64 with
    compressed statistics: ~0.53 bytes per weight) or `int8` (`Linear8bitLt`, row-wise absmax: ~1 byte per
    weight). Matmuls run in `compute_dtype`. Biases stay as they are. Sets the flags PEFT reads
    (`is_loaded_in_4bit` / `is_loaded_in_8bit`) so LoRA attaches its bitsandbytes layers. Returns the number
    of layers quantized."""
    import bitsandbytes as bnb

    device = next(model.parameters()).device
    linears = [(name, module) for name, module in model.named_modules() if is_quantizable(module, kind)]
    for name, linear in linears:
        has_bias = linear.bias is not None
        if kind == "nf4":
            quantized = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias,
                                          compute_dtype=compute_dtype, quant_type="nf4", device="meta")
            quantized.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type="nf4",
                                                 compress_statistics=True)
        else:
            quantized = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias,
                                            has_fp16_weights=False, device="meta")
            quantized.weight = bnb.nn.Int8Params(linear.weight.data, requires_grad=False, has_fp16_weights=False)
        if has_bias:
            quantized.bias = torch.nn.Parameter(linear.bias.data, requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, quantized.to(device))  # .to() quantizes
    setattr(model, "is_loaded_in_4bit" if kind == "nf4" else "is_loaded_in_8bit", True)
    return len(linears)


NF4_BLOCK = 64  # weights per bitsandbytes nf4 block


def is_quantizable(module: torch.nn.Module, kind: str) -> bool:
    """A plain Linear layer that bitsandbytes can run quantized. In nf4 its input size must be a multiple of the
    block (bitsandbytes' CPU inference kernel repacks weights by blocks per row); all of SDXL's are, the tiny
    model's 32-wide embeddings are not and stay as they are."""
    return type(module) is torch.nn.Linear and (kind != "nf4" or module.in_features % NF4_BLOCK == 0)


def is_linear_layer(module: torch.nn.Module) -> bool:
    """A plain `nn.Linear` (not a subclass such as a PEFT layer) or one `quantize_linear_layers` made."""
    if type(module) is torch.nn.Linear:
        return True
    bnb = sys.modules.get("bitsandbytes")  # loaded if anything was quantized
    return bnb is not None and isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def is_quantized(model: torch.nn.Module) -> bool:
    """Whether `quantize_linear_layers` quantized `model`."""
    return getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)


def encode_token_ids(encoders: list, ids: list, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Both encoders' hidden states concatenated, (prompts, 77, hidden 1 + hidden 2), plus encoder 2's pooled
    projection, (prompts, projection), from each encoder's token ids. Gradients flow where the encoders have
    trainable parameters and grad mode is on."""
    hidden_states = []
    for index, (encoder, token_ids) in enumerate(zip(encoders, ids, strict=True)):
        output = encoder(token_ids, output_hidden_states=True)
        use_last = mode == "paper" and index == 0  # the paper's training quirk: encoder 1's last_hidden_state
        hidden_states.append(output.last_hidden_state if use_last else output.hidden_states[-2])
        pooled = output[0]  # text_encoder_2's projected pooled embedding (kept from the last encoder)
    return torch.cat(hidden_states, dim=-1), pooled
