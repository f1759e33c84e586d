"""Random-weight SDXL pipelines, written as standard diffusers pipeline folders (nothing is downloaded).

`python -m waveft.tiny DIR [--size tiny|full]` writes model_index.json, unet, vae, text_encoder(_2),
tokenizer(_2) and scheduler, so `StableDiffusionXLPipeline.from_pretrained(DIR)` and the trainer's loading
code treat it like real SDXL.

- `tiny` (default): SDXL's structure (text-time conditioning, two text encoders whose hidden states are
  concatenated, self and cross attention with to_q/to_k/to_v/to_out.0) at toy widths; seconds to build.
- `full`: the exact component configurations of stabilityai/stable-diffusion-xl-base-1.0 (2.57 B-parameter
  UNet, VAE, CLIP ViT-L and OpenCLIP bigG text encoders, tokenizers with CLIP's 49,408-token vocabulary),
  built directly in fp16 and saved as fp16 safetensors (6.9 GB on disk, about 7 GB of memory to build).
"""
import argparse
import itertools
import json
import os
import shutil

import torch

from waveft.files import atomic_directory

TINY_SEED = 0
CLIP_SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")


def _bytes_to_unicode() -> list[str]:
    """CLIP's byte-level alphabet in CLIP's vocabulary order: printable bytes as themselves ("!" is id 0),
    then every other byte as a printable stand-in (chr(256), chr(257), ...)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    others = [byte for byte in range(256) if byte not in printable]
    return [chr(byte) for byte in printable] + [chr(256 + i) for i in range(len(others))]


def write_clip_tokenizer(path: str, merges: int = 0, pad_token: str = "<|endoftext|>") -> None:
    """Write a CLIP BPE tokenizer (vocab.json + merges.txt) built locally: every byte is a token (and every
    byte closing a word), then `merges` merges of two byte tokens, then CLIP's special tokens last, as in
    CLIP's vocabulary. `merges=CLIP_MERGES` gives CLIP's 49,408 ids (its merges are made up, not CLIP's)."""
    from transformers import CLIPTokenizer

    alphabet = _bytes_to_unicode()
    pairs = list(itertools.islice(itertools.product(alphabet, alphabet), merges))
    tokens = alphabet + [c + "</w>" for c in alphabet] + [a + b for a, b in pairs] + list(CLIP_SPECIAL_TOKENS)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "vocab.json"), "w") as f:
        json.dump({tok: i for i, tok in enumerate(tokens)}, f)
    with open(os.path.join(path, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in pairs))
    tokenizer = CLIPTokenizer(
        vocab=os.path.join(path, "vocab.json"),
        merges=os.path.join(path, "merges.txt"),
        model_max_length=77,
        pad_token=pad_token,
    )
    tokenizer.save_pretrained(path)


TINY_VOCAB_SIZE = 2 * 256 + len(CLIP_SPECIAL_TOKENS)
CLIP_VOCAB_SIZE = 49408
CLIP_MERGES = CLIP_VOCAB_SIZE - TINY_VOCAB_SIZE


def tiny_text_encoder_config(projection_dim: int = 32):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=TINY_VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=3,
        max_position_embeddings=77,
        projection_dim=projection_dim,
        hidden_act="gelu",
        bos_token_id=TINY_VOCAB_SIZE - 2,
        eos_token_id=TINY_VOCAB_SIZE - 1,
        pad_token_id=TINY_VOCAB_SIZE - 1,
    )


def tiny_unet_config() -> dict:
    """SDXL's UNet layout at toy widths: same block types, text-time embedding and attention projections."""
    return dict(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
        cross_attention_dim=64,  # text_encoder hidden 32 + text_encoder_2 hidden 32, as SDXL's 768 + 1280
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,  # six time ids + pooled text_encoder_2 projection
        norm_num_groups=16,
    )


# stabilityai/stable-diffusion-xl-base-1.0: unet/config.json (settings that differ from diffusers' defaults).
SDXL_UNET_CONFIG = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,  # text_encoder hidden 768 + text_encoder_2 hidden 1280
    addition_embed_type="text_time",
    addition_embed_type_num_heads=64,
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,  # six time ids x 256 + pooled text_encoder_2 projection 1280
    use_linear_projection=True,
    flip_sin_to_cos=True,
    freq_shift=0,
    norm_num_groups=32,
    norm_eps=1e-5,
    act_fn="silu",
)
# vae/config.json
SDXL_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=1024,
    scaling_factor=0.13025,
    force_upcast=True,
)
# text_encoder/config.json (CLIP ViT-L/14) and text_encoder_2/config.json (OpenCLIP ViT-bigG/14), with the
# token ids those files carry (bos 0, eos 2, pad 1: CLIP's eos pooling then takes the highest id, 49407).
_SDXL_TEXT_COMMON = dict(
    vocab_size=CLIP_VOCAB_SIZE, max_position_embeddings=77, layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=2,
    pad_token_id=1, attention_dropout=0.0, dropout=0.0, initializer_range=0.02, initializer_factor=1.0,
)  # fmt: skip
SDXL_TEXT_ENCODER_CONFIG = dict(
    _SDXL_TEXT_COMMON, hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
    projection_dim=768, hidden_act="quick_gelu",
)  # fmt: skip
SDXL_TEXT_ENCODER_2_CONFIG = dict(
    _SDXL_TEXT_COMMON, hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
    projection_dim=1280, hidden_act="gelu",
)  # fmt: skip
# scheduler/scheduler_config.json (both sizes)
SDXL_SCHEDULER_CONFIG = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    steps_offset=1,
    timestep_spacing="leading",
    prediction_type="epsilon",
    interpolation_type="linear",
    use_karras_sigmas=False,
)
SIZES = ("tiny", "full")


