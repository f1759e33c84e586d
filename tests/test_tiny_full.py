"""The full-size random SDXL (`python -m waveft.tiny DIR --size full`): exact SDXL base architecture, real
tokenizer size. Built on the meta device here (no memory); the rehearsal builds and trains the real folder."""
import inspect

import pytest
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from waveft.fixtures.tiny import (
    CLIP_MERGES,
    CLIP_VOCAB_SIZE,
    SDXL_TEXT_ENCODER_2_CONFIG,
    SDXL_TEXT_ENCODER_CONFIG,
    SDXL_UNET_CONFIG,
    SDXL_VAE_CONFIG,
    write_clip_tokenizer,
)


def parameters(module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(
    "name, build, expected",
    [
        # stabilityai/stable-diffusion-xl-base-1.0's published component sizes
        ("unet", lambda: UNet2DConditionModel(**SDXL_UNET_CONFIG), 2_567_463_684),
        ("vae", lambda: AutoencoderKL(**SDXL_VAE_CONFIG), 83_653_863),
        ("text_encoder", lambda: CLIPTextModel(CLIPTextConfig(**SDXL_TEXT_ENCODER_CONFIG)), 123_060_480),
        (
            "text_encoder_2",
            lambda: CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_ENCODER_2_CONFIG)),
            694_659_840,
        ),
    ],
)
def test_components_have_sdxl_base_sizes(name, build, expected):
    with init_empty_weights():
        assert parameters(build()) == expected, name


def test_unet_config_names_real_settings_and_has_560_projections():
    accepted = inspect.signature(UNet2DConditionModel.__init__).parameters
    assert set(SDXL_UNET_CONFIG) <= set(accepted)
    encoder, encoder_2 = SDXL_TEXT_ENCODER_CONFIG, SDXL_TEXT_ENCODER_2_CONFIG
    assert SDXL_UNET_CONFIG["cross_attention_dim"] == encoder["hidden_size"] + encoder_2["hidden_size"]
    time_ids = 6 * SDXL_UNET_CONFIG["addition_time_embed_dim"]
    assert SDXL_UNET_CONFIG["projection_class_embeddings_input_dim"] == time_ids + encoder_2["projection_dim"]
    with init_empty_weights():
        unet = UNet2DConditionModel(**SDXL_UNET_CONFIG)
    names = [n for n, _ in unet.named_modules() if n.endswith((".to_q", ".to_k", ".to_v", ".to_out.0"))]
    assert len(names) == 560


def test_tokenizers_have_clips_vocabulary_size_and_special_tokens(tmp_path):
    write_clip_tokenizer(str(tmp_path / "tok"), merges=CLIP_MERGES)
    write_clip_tokenizer(str(tmp_path / "tok2"), merges=CLIP_MERGES, pad_token="!")
    tokenizer, tokenizer_2 = (CLIPTokenizer.from_pretrained(str(tmp_path / n)) for n in ("tok", "tok2"))
    for tok in (tokenizer, tokenizer_2):
        assert len(tok) == CLIP_VOCAB_SIZE
        assert (tok.bos_token_id, tok.eos_token_id) == (49406, 49407)
        ids = tok("a photo of a dog", padding="max_length", max_length=77).input_ids
        assert len(ids) == 77 and ids[0] == 49406 and 49407 in ids
        assert max(ids) < CLIP_VOCAB_SIZE
    assert tokenizer.pad_token_id == 49407 and tokenizer_2.pad_token == "!" and tokenizer_2.pad_token_id == 0
