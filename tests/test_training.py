"""The trainer end to end on the tiny SDXL: adapters, learning, saving, reloading, resuming, refusing."""
import json
import os
import re

import pytest
import torch

from tests.helpers import (
    adapter_weights,
    assert_resumed_not_redone,
    fresh_unet,
    interrupted_copy,
    run_tiny_training,
    tiny_cfg,
    unet_output,
)
from waveft.config import load_config
from waveft.errors import UserError

TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def test_adapters_go_exactly_on_attention_projections(tiny_sdxl_dir):
    from waveft.adapters.attach import attach_adapter, format_adapter_table

    cfg = load_config(None, ("output_dir=x", "data.instance_dir=y", "adapter.peft.n_frequency=50"))
    unet = fresh_unet(tiny_sdxl_dir)
    expected = sorted(n for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear) and n.endswith(TARGETS))
    layers = attach_adapter(unet, cfg.adapter).layers
    assert sorted(layer.name for layer in layers) == expected and len(expected) == 64
    trainable = {n: p.numel() for n, p in unet.named_parameters() if p.requires_grad}
    assert all("waveft_spectrum" in n for n in trainable) and sum(trainable.values()) == 64 * 50
    assert all(p.dtype == torch.float32 for n, p in unet.named_parameters() if p.requires_grad)
    assert "| total | 64 | | 3,200 |" in format_adapter_table(layers)


@pytest.mark.parametrize(
    "override, message",
    [
        ("adapter.peft.n_frequency=5000", r"n_frequency=5000 is out of range for layer .*to_q \(64x64 holds 1..4096\)"),
        ("adapter.target_modules=[to_q, conv_in]",
         "'conv_in' matches conv_in of the UNet, a Conv2d, not a Linear layer"),
        ("adapter.target_modules=[to_qq]", "'to_qq' matches no module"),
    ],
)
def test_adapter_that_does_not_fit_the_model_is_refused(tiny_sdxl_dir, override, message):
    from waveft.adapters.attach import attach_adapter

    cfg = load_config(None, ("output_dir=x", "data.instance_dir=y", override))
    with pytest.raises(UserError, match=message):
        attach_adapter(fresh_unet(tiny_sdxl_dir), cfg.adapter)


def instance_loss(unet, tiny_sdxl_dir, subject_dir, cfg):
    """Mean denoising loss (plain MSE on the noise) over the instance images at fixed noise and timesteps, as the
    trainer's own micro-batch loss computes it."""
    from waveft.models import load_sdxl
    from waveft.train.data import DreamBoothDataset, collate
    from waveft.train.loop import encode_prompts
    from waveft.train.loss import Conditioning, LossSettings, micro_batch_loss

    components = load_sdxl(cfg.model)
    batch = collate([DreamBoothDataset(cfg.data, 0)[i] for i in range(4)])
    embeds, pooled = encode_prompts(components, batch.prompts, "diffusers", "cpu")
    conditioning = Conditioning(embeds, pooled, batch.time_ids)
    plain_mse = LossSettings(prediction_type="epsilon")
    g = torch.Generator().manual_seed(0)
    losses = []
    with torch.no_grad():
        latents = components.vae.encode(batch.pixels).latent_dist.mean * components.vae.config.scaling_factor
        for _ in range(4):
            losses.append(micro_batch_loss(unet, components.noise_scheduler, latents, conditioning, 4, [g] * 4,
                                           plain_mse).item())
    return sum(losses) / len(losses)


