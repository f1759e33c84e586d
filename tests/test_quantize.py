"""model.quantize: training, resuming, saving and generating over a bitsandbytes-quantized tiny SDXL UNet on CPU."""
import json
import sys

import pytest
import torch

from tests.helpers import adapter_weights, fresh_unet, interrupted_copy, run_tiny_training, tiny_cfg, unet_output
from tests.test_training import instance_loss
from waveft.config import load_config
from waveft.errors import UserError

# 4 images, batch 1, no accumulation: 4 optimizer steps per epoch; a checkpoint at step 5 to resume from.
LEARNING = ("train.max_steps=10", "train.gradient_accumulation_steps=1", "train.learning_rate=3e-3",
            "data.crop=center", "adapter.peft.n_frequency=512", "train.checkpointing_steps=5", "train.resume=latest")


def quantized_unet(tiny_sdxl_dir, kind):
    from waveft.models import quantize_linear_layers

    unet = fresh_unet(tiny_sdxl_dir).requires_grad_(False)
    quantize_linear_layers(unet, kind, torch.float32)
    return unet


def test_every_linear_layer_is_quantized_and_the_flags_peft_reads_are_set(tiny_sdxl_dir):
    import bitsandbytes as bnb

    from waveft.models import is_quantized

    unet = fresh_unet(tiny_sdxl_dir)
    linears = {n: m.in_features for n, m in unet.named_modules() if type(m) is torch.nn.Linear}
    reference = unet_output(unet)
    for kind, layer_class in (("nf4", bnb.nn.Linear4bit), ("int8", bnb.nn.Linear8bitLt)):
        unet = quantized_unet(tiny_sdxl_dir, kind)
        quantized = {n for n in linears if isinstance(unet.get_submodule(n), layer_class)}
        # nf4 leaves the tiny model's 32-wide embedding layers (not a multiple of its 64-weight block)
        assert quantized == {n for n, width in linears.items() if kind == "int8" or width % 64 == 0}
        assert is_quantized(unet) and len(quantized) >= 64
        error = (unet_output(unet) - reference).norm() / reference.norm()
        print(f"{kind}: relative error of the UNet's output {error:.4f}")
        assert 0 < error < 0.5


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_quantized_base_trains_resumes_exactly_saves_a_stock_adapter_and_generates(tiny_sdxl_dir, subject_dir,
                                                                                   tmp_path, kind):
    from peft import PeftModel

    from waveft.infer.generation import generate_images, prompt_seed_jobs
    from waveft.infer.pipeline import load_pipeline
    from waveft.infer.settings import GenerationSettings
    from waveft.train.loop import train

    cfg = tiny_cfg(tiny_sdxl_dir, subject_dir, tmp_path / "full", f"model.quantize={kind}", *LEARNING)
    result = train(cfg)
    # The loss falls: the trained adapter denoises the subject better than the quantized base alone.
    base_loss = instance_loss(quantized_unet(tiny_sdxl_dir, kind), tiny_sdxl_dir, subject_dir, cfg)
    trained_loss = instance_loss(result.unet, tiny_sdxl_dir, subject_dir, cfg)
    print(f"{kind}: instance loss {base_loss:.4f} -> {trained_loss:.4f}")
    assert trained_loss < 0.97 * base_loss

    # Resumed from step 5, the run ends with exactly the uninterrupted run's adapter.
    interrupted_copy(tmp_path / "full", tmp_path / "split", checkpoint_step=5)
    train(tiny_cfg(tiny_sdxl_dir, subject_dir, tmp_path / "split", f"model.quantize={kind}", *LEARNING))
    full, split = adapter_weights(tmp_path / "full"), adapter_weights(tmp_path / "split")
    assert full.keys() == split.keys()
    for key in full:
        torch.testing.assert_close(split[key], full[key], rtol=0, atol=0)

    # PEFT's own files, which stock PEFT loads onto the unquantized base.
    adapter_dir = tmp_path / "full" / "adapter"
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["peft_type"] == "WAVEFT"
    assert {v.dtype for v in full.values()} == {torch.float32}
    stock = PeftModel.from_pretrained(fresh_unet(tiny_sdxl_dir), str(adapter_dir))
    assert not torch.allclose(unet_output(stock.base_model.model), unet_output(fresh_unet(tiny_sdxl_dir)))

    # Generation on a quantized base keeps the adapter attached (unmerged) and makes images.
    pipe = load_pipeline(tiny_sdxl_dir, str(adapter_dir), device="cpu", quantize=kind)
    attached = [m for n, m in pipe.unet.named_modules() if n.endswith("to_q")]
    assert attached and all(type(m).__name__ == "StructuredWaveFTLinear" and not m.merged for m in attached)
    settings = GenerationSettings(steps=2, height=32, width=32, guidance_scale=1.0, quantize=kind)
    rows = generate_images(pipe, prompt_seed_jobs(["a zjw ball"], [0]), str(tmp_path / "images"), settings)
    assert (tmp_path / "images" / rows[0].file).is_file() and rows[0].settings["quantize"] == kind


