"""The memory preflight: a training step on meta tensors, checked against itself and against a real CPU step."""
import functools
import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import REPO, fresh_unet, load_text_encoder
from waveft.config import load_config
from waveft.train.memory_estimate import LiveStorage, estimate_step_memory, training_step


def tiny_estimate(tiny_sdxl_dir, *overrides):
    cfg = load_config(os.path.join(REPO, "configs", "tiny.yaml"), (f"model.pretrained={tiny_sdxl_dir}", *overrides))
    return cfg, estimate_step_memory(cfg)


def test_the_split_adds_up_to_the_total(tiny_sdxl_dir):
    _, estimate = tiny_estimate(tiny_sdxl_dir)
    parts = (estimate.weights, estimate.adapter_state, estimate.activations, estimate.largest_temporary)
    assert all(part > 0 for part in parts) and sum(parts) == estimate.total
    rows = {line.split("|")[1].strip(): float(line.split("|")[2].replace(",", ""))
            for line in estimate.table().splitlines() if line.startswith("| ") and not line.startswith("| part")}
    assert rows["total (CUDA context not included)"] == pytest.approx(sum(rows.values()) / 2, abs=0.2)


def test_activations_grow_with_resolution_and_batch_and_weights_shrink_with_quantization(tiny_sdxl_dir):
    _, small = tiny_estimate(tiny_sdxl_dir, "data.resolution=32")
    _, large = tiny_estimate(tiny_sdxl_dir, "data.resolution=64")
    _, batch2 = tiny_estimate(tiny_sdxl_dir, "data.resolution=32", "train.batch_size=2")
    _, checkpointed = tiny_estimate(tiny_sdxl_dir, "data.resolution=64", "train.gradient_checkpointing=true")
    _, nf4 = tiny_estimate(tiny_sdxl_dir, "model.quantize=nf4")
    _, bf16 = tiny_estimate(tiny_sdxl_dir, "train.mixed_precision=bf16")
    assert small.weights == large.weights == batch2.weights and small.adapter_state == large.adapter_state
    # 4x the pixels: more than twice the activations (the text tokens do not grow); twice the batch: about twice
    assert large.activations > 2 * small.activations
    assert 1.6 * small.activations < batch2.activations < 2.4 * small.activations
    assert checkpointed.activations < large.activations
    assert nf4.weights < 0.7 * large.weights and bf16.weights < 0.6 * large.weights


@pytest.mark.parametrize("implementation, resolution, batch, text_encoders", [
    ("structured", 64, 2, False),
    ("peft", 64, 2, False),  # PEFT's WaveFT: a dense delta per layer, rebuilt each step through a boolean mask
    # 1024 tokens at the attention level: the math path's N x N scores would add over 40% here (5% at 64 px)
    ("structured", 256, 1, False),
    ("structured", 64, 2, True),  # adapter.text_encoders: both encoders adapted and run in the step
])
def test_the_estimate_is_within_ten_percent_of_a_real_cpu_step(tiny_sdxl_dir, implementation, resolution, batch,
                                                               text_encoders):
    """The same step with real tensors on the CPU, its storages tracked from before the first step: the frozen
    and adapter tensors, then everything the two steps allocate, at its peak. The real step runs as torch runs it
    on the CPU (fused attention of its own choosing), so none of the estimate's modelling is shared with it."""
    from waveft.adapters.attach import attach_adapter

    cfg, estimate = tiny_estimate(tiny_sdxl_dir, f"adapter.implementation={implementation}",
                                  f"data.resolution={resolution}", f"train.batch_size={batch}",
                                  f"adapter.text_encoders.enabled={str(text_encoders).lower()}")
    unet = fresh_unet(tiny_sdxl_dir).requires_grad_(False)
    attach_adapter(unet, cfg.resolved_adapter)
    encoders = [adapted_encoder(tiny_sdxl_dir, cfg, component) for component in ("text_encoder", "text_encoder_2")
                if text_encoders]
    measured = real_cpu_step_bytes(cfg, unet, torch.float32, encoders)
    print(f"tiny UNet{' + text encoders' * text_encoders}, {implementation} WaveFT, {resolution} px, batch {batch}: "
          f"estimate "
          f"{estimate.total / 2**20:.2f} MiB, real CPU step {measured / 2**20:.2f} MiB "
          f"(ratio {estimate.total / measured:.3f})")
    assert abs(estimate.total / measured - 1) < 0.10


CUDA_AUTOCAST_FP32 = ("group_norm", "layer_norm", "softmax", "mse_loss")  # in fp32 under CUDA autocast, not CPU's