@pytest.mark.slow
def test_short_run_learns_and_saved_adapter_reloads_in_stock_peft(tiny_sdxl_dir, subject_dir, tmp_path):
    from peft import PeftModel, WaveFTConfig, set_peft_model_state_dict
    from safetensors.torch import load_file

    cfg = tiny_cfg(tiny_sdxl_dir, subject_dir, tmp_path / "run", "train.max_steps=30", "train.learning_rate=3e-3",
                   "data.crop=center", "adapter.peft.n_frequency=512", "train.checkpointing_steps=0")
    from waveft.train.loop import train

    result = train(cfg)
    base_loss = instance_loss(fresh_unet(tiny_sdxl_dir), tiny_sdxl_dir, subject_dir, cfg)
    trained_loss = instance_loss(result.unet, tiny_sdxl_dir, subject_dir, cfg)
    assert trained_loss < 0.97 * base_loss

    adapter_dir = tmp_path / "run" / "adapter"
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    assert info["trainable_parameters"] == 64 * 512 and info["steps"] == 30
    expected = unet_output(result.unet)
    reloaded = PeftModel.from_pretrained(fresh_unet(tiny_sdxl_dir), str(adapter_dir))
    torch.testing.assert_close(unet_output(reloaded.base_model.model), expected, rtol=1e-5, atol=1e-5)

    unet = fresh_unet(tiny_sdxl_dir)
    unet.add_adapter(WaveFTConfig.from_pretrained(str(adapter_dir)))
    outcome = set_peft_model_state_dict(unet, load_file(str(adapter_dir / "adapter_model.safetensors")))
    assert not outcome.unexpected_keys and not [k for k in outcome.missing_keys if "waveft" in k]
    torch.testing.assert_close(unet_output(unet), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_resume_matches_an_uninterrupted_run(tiny_sdxl_dir, subject_dir, tmp_path):

    from waveft.train.loop import train

    # 4 images, batch 1, accumulation 2: 2 optimizer steps per epoch, so the run crosses epochs.
    settings = ("train.max_steps=7", "train.checkpointing_steps=3", "train.lr_scheduler=cosine",
                "train.lr_warmup_steps=1", "data.flip_probability=0.5", "train.resume=latest")
    train(tiny_cfg(tiny_sdxl_dir, subject_dir, tmp_path / "full", *settings))
    # The same run, interrupted right after its step-3 checkpoint.
    interrupted_copy(tmp_path / "full", tmp_path / "split", checkpoint_step=3)
    resumed = train(tiny_cfg(tiny_sdxl_dir, subject_dir, tmp_path / "split", *settings))
    assert resumed.run_info.steps == 7
    assert_resumed_not_redone(resumed.run_info, checkpoint_step=3, accumulation=2)
    full, split = adapter_weights(tmp_path / "full"), adapter_weights(tmp_path / "split")
    assert full.keys() == split.keys() and all(torch.equal(split[key], full[key]) for key in full)
    state = json.loads((tmp_path / "split" / "checkpoint-6" / "training_state.json").read_text())
    assert state["global_step"] == 6


@pytest.mark.slow
def test_output_dir_holding_a_run_is_protected(tiny_sdxl_dir, subject_dir, tmp_path):
    from waveft.train.loop import train

    out = tmp_path / "run"
    train(tiny_cfg(tiny_sdxl_dir, subject_dir, out, "train.max_steps=2", "train.checkpointing_steps=1"))
    before = {p: os.path.getmtime(out / p) for p in ("adapter/adapter_model.safetensors", "config.yaml")}
    with pytest.raises(UserError, match="already holds a run"):
        train(tiny_cfg(tiny_sdxl_dir, subject_dir, out, "train.max_steps=2"))
    with pytest.raises(UserError, match=r"holds a different run: key 'adapter.peft'"):
        train(tiny_cfg(tiny_sdxl_dir, subject_dir, out, "train.resume=latest", "adapter.peft.n_frequency=8"))
    assert before == {p: os.path.getmtime(out / p) for p in before}


@pytest.mark.slow
def test_diverging_loss_stops_with_a_clear_message_and_saves_nothing(tiny_sdxl_dir, subject_dir, tmp_path):
    out = tmp_path / "run"
    result = run_tiny_training(tiny_sdxl_dir, subject_dir, out, "data.resolution=32", "train.report_to=none",
                               "train.noise_offset=1e30")  # noise of 1e30: the squared error overflows
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    error_lines = [l for l in result.stderr.splitlines() if l.startswith("error:")]
    assert len(error_lines) == 1 and re.search("loss became (nan|inf) at step 1", error_lines[0])
    assert not (out / "adapter").exists()


@pytest.mark.slow
def test_prior_preservation_8bit_adam_bf16_checkpointing_and_min_snr(tiny_sdxl_dir, subject_dir, tmp_path):
    from waveft.train.loop import train

    out = tmp_path / "run"
    settings = ("data.prior_preservation.enabled=true", "data.prior_preservation.num_class_images=3",
                "data.prior_preservation.generation_steps=2", "train.optimizer=adamw_8bit",
                "train.mixed_precision=bf16", "train.gradient_checkpointing=true", "train.snr_gamma=5.0",
                "model.prediction_type=v_prediction", "train.max_steps=2", "train.checkpointing_steps=2")
    result = train(tiny_cfg(tiny_sdxl_dir, subject_dir, out, *settings))
    class_images = sorted(os.listdir(out / "class_images"))
    assert [n for n in class_images if n.endswith(".png")] == ["class_00000.png", "class_00001.png", "class_00002.png"]
    manifest = [json.loads(l) for l in (out / "class_images" / "class_manifest.jsonl").read_text().splitlines()]
    assert {row["prompt"] for row in manifest} == {"a ball"}
    unet = result.unet
    assert {p.dtype for p in unet.parameters() if p.requires_grad} == {torch.float32}
    assert {p.dtype for p in unet.parameters() if not p.requires_grad} == {torch.bfloat16}
    assert unet.is_gradient_checkpointing
    optimizer_state = torch.load(out / "checkpoint-2" / "optimizer.pt", weights_only=True)["state"]
    assert optimizer_state and all("__bnb_optimizer_quant_state__" in s for s in optimizer_state.values())
    assert result.run_info.final_loss is not None and result.run_info.final_loss == result.run_info.final_loss

    # Each loss term shows in the first step's loss (same weights, batch, noise and timesteps): without Min-SNR,
    # or with the class half weighted 0, it differs.
    first_loss = result.run_info.train_losses[0]
    one_step = (*settings, "train.max_steps=1", "train.checkpointing_steps=0",
                f"data.prior_preservation.class_dir={out / 'class_images'}")
    without_effect = []
    for name, change in [("min_snr", "train.snr_gamma=null"), ("prior", "data.prior_preservation.loss_weight=0")]:
        other = train(tiny_cfg(tiny_sdxl_dir, subject_dir, tmp_path / name, *one_step, change)).run_info
        assert other.train_losses[0][0] == first_loss[0] == 1
        if abs(other.train_losses[0][1] - first_loss[1]) <= 1e-3 * abs(first_loss[1]):
            without_effect.append(name)
    assert without_effect == []  # loss terms that do not reach the loss

    # Class images are kept for reuse: a second run (overwriting this one) generates none.
    mtimes = {n: os.path.getmtime(out / "class_images" / n) for n in class_images}
    train(tiny_cfg(tiny_sdxl_dir, subject_dir, out, *settings, "overwrite_output_dir=true"))
    assert mtimes == {n: os.path.getmtime(out / "class_images" / n) for n in class_images}


@pytest.mark.slow
def test_adalora_run_resumes_from_its_checkpoint(tiny_sdxl_dir, subject_dir, tmp_path):
    """AdaLoRA's saved adapter omits its rank buffers on purpose; resuming must still accept it, go on from the
    checkpoint (its rank schedule's importance scores restored) and end where an uninterrupted run ends."""

    from waveft.train.loop import train

    settings = ("adapter.type=adalora", "adapter.peft={}", "train.max_steps=3", "train.checkpointing_steps=2",
                "train.resume=latest")
    train(tiny_cfg(tiny_sdxl_dir, subject_dir, tmp_path / "full", *settings))
    # The same run, interrupted right after its step-2 checkpoint.
    interrupted_copy(tmp_path / "full", tmp_path / "split", checkpoint_step=2)
    resumed = train(tiny_cfg(tiny_sdxl_dir, subject_dir, tmp_path / "split", *settings))
    assert resumed.run_info.steps == 3 and resumed.run_info.method == "adalora"
    assert_resumed_not_redone(resumed.run_info, checkpoint_step=2, accumulation=2)
    full, split = adapter_weights(tmp_path / "full"), adapter_weights(tmp_path / "split")
    assert full.keys() == split.keys() and all(torch.equal(split[key], full[key]) for key in full)


@pytest.mark.slow
def test_adapter_that_does_not_fit_stops_the_cli_before_anything_is_written(tiny_sdxl_dir, subject_dir, tmp_path):
    out = tmp_path / "run"
    result = run_tiny_training(tiny_sdxl_dir, subject_dir, out, "adapter.peft.n_frequency=5000")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: adapter.peft.n_frequency=5000 is out of range")
    assert not out.exists()
