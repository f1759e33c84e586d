"""adapter.text_encoders on the tiny SDXL: the run's adapter trains on both CLIP text encoders beside the UNet,
is saved in PEFT's format in the adapter folder's text_encoder/ and text_encoder_2/, loads in stock PEFT,
resumes exactly, and bad settings are refused in one line. One training run serves most tests."""
import json
import os

import pytest
import torch

from tests.helpers import (
    assert_resumed_not_redone,
    interrupted_copy,
    load_text_encoder,
    peft_weights,
    run_tiny_training,
    tiny_cfg,
)
from waveft.config import load_config
from waveft.errors import UserError
from waveft.io.adapter_folder import AdapterFolder

TEXT_ENCODERS = AdapterFolder.TEXT_ENCODERS
# 4 steps (2 checkpoints), EMA and the validation loss on: every place the text encoders' adapters go through.
SETTINGS = ("adapter.text_encoders.enabled=true", "adapter.text_encoders.learning_rate=3e-3", "train.max_steps=4",
            "train.checkpointing_steps=2", "train.checkpoints_total_limit=3", "train.resume=latest",
            "train.ema.enabled=true", "train.ema.decay=0.8", "validation.loss.every_steps=2")


def adapter_folders(adapter) -> dict:
    """{"unet" or a text encoder: its PEFT folder} of an adapter folder."""
    return {"unet": adapter, **{name: AdapterFolder(str(adapter)).text_encoder(name).root for name in TEXT_ENCODERS}}


@pytest.fixture(scope="module")
def trained(tiny_sdxl_dir, subject_dir, tmp_path_factory):
    from waveft.train.loop import train

    out = tmp_path_factory.mktemp("text_encoders") / "full"
    cfg = tiny_cfg(tiny_sdxl_dir, subject_dir, out, *SETTINGS)
    return cfg, train(cfg)


@pytest.mark.slow
def test_the_unet_and_both_text_encoders_adapters_train(trained, tiny_sdxl_dir):
    """Every model's saved adapter differs from the same adapter freshly attached (its initial weights)."""
    from peft import get_peft_model_state_dict

    from waveft.adapters.attach import attach_adapter
    from waveft.io.adapter_folder import PEFT_MODEL_PREFIX
    from waveft.models import load_sdxl

    cfg, result = trained
    fresh = load_sdxl(cfg.model)
    attach_adapter(fresh.unet, cfg.resolved_adapter)
    initial = {"unet": fresh.unet}
    for name in TEXT_ENCODERS:
        initial[name] = getattr(fresh, name)
        attach_adapter(initial[name], cfg.text_encoder_adapter())
    for model, folder in adapter_folders(os.path.join(cfg.output_dir, "adapter")).items():
        saved = peft_weights(folder)
        start = {PEFT_MODEL_PREFIX + k: v for k, v in get_peft_model_state_dict(initial[model]).items()}
        assert saved.keys() == start.keys() and saved, model
        assert any(not torch.equal(saved[k], start[k]) for k in saved), f"{model}'s adapter did not change"
    assert result.run_info.text_encoders["text_encoder"]["trainable_parameters"] == 12 * 64  # 3 layers x 4, n=64


@pytest.mark.slow
def test_saved_text_encoder_adapters_load_in_stock_peft_and_reproduce_the_trained_encoders(trained, tiny_sdxl_dir):
    from peft import PeftModel

    cfg, result = trained
    adapter = AdapterFolder(os.path.join(cfg.output_dir, "adapter"))
    assert set(adapter.text_encoder_adapters()) == set(TEXT_ENCODERS)
    ids = torch.randint(0, 500, (2, 77), generator=torch.Generator().manual_seed(0))
    for name in TEXT_ENCODERS:
        base = load_text_encoder(tiny_sdxl_dir, name)
        reloaded = PeftModel.from_pretrained(base, adapter.text_encoder(name).root)
        trained_encoder = result.text_encoders[name]
        with torch.no_grad():
            expected = trained_encoder(ids, output_hidden_states=True).hidden_states[-2]
            got = reloaded(input_ids=ids, output_hidden_states=True).hidden_states[-2]
            with reloaded.disable_adapter():
                plain = reloaded(input_ids=ids, output_hidden_states=True).hidden_states[-2]
        assert not torch.allclose(expected, plain, atol=1e-6), f"{name}: the trained adapter changes nothing"
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)  # structured vs PEFT's WaveFT: rounding