@pytest.mark.slow
def test_lora_trains_through_peft_bitsandbytes_layers_and_nf4_differs_from_the_unquantized_adapter(
        tiny_sdxl_dir, subject_dir, tmp_path):
    from peft import PeftModel
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    from waveft.train.loop import train

    short = ("train.max_steps=3", "train.gradient_accumulation_steps=1", "train.checkpointing_steps=0")
    lora = train(tiny_cfg(tiny_sdxl_dir, subject_dir, tmp_path / "lora", "model.quantize=nf4", "adapter.type=lora",
                          "adapter.peft={}", "adapter.budget=1", *short))
    layers = [m for n, m in lora.unet.named_modules() if n.endswith("to_q")]
    assert layers and all(isinstance(m, LoraLinear4bit) for m in layers)
    PeftModel.from_pretrained(fresh_unet(tiny_sdxl_dir), str(tmp_path / "lora" / "adapter"))

    # The same WaveFT run over an nf4 and an unquantized base: same file, different numbers (printed).
    runs = {}
    for kind in ("nf4", "none"):
        train(tiny_cfg(tiny_sdxl_dir, subject_dir, tmp_path / kind, f"model.quantize={kind}", *short))
        runs[kind] = adapter_weights(tmp_path / kind)
    assert runs["nf4"].keys() == runs["none"].keys()
    for key in runs["nf4"]:
        nf4, plain = runs["nf4"][key], runs["none"][key]
        assert nf4.shape == plain.shape and nf4.dtype == plain.dtype
    difference = torch.cat([(runs["nf4"][k] - runs["none"][k]).flatten() for k in runs["nf4"]])
    reference = torch.cat([runs["none"][k].flatten() for k in runs["none"]])
    print(f"WaveFT adapter trained over nf4 vs an unquantized base, 3 steps: relative difference "
          f"{difference.norm() / reference.norm():.4f}")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (("adapter.type=loha", "adapter.peft={}", "adapter.budget=2"),
         "adapter.type=loha cannot train over model.quantize=nf4: PEFT's LoHa layer reshapes its delta"),
        (("adapter.type=lokr", "adapter.peft={}", "adapter.budget=1"),
         "adapter.type=lokr cannot train over model.quantize=nf4"),
    ],
)
def test_a_method_that_cannot_train_over_the_quantization_is_refused_at_validation(overrides, message):
    with pytest.raises(UserError, match=message):
        load_config(None, ("output_dir=x", "data.instance_dir=y", "model.quantize=nf4", *overrides))
    load_config(None, ("output_dir=x", "data.instance_dir=y", "model.quantize=int8", *overrides))  # int8 works


def test_quantize_without_bitsandbytes_is_refused(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed: find_spec answers None
    with pytest.raises(UserError, match="model.quantize=int8 needs the bitsandbytes package: pip install"):
        load_config(None, ("output_dir=x", "data.instance_dir=y", "model.quantize=int8"))
    load_config(None, ("output_dir=x", "data.instance_dir=y"))


def test_merging_into_a_quantized_base_is_refused_with_how_to_merge(tiny_sdxl_dir, tmp_path):
    from peft import WaveFTConfig

    from waveft.infer.pipeline import merge_adapter
    from waveft.io.adapter_folder import save_adapter

    unet = fresh_unet(tiny_sdxl_dir)
    unet.add_adapter(WaveFTConfig(n_frequency=16, target_modules=["to_q"]))
    save_adapter(unet, str(tmp_path / "adapter"))
    with pytest.raises(UserError, match="into a quantized base .* merge onto the unquantized base"):
        merge_adapter(quantized_unet(tiny_sdxl_dir, "nf4"), str(tmp_path / "adapter"))


@pytest.mark.slow
def test_the_cli_refuses_the_quantization_before_loading_anything(tiny_sdxl_dir, subject_dir, tmp_path):
    out = tmp_path / "run"
    result = run_tiny_training(tiny_sdxl_dir, subject_dir, out, "model.quantize=nf4", "adapter.type=lokr",
                               "adapter.peft={}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: configs/tiny.yaml: adapter.type=lokr cannot")
    assert not out.exists()
