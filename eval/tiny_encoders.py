"""Tiny random DINO, DINOv2 and CLIP encoders for offline smoke tests: `python -m eval.tiny_encoders DIR`.

Writes DIR/dino (a ViTModel), DIR/dinov2 (a Dinov2Model) and DIR/clip (a CLIPModel with a locally built
byte-level CLIP tokenizer) as standard `from_pretrained` folders with their preprocessing configs, so that they
load through the same code as `facebook/dino-vits16`, `facebook/dinov2-base` and `openai/clip-vit-*`. Their
weights are random (seeded): the numbers they give test the plumbing, not the images, and each folder carries
a SMOKE_TEST_ENCODER.md marker that makes every table label them as smoke-test numbers.
"""
import argparse
from pathlib import Path

from eval.encoders import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, SMOKE_TEST_MARKER
from waveft.fixtures.tiny import tiny_text_encoder_config, write_clip_tokenizer
from waveft.io.files import atomic_directory

TINY_SEED = 0
TINY_IMAGE_SIZE = 32
_MARKER_TEXT = ("# Smoke-test encoder\n\nRandom weights from `python -m eval.tiny_encoders`. Scores computed with "
                "it check that the evaluation runs; they say nothing about image quality.\n")


def _tiny_vision_layers() -> dict:
    return dict(image_size=TINY_IMAGE_SIZE, patch_size=8, hidden_size=32, num_hidden_layers=2,
                num_attention_heads=2, intermediate_size=37)


def write_tiny_dino(path: Path) -> None:
    import torch
    from transformers import ViTConfig, ViTImageProcessorPil, ViTModel

    torch.manual_seed(TINY_SEED)
    ViTModel(ViTConfig(**_tiny_vision_layers()), add_pooling_layer=False).save_pretrained(path)
    ViTImageProcessorPil(size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}, resample=3,
                         image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD)).save_pretrained(path)
    (path / SMOKE_TEST_MARKER).write_text(_MARKER_TEXT)


def write_tiny_dinov2(path: Path) -> None:
    import torch
    from transformers import BitImageProcessorPil, Dinov2Config, Dinov2Model

    torch.manual_seed(TINY_SEED)
    Dinov2Model(Dinov2Config(**_tiny_vision_layers(), mlp_ratio=2)).save_pretrained(path)
    # DINOv2's recipe at the tiny size: short side 36, centre crop 32 (the real one: 256, 224).
    BitImageProcessorPil(size={"shortest_edge": TINY_IMAGE_SIZE + 4},
                         crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}, resample=3,
                         image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD)).save_pretrained(path)
    (path / SMOKE_TEST_MARKER).write_text(_MARKER_TEXT)


def write_tiny_clip(path: Path) -> None:
    import torch
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    torch.manual_seed(TINY_SEED)
    config = CLIPConfig(text_config=tiny_text_encoder_config().to_dict(), vision_config=_tiny_vision_layers(),
                        projection_dim=16)
    CLIPModel(config).save_pretrained(path)
    write_clip_tokenizer(str(path))
    CLIPImageProcessorPil(size={"shortest_edge": TINY_IMAGE_SIZE},
                          crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}, resample=3,
                          image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD)).save_pretrained(path)
    (path / SMOKE_TEST_MARKER).write_text(_MARKER_TEXT)


def write_tiny_encoders(folder: str | Path) -> None:
    """Write `folder/dino` (a DINO ViT), `folder/dinov2` and `folder/clip`, replacing them; each built beside
    `folder` and moved in when complete."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, write in (("dino", write_tiny_dino), ("dinov2", write_tiny_dinov2), ("clip", write_tiny_clip)):
        with atomic_directory(folder / name) as staging:
            write(Path(staging))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Write tiny random DINO, DINOv2 and CLIP encoders for smoke tests.")
    parser.add_argument("dir", help="output folder; DIR/dino, DIR/dinov2 and DIR/clip are replaced if they exist")
    args = parser.parse_args(argv)
    write_tiny_encoders(args.dir)
    names = ", ".join(str(Path(args.dir) / name) for name in ("dino", "dinov2", "clip"))
    print(f"wrote smoke-test encoders {names} (random weights)")


if __name__ == "__main__":
    main()