@pytest.mark.slow
def test_resume_with_text_encoders_is_exact(trained, tiny_sdxl_dir, subject_dir):
    from waveft.train.loop import train

    cfg, _ = trained
    full = cfg.output_dir
    split = os.path.join(os.path.dirname(full), "split")
    interrupted_copy(full, split, checkpoint_step=2)
    resumed = train(tiny_cfg(tiny_sdxl_dir, subject_dir, split, *SETTINGS))
    assert_resumed_not_redone(resumed.run_info, checkpoint_step=2, accumulation=2)
    for adapter in ("adapter", "adapter_raw", "checkpoint-4/adapter"):
        for model, folder in adapter_folders(os.path.join(full, adapter)).items():
            a = peft_weights(folder)
            b = peft_weights(folder.replace(full, split, 1))
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"{adapter}: {model}"
    assert json.loads(open(os.path.join(split, "run_info.json")).read())["validation_losses"] == \
        json.loads(open(os.path.join(full, "run_info.json")).read())["validation_losses"]


@pytest.mark.slow
def test_run_info_and_model_card_name_the_text_encoders(trained, tiny_sdxl_dir):
    cfg, _ = trained
    info = json.loads(open(os.path.join(cfg.output_dir, "run_info.json")).read())
    adapter = AdapterFolder(os.path.join(cfg.output_dir, "adapter"))
    for name in TEXT_ENCODERS:
        record = info["text_encoders"][name]
        projections = {n for n, _ in load_text_encoder(tiny_sdxl_dir, name).named_modules()
                       if n.endswith(("q_proj", "k_proj", "v_proj", "out_proj"))}
        assert record["adapted_layers"] == 12 and record["layer_shapes"] == {n: [32, 32] for n in projections}
    card = open(adapter.model_card).read()
    assert "`text_encoder` (768 trainable parameters on 12 layers)" in card
    assert 'PeftModel.from_pretrained(pipe.text_encoder_2, "path/to/this/folder/text_encoder_2")' in card


@pytest.mark.parametrize("overrides, message", [
    (("adapter.text_encoders.learning_rate=0",), "key 'adapter.text_encoders.learning_rate' must be > 0, got 0"),
    (("adapter.text_encoders.enabled=true", "adapter.text_encoders.learning_rate=-1e-4"),
     "key 'adapter.text_encoders.learning_rate' must be > 0"),
    (("adapter.text_encoders.enabled=true", "adapter.text_encoders.target_modules=[]"),
     "key 'adapter.text_encoders.target_modules' must name at least one module"),
    (("adapter.text_encoders.enabled=true", "adapter.type=adalora"),
     "adapter.type=adalora cannot adapt the text encoders"),
])
def test_bad_text_encoder_settings_are_refused_before_any_model_loads(overrides, message):
    with pytest.raises(UserError, match=message):
        load_config(None, ("output_dir=/tmp/x", "data.instance_dir=/tmp/y", *overrides))


def test_text_encoder_learning_rate_defaults_to_the_runs():
    cfg = load_config(None, ("output_dir=/tmp/x", "data.instance_dir=/tmp/y", "train.learning_rate=2e-4"))
    assert cfg.text_encoder_learning_rate() == 2e-4 and cfg.text_encoder_adapter() is None
    cfg = load_config(None, ("output_dir=/tmp/x", "data.instance_dir=/tmp/y", "adapter.text_encoders.enabled=true",
                             "adapter.text_encoders.learning_rate=5e-5"))
    assert cfg.text_encoder_learning_rate() == 5e-5
    assert cfg.text_encoder_adapter().target_modules == ("q_proj", "k_proj", "v_proj", "out_proj")


