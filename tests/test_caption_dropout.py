"""Caption dropout on the tiny SDXL: the prompts each micro-batch is really conditioned on, at 0, at 1 and at a
share in between, where a resumed run must drop exactly the micro-batches the uninterrupted run dropped."""

import pytest
import torch

from tests.helpers import adapter_weights, interrupted_copy, tiny_cfg
from waveft.errors import UserError


@pytest.fixture
def conditioned(monkeypatch):
    """Every micro-batch's prompts, as the loop hands them to the UNet's conditioning."""
    import waveft.train.loop as loop

    seen = []
    real = loop.batch_conditioning

    def spy(batch, prompts, *args):
        seen.append(list(prompts))
        return real(batch, prompts, *args)

    monkeypatch.setattr(loop, "batch_conditioning", spy)
    return seen


@pytest.mark.slow
@pytest.mark.parametrize("share", [0.0, 1.0])
def test_caption_dropout_at_0_keeps_every_prompt_and_at_1_drops_every_one(
        tiny_sdxl_dir, subject_dir, tmp_path, conditioned, share):
    from waveft.train.loop import train

    cfg = tiny_cfg(tiny_sdxl_dir, subject_dir, tmp_path / "run", "train.max_steps=2", "train.checkpointing_steps=0",
                   f"data.caption_dropout={share}")
    train(cfg)
    assert len(conditioned) == 4  # 2 optimizer steps x 2 accumulated micro-batches
    expected = "" if share == 1.0 else "a zjw ball"
    assert all(prompts == [expected] for prompts in conditioned), conditioned


@pytest.mark.slow
def test_caption_dropout_resumes_exactly(tiny_sdxl_dir, subject_dir, tmp_path, conditioned):
    from waveft.train.loop import train

    settings = ("train.max_steps=4", "train.checkpointing_steps=2", "train.resume=latest",
                "data.caption_dropout=0.5")
    train(tiny_cfg(tiny_sdxl_dir, subject_dir, tmp_path / "full", *settings))
    full_prompts = list(conditioned)
    assert {"", "a zjw ball"} == {p for prompts in full_prompts for p in prompts}  # some dropped, some not
    # The same run, interrupted right after its step-2 checkpoint, then resumed.
    interrupted_copy(tmp_path / "full", tmp_path / "split", checkpoint_step=2)
    conditioned.clear()
    train(tiny_cfg(tiny_sdxl_dir, subject_dir, tmp_path / "split", *settings))
    assert conditioned == full_prompts[4:]  # micro-batches 5-8: the same prompts as the uninterrupted run
    full, split = adapter_weights(tmp_path / "full"), adapter_weights(tmp_path / "split")
    for key in full:
        torch.testing.assert_close(split[key], full[key], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("share", ["-0.1", "1.5"])
def test_caption_dropout_outside_0_1_is_refused(share):
    from waveft.config import load_config

    with pytest.raises(UserError, match=r"data.caption_dropout' must be in \[0, 1\], got"):
        load_config(None, ("output_dir=/tmp/x", "data.instance_dir=/tmp/y", f"data.caption_dropout={share}"))
