"""Load SDXL's components (UNet, VAE, both text encoders and tokenizers, noise scheduler) from a Hub id or folder."""
import os
from dataclasses import dataclass

import torch

from waveft.errors import UserError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "no": torch.float32}


@dataclass
class SDXLComponents:
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    text_encoder_2: torch.nn.Module
    tokenizer: object
    tokenizer_2: object
    noise_scheduler: object

    def text_encoders_to(self, device, dtype=None) -> None:
        """Both text encoders move together: to the accelerator to encode, back to the CPU when idle."""
        for encoder in (self.text_encoder, self.text_encoder_2):
            encoder.to(device, dtype=dtype)


def _load(what: str, source: str, loader):
    try:
        return loader()
    except (OSError, ValueError) as exc:
        raise UserError(f"could not load the {what} from {source!r}: {str(exc).splitlines()[0]}") from None


def looks_like_path(name: str) -> bool:
    """A model named by a local path rather than a Hub id ("org/name"): a path that is missing is an error, not
    a download."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1


def load_sdxl(model_cfg) -> SDXLComponents:
    """Every component frozen, in fp32 except the VAE, which takes `model.vae_dtype`."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    if model_cfg.build_tiny_if_missing:
        from waveft.fixtures.tiny import ensure_tiny_sdxl

        ensure_tiny_sdxl(model_cfg.pretrained)
    base = model_cfg.pretrained
    if looks_like_path(base) and not os.path.isdir(base):
        raise UserError(f"model.pretrained: folder not found: {base} (give a local diffusers folder or a Hub id)")
    common = dict(revision=model_cfg.revision)
    weights = dict(common, variant=model_cfg.variant)
    components = SDXLComponents(
        tokenizer=_load("tokenizer", base,
                        lambda: AutoTokenizer.from_pretrained(base, subfolder="tokenizer", **common)),
        tokenizer_2=_load(
            "tokenizer_2", base, lambda: AutoTokenizer.from_pretrained(base, subfolder="tokenizer_2", **common)
        ),
        text_encoder=_load(
            "text_encoder", base, lambda: CLIPTextModel.from_pretrained(base, subfolder="text_encoder", **weights)
        ),
        text_encoder_2=_load(
            "text_encoder_2",
            base,
            lambda: CLIPTextModelWithProjection.from_pretrained(base, subfolder="text_encoder_2", **weights),
        ),
        unet=_load("unet", base, lambda: UNet2DConditionModel.from_pretrained(base, subfolder="unet", **weights)),
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
    if components.vae.dtype != DTYPES[model_cfg.vae_dtype]:
        components.vae.to(dtype=DTYPES[model_cfg.vae_dtype])
    return components


def _load_vae(model_cfg):
    from diffusers import AutoencoderKL

    if model_cfg.vae is None:
        base = model_cfg.pretrained
        return _load(
            "vae",
            base,
            lambda: AutoencoderKL.from_pretrained(
                base, subfolder="vae", revision=model_cfg.revision, variant=model_cfg.variant
            ),
        )
    return _load("vae", model_cfg.vae, lambda: AutoencoderKL.from_pretrained(model_cfg.vae))