@pytest.mark.slow
def test_text_encoder_targets_that_match_nothing_stop_the_cli_in_one_line_naming_the_encoder(
        tiny_sdxl_dir, subject_dir, tmp_path):
    out = tmp_path / "run"
    result = run_tiny_training(tiny_sdxl_dir, subject_dir, out, "adapter.text_encoders.enabled=true",
                               "adapter.text_encoders.target_modules=[q_proj, to_q]")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert lines == ["error: adapter.text_encoders.target_modules entry 'to_q' matches no module of the "
                     "text_encoder"], result.stderr[-2000:]
    assert not out.exists()


@pytest.mark.slow
def test_the_trained_run_generates_with_its_encoders_and_exports_them_under_kohya_names(trained, tiny_sdxl_dir,
                                                                                         tmp_path):
    """What a user does next with the run's adapter folder: generation merges the trained encoders (the prompt's
    embeddings move), and the LoRA export holds every adapted encoder layer as lora_te1_ / lora_te2_."""
    from safetensors import safe_open

    from tests.test_export import export
    from waveft.infer.pipeline import load_pipeline

    cfg, _ = trained
    adapter = os.path.join(cfg.output_dir, "adapter")

    def prompt_embeddings(pipe):
        with torch.no_grad():
            embeds, _, pooled, _ = pipe.encode_prompt("a zjw ball", do_classifier_free_guidance=False)
        return embeds, pooled

    trained_embeds = prompt_embeddings(load_pipeline(tiny_sdxl_dir, adapter, device="cpu"))
    base_embeds = prompt_embeddings(load_pipeline(tiny_sdxl_dir, device="cpu"))
    for got, base in zip(trained_embeds, base_embeds, strict=True):
        assert (got - base).abs().max() > 1e-4
    result = export(adapter, tmp_path / "lora.safetensors", "lora", energy=1.0, dtype="fp32")
    with safe_open(result.path, framework="pt") as f:
        layers = {key.split(".")[0] for key in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    for prefix in ("lora_te1_", "lora_te2_"):
        assert len({name for name in layers if name.startswith(prefix)}) == 12, prefix


@pytest.mark.parametrize("method", ["waveft", "shira", "lora", "loha", "lokr", "vera", "fourierft", "wara"])
def test_every_method_but_adalora_adapts_a_clip_encoder_and_loads_back_in_stock_peft(method, tiny_sdxl_dir,
                                                                                     tmp_path):
    """The run's method on a CLIP encoder, saved the way the trainer saves it, loaded by stock PEFT into the same
    outputs."""
    from peft import PeftModel

    from tests.test_export import METHOD_SETTINGS
    from waveft.adapters.attach import AdaptedModel, attach_adapter
    from waveft.io.adapter_folder import _write_peft_files

    cfg = load_config(None, ("output_dir=/tmp/x", "data.instance_dir=/tmp/y", f"adapter.type={method}",
                             "adapter.text_encoders.enabled=true",
                             *(f"adapter.peft.{k}={v}" for k, v in METHOD_SETTINGS[method].items())))
    encoder = load_text_encoder(tiny_sdxl_dir, "text_encoder_2")
    attached = attach_adapter(encoder, cfg.text_encoder_adapter(), which=AdaptedModel("text_encoder_2", "x"))
    assert len(attached.layers) == 12 and attached.trainable_parameters > 0
    torch.manual_seed(0)
    for param in encoder.parameters():
        if param.requires_grad:
            param.data.normal_(0, 0.05)
    ids = torch.randint(0, 500, (1, 77), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = encoder(ids).text_embeds
    _write_peft_files(encoder, AdapterFolder(str(tmp_path)), "default")
    base = load_text_encoder(tiny_sdxl_dir, "text_encoder_2")
    with torch.no_grad():
        unadapted = base(ids).text_embeds
        loaded = PeftModel.from_pretrained(base, str(tmp_path))(input_ids=ids).text_embeds
    torch.testing.assert_close(loaded, expected, rtol=1e-4, atol=1e-5)
    assert (loaded - unadapted).abs().max() > 1e-4
