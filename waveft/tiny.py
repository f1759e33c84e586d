"""A built-in tiny SDXL with random weights, written as a standard diffusers pipeline folder.

`python -m waveft.tiny DIR` writes model_index.json, unet, vae, text_encoder(_2), tokenizer(_2) and scheduler,
so `StableDiffusionXLPipeline.from_pretrained(DIR)` and the trainer's loading code treat it like real SDXL.
The UNet keeps SDXL's structure (text-time conditioning, two text encoders whose hidden states are
concatenated, self and cross attention with to_q/to_k/to_v/to_out.0) at toy widths.
"""
import argparse
import json
import os
import shutil

import torch

from waveft.files import atomic_directory

TINY_SEED = 0
CLIP_SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")


def _bytes_to_unicode() -> list[str]:
    """CLIP's byte-level alphabet: one printable unicode character per byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for byte in range(256):
        if byte in printable:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def write_tiny_clip_tokenizer(path: str) -> None:
    """Write a CLIP BPE tokenizer (vocab.json + merges.txt) built locally: every byte is a token, no merges."""
    from transformers import CLIPTokenizer

    alphabet = _bytes_to_unicode()
    tokens = alphabet + [c + "</w>" for c in alphabet] + list(CLIP_SPECIAL_TOKENS)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "vocab.json"), "w") as f:
        json.dump({tok: i for i, tok in enumerate(tokens)}, f)
    with open(os.path.join(path, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    tokenizer = CLIPTokenizer(
        vocab=os.path.join(path, "vocab.json"), merges=os.path.join(path, "merges.txt"), model_max_length=77
    )
    tokenizer.save_pretrained(path)


TINY_VOCAB_SIZE = 2 * 256 + len(CLIP_SPECIAL_TOKENS)


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


def build_tiny_sdxl(path: str) -> None:
    """Write the tiny SDXL pipeline folder at `path`, replacing it whole."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(TINY_SEED)
    unet = UNet2DConditionModel(**tiny_unet_config())
    vae = AutoencoderKL(
        block_out_channels=(16, 32),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    )
    text_encoder = CLIPTextModel(tiny_text_encoder_config())
    text_encoder_2 = CLIPTextModelWithProjection(tiny_text_encoder_config())
    # SDXL base's scheduler settings.
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )
    with atomic_directory(path) as staging:
        write_tiny_clip_tokenizer(os.path.join(staging, "tokenizer_src"))
        tokenizer = CLIPTokenizer.from_pretrained(os.path.join(staging, "tokenizer_src"))
        shutil.rmtree(os.path.join(staging, "tokenizer_src"))
        pipe = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer,
            unet=unet,
            scheduler=scheduler,
        )
        pipe.save_pretrained(staging)


def ensure_tiny_sdxl(path: str) -> None:
    """Build the tiny SDXL at `path` unless a pipeline folder is already there."""
    if not os.path.isfile(os.path.join(path, "model_index.json")):
        build_tiny_sdxl(path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Write a tiny random-weight SDXL pipeline folder.")
    parser.add_argument("dir", help="output folder (replaced if it exists)")
    args = parser.parse_args(argv)
    build_tiny_sdxl(args.dir)
    print(f"wrote tiny SDXL pipeline to {args.dir}")


if __name__ == "__main__":
    main()