def test_the_bf16_estimate_of_peft_waveft_is_within_ten_percent_of_a_real_cpu_autocast_step(tiny_sdxl_dir,
                                                                                           monkeypatch):
    """Mixed precision: the UNet in bf16, the adapter in fp32, the step under the CPU's bf16 autocast, which casts
    Linear and convolution inputs and weights to bf16 as CUDA's does (PEFT WaveFT's dense delta, built in fp32, is
    kept in bf16); the normalisations, softmax and loss run in fp32 as under CUDA autocast (CPU autocast keeps
    them in bf16)."""
    from diffusers import UNet2DConditionModel

    from waveft.adapters.attach import attach_adapter

    cfg, estimate = tiny_estimate(tiny_sdxl_dir, "adapter.implementation=peft", "data.resolution=128",
                                  "train.mixed_precision=bf16")
    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl_dir, subfolder="unet", torch_dtype=torch.bfloat16)
    attach_adapter(unet.requires_grad_(False), cfg.resolved_adapter)
    unet.forward = torch.autocast("cpu", dtype=torch.bfloat16)(unet.forward)
    for name in CUDA_AUTOCAST_FP32:
        function = getattr(torch.nn.functional, name)
        monkeypatch.setattr(torch.nn.functional, name, functools.partial(in_fp32, function))
    measured = real_cpu_step_bytes(cfg, unet, torch.bfloat16)
    print(f"tiny UNet, PEFT WaveFT, 128 px, bf16: estimate {estimate.total / 2**20:.2f} MiB, real CPU autocast "
          f"step {measured / 2**20:.2f} MiB (ratio {estimate.total / measured:.3f})")
    assert abs(estimate.total / measured - 1) < 0.10


def real_cpu_step_bytes(cfg, unet, dtype, encoders=()) -> int:
    """The models' tensors (the adapted UNet, and `encoders` when the text encoders train) plus the peak of what
    two real CPU training steps allocate, tracked from before the first."""
    from waveft.train.optimizer import build_optimizer

    models = [unet, *encoders]
    for model in models:
        model.train()
    model_bytes = sum(t.untyped_storage().nbytes() for model in models for t in [*model.parameters(),
                                                                                 *model.buffers()])
    optimizer = build_optimizer(cfg, [p for model in models for p in model.parameters() if p.requires_grad])
    step = training_step(unet, optimizer, dict(unet.config), cfg, dtype, device="cpu", encoders=list(encoders))
    with LiveStorage() as tracked:
        step()
        step()
    return model_bytes + tracked.peak


def in_fp32(function, *args, **kwargs):
    with torch.autocast("cpu", enabled=False):
        args, kwargs = torch.utils._pytree.tree_map(
            lambda t: t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t, (args, kwargs))
        return function(*args, **kwargs)


@pytest.mark.slow
def test_estimate_memory_on_the_paper_config_needs_only_the_shipped_configs(tmp_path):
    probe = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
             "print('PEAK_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "empty-hub-cache"))
    result = subprocess.run(
        [sys.executable, "-c", probe, sys.executable, "train_dreambooth_waveft.py", "--config",
         "configs/sdxl_waveft_paper.yaml", "--estimate-memory"],
        cwd=REPO, capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Estimated peak accelerator memory of one training step (1024 px, batch 1, bf16" in result.stdout
    assert "| weights (frozen base) | 4,897.0 | 4.78 |" in result.stdout  # SDXL's 2.57 G UNet parameters in bf16
    peak_gb = int(result.stdout.rsplit("PEAK_KB", 1)[1].split()[0]) / 2**20
    assert peak_gb < 4, f"--estimate-memory peaked at {peak_gb:.1f} GB of RAM"


@pytest.mark.slow
def test_estimate_memory_with_a_config_failing_validation_is_one_error_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "train_dreambooth_waveft.py", "--config", "configs/sdxl_waveft_paper.yaml",
         "--estimate-memory", "train.batch_size=0"],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: configs/sdxl_waveft_paper.yaml: key 'train.batch_size' must be > 0, got 0"]


@pytest.mark.parametrize("method, budget", [("shira", 1), ("loha", 2), ("wara", 1)])
def test_a_method_whose_layers_read_values_has_no_estimate_and_its_run_still_starts(tiny_sdxl_dir, method, budget):
    from waveft.entry import set_up_process
    from waveft.train.loop import memory_estimate_line
    from waveft.train.memory_estimate import EstimateUnavailable

    set_up_process()  # registers WaRA with PEFT, as every entry point does
    cfg = load_config(os.path.join(REPO, "configs", "tiny.yaml"), (
        f"model.pretrained={tiny_sdxl_dir}", f"adapter.type={method}", "adapter.peft={}", f"adapter.budget={budget}"))
    with pytest.raises(EstimateUnavailable, match=f"no memory estimate for adapter.type={method}"):
        estimate_step_memory(cfg)
    assert memory_estimate_line(cfg).startswith(f"no memory estimate for adapter.type={method}: its PEFT layers")


def adapted_encoder(tiny_sdxl_dir, cfg, component):
    """A tiny text encoder loaded as the trainer loads it, with the run's adapter."""
    from waveft.adapters.attach import attach_text_encoder_adapter

    encoder = load_text_encoder(tiny_sdxl_dir, component)
    attach_text_encoder_adapter(encoder.requires_grad_(False), component, cfg.text_encoder_adapter())
    return encoder


def test_trained_text_encoders_add_their_weights_adapters_and_activations(tiny_sdxl_dir):
    _, unet_only = tiny_estimate(tiny_sdxl_dir)
    _, with_encoders = tiny_estimate(tiny_sdxl_dir, "adapter.text_encoders.enabled=true")
    assert with_encoders.weights > unet_only.weights and with_encoders.adapter_state > unet_only.adapter_state
    assert with_encoders.activations > unet_only.activations
    assert "+ text encoders" in with_encoders.line()