def materialise(model: torch.nn.Module, dtype: torch.dtype = torch.float16, device="cpu") -> torch.nn.Module:
    """Random weights for a model built on the meta device, one module at a time: each module's parameters
    are initialised in fp32 by its own `reset_parameters` and cast to `dtype` at once, so at most one module's
    weights ever exist in fp32 (random initialisation directly in fp16 is ten times slower on CPU)."""
    for module in model.modules():
        if next(module.parameters(recurse=False), None) is None:
            continue
        module.to_empty(device=device, recurse=False)
        module.reset_parameters()
        for name, param in list(module.named_parameters(recurse=False)):
            module._parameters[name] = torch.nn.Parameter(param.detach().to(dtype), requires_grad=param.requires_grad)
    return model


TINY_VAE_CONFIG = dict(
    block_out_channels=(16, 32),
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=64,
)


def _tiny_components() -> dict:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    vae = AutoencoderKL(**TINY_VAE_CONFIG)
    return dict(
        unet=UNet2DConditionModel(**tiny_unet_config()),
        vae=vae,
        text_encoder=CLIPTextModel(tiny_text_encoder_config()),
        text_encoder_2=CLIPTextModelWithProjection(tiny_text_encoder_config()),
    )


def _full_components() -> dict:
    """SDXL base's four networks with random fp16 weights, never materialised in fp32 (buffers, such as the
    text encoders' position ids, are built for real)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with init_empty_weights():
        components = dict(
            unet=UNet2DConditionModel(**SDXL_UNET_CONFIG),
            vae=AutoencoderKL(**SDXL_VAE_CONFIG),
            text_encoder=CLIPTextModel(CLIPTextConfig(**SDXL_TEXT_ENCODER_CONFIG)),
            text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_ENCODER_2_CONFIG)),
        )
    return {name: materialise(model) for name, model in components.items()}


def build_sdxl(path: str, size: str = "tiny") -> None:
    """Write a random-weight SDXL pipeline folder of `size` ('tiny' or 'full') at `path`, replacing it whole."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    torch.manual_seed(TINY_SEED)
    components = _tiny_components() if size == "tiny" else _full_components()
    merges = 0 if size == "tiny" else CLIP_MERGES
    with atomic_directory(path) as staging:
        tokenizers = []
        # SDXL's second tokenizer pads with "!" (id 0); the tiny model keeps one tokenizer for both.
        for name, pad in (("tokenizer_src", "<|endoftext|>"), ("tokenizer_2_src", "!" if size == "full" else None)):
            if pad is None:
                tokenizers.append(tokenizers[0])
                continue
            write_clip_tokenizer(os.path.join(staging, name), merges=merges, pad_token=pad)
            tokenizers.append(CLIPTokenizer.from_pretrained(os.path.join(staging, name)))
            shutil.rmtree(os.path.join(staging, name))
        pipe = StableDiffusionXLPipeline(
            **components,
            tokenizer=tokenizers[0],
            tokenizer_2=tokenizers[1],
            scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER_CONFIG),
        )
        pipe.save_pretrained(staging)


def build_tiny_sdxl(path: str) -> None:
    """Write the tiny SDXL pipeline folder at `path`, replacing it whole."""
    build_sdxl(path, "tiny")


def ensure_tiny_sdxl(path: str) -> None:
    """Build the tiny SDXL at `path` unless a pipeline folder is already there."""
    if not os.path.isfile(os.path.join(path, "model_index.json")):
        build_tiny_sdxl(path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Write a random-weight SDXL pipeline folder (no download).")
    parser.add_argument("dir", help="output folder (replaced if it exists)")
    parser.add_argument(
        "--size", choices=SIZES, default="tiny",
        help="tiny: toy widths (default); full: stabilityai/stable-diffusion-xl-base-1.0's exact configs, fp16",
    )  # fmt: skip
    args = parser.parse_args(argv)
    build_sdxl(args.dir, args.size)
    print(f"wrote {args.size} SDXL pipeline to {args.dir}")


if __name__ == "__main__":
    main()
