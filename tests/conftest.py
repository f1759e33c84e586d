"""Shared fixtures: the built-in tiny SDXL and a synthetic subject, built once per test session."""
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory) -> str:
    from waveft.tiny import build_tiny_sdxl

    path = str(tmp_path_factory.mktemp("models") / "tiny-sdxl")
    build_tiny_sdxl(path)
    return path


@pytest.fixture(scope="session")
def subject_dir(tmp_path_factory) -> str:
    from waveft.data import write_synthetic_subject

    path = str(tmp_path_factory.mktemp("data") / "toy_ball")
    write_synthetic_subject(path)
    return path


def tiny_unet():
    """The tiny SDXL UNet with fixed random weights, frozen (no pipeline folder needed)."""
    import torch
    from diffusers import UNet2DConditionModel

    from waveft.tiny import tiny_unet_config

    torch.manual_seed(0)
    return UNet2DConditionModel(**tiny_unet_config()).requires_grad_(False)


def unet_output(unet, batch: int = 2):
    """The UNet's prediction for fixed random latents, timesteps and SDXL conditioning of the tiny model's sizes."""
    import torch

    g = torch.Generator().manual_seed(0)
    sample = torch.randn(batch, 4, 8, 8, generator=g)
    hidden = torch.randn(batch, 7, 64, generator=g)
    added = {"text_embeds": torch.randn(batch, 32, generator=g), "time_ids": torch.randn(batch, 6, generator=g)}
    timesteps = torch.randint(0, 1000, (batch,), generator=g)
    return unet(sample, timesteps, hidden, added_cond_kwargs=added).sample
