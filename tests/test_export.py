"""waveft.export on the tiny pipeline: the LoRA file loads in diffusers and equals PEFT's converted LoRA, the
full difference reproduces the merged adapter exactly, every additive method exports, SDXL's 560 kohya names,
metadata, and every bad input (one line, exit 2, nothing written)."""
import hashlib
import json
import os
import re
import shutil

import pytest
import torch

from tests.helpers import unet_output
from waveft.adapters.attach import attach_adapter
from waveft.config import AdapterConfig
from waveft.export.cli import main
from waveft.export.request import ExportRequest
from waveft.export.source import kohya_name
from waveft.export.writer import export_adapter
from waveft.io.adapter_folder import AdapterFolder, save_adapter

WAVEFT = {"n_frequency": 300}
# One adapter of each method on the tiny model, small enough that the UNet stays in its normal range.
METHOD_SETTINGS = {
    "waveft": WAVEFT, "shira": {"r": 2}, "lora": {"r": 2}, "loha": {"r": 2}, "lokr": {"r": 4},
    "vera": {"r": 16}, "fourierft": {"n_frequency": 300}, "adalora": {"init_r": 3, "target_r": 2}, "wara": {"r": 2},
}


def load_unet(tiny_sdxl_dir):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(tiny_sdxl_dir, subfolder="unet")


def make_adapter(path, tiny_sdxl_dir, method="waveft", peft=None, std=2e-3, record_shapes=True) -> str:
    """A saved adapter of `method` whose trainable weights are random (as after training), with its run record."""
    unet = load_unet(tiny_sdxl_dir)
    layers = attach_adapter(unet, AdapterConfig(type=method, peft=dict(METHOD_SETTINGS[method], **(peft or {}))),
                            total_steps=10).layers
    torch.manual_seed(1)
    for param in unet.parameters():
        if param.requires_grad:
            param.data.normal_(0, std)
    save_adapter(unet, str(path))
    run_info = {"method": method, "adapter_type": method, "base_model": tiny_sdxl_dir, "budget": None,
                "trainable_parameters": sum(layer.trainable_parameters for layer in layers), "subject": "ball"}
    if record_shapes:
        run_info["layer_shapes"] = {layer.name: [layer.out_features, layer.in_features] for layer in layers}
    with open(os.path.join(path, "waveft_run.json"), "w") as f:
        json.dump(run_info, f)
    return str(path)


@pytest.fixture(scope="module")
def waveft_adapter(tiny_sdxl_dir, tmp_path_factory):
    return make_adapter(tmp_path_factory.mktemp("adapters") / "waveft", tiny_sdxl_dir)


def merged_unet(tiny_sdxl_dir, adapter):
    from waveft.infer.pipeline import merge_adapter

    return merge_adapter(load_unet(tiny_sdxl_dir), adapter)


def lora_pipeline_output(tiny_sdxl_dir, lora_file):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    pipe.load_lora_weights(lora_file)
    return unet_output(pipe.unet)


def export(adapter, out, fmt, say=lambda *_: None, **kwargs):
    return export_adapter(ExportRequest(adapter=adapter, format=fmt, out=str(out), **kwargs), progress=False,
                          say=say)


def apply_full_diff(unet, path) -> int:
    """W += diff for every `<kohya name>.diff` of the file; returns how many layers it changed."""
    from safetensors.torch import load_file

    modules = {kohya_name(name): module for name, module in unet.named_modules()}
    diffs = load_file(path)
    for key, diff in diffs.items():
        name = key.removesuffix(".diff")
        assert key.endswith(".diff") and name in modules, key
        modules[name].weight.data += diff.to(modules[name].weight.dtype)
    return len(diffs)


def test_lora_loads_in_diffusers_and_equals_peft_converted_lora(tiny_sdxl_dir, waveft_adapter, tmp_path):
    from peft import PeftModel, convert_to_lora, set_peft_model_state_dict

    result = export(waveft_adapter, tmp_path / "lora.safetensors", "lora", rank=8, dtype="fp32")
    loaded = lora_pipeline_output(tiny_sdxl_dir, result.path)
    # PEFT's own conversion of PEFT's WaveFT layer, loaded as PEFT LoRA.
    waveft_model = PeftModel.from_pretrained(load_unet(tiny_sdxl_dir), waveft_adapter)
    lora_config, state = convert_to_lora(waveft_model, 8)
    peft_lora = PeftModel(load_unet(tiny_sdxl_dir), lora_config)
    assert not set_peft_model_state_dict(peft_lora, state).unexpected_keys
    expected = unet_output(peft_lora)
    torch.testing.assert_close(loaded, expected, rtol=1e-4, atol=1e-5)
    base = unet_output(load_unet(tiny_sdxl_dir))
    assert (expected - base).abs().max() > 1e-3  # the adapter changes the output, so the equality says something
    assert max(r.relative_error for r in result.lora_layers) > 0.1  # rank 8 of a WaveFT difference is lossy


@pytest.mark.parametrize("size", [{"rank": 64}, {"energy": 1.0}])
def test_lora_at_full_rank_reproduces_the_merged_waveft_unet(tiny_sdxl_dir, waveft_adapter, tmp_path, size):
    result = export(waveft_adapter, tmp_path / "full.safetensors", "lora", dtype="fp32", **size)
    assert max(r.relative_error for r in result.lora_layers) < 1e-3
    expected = unet_output(merged_unet(tiny_sdxl_dir, waveft_adapter))
    torch.testing.assert_close(lora_pipeline_output(tiny_sdxl_dir, result.path), expected, rtol=1e-4, atol=2e-5)


def test_energy_threshold_picks_per_layer_ranks_that_keep_the_energy(waveft_adapter, tmp_path):
    result = export(waveft_adapter, tmp_path / "e.safetensors", "lora", energy=0.9, dtype="fp32")
    ranks = {r.rank for r in result.lora_layers}
    assert len(ranks) > 1 and max(ranks) < 64
    assert all(r.energy_kept >= 0.9 - 1e-6 for r in result.lora_layers)
    # The error of a truncated SVD is the energy it drops.
    for r in result.lora_layers:
        assert r.relative_error == pytest.approx((1 - r.energy_kept) ** 0.5, abs=1e-3)


@pytest.mark.parametrize("method", list(METHOD_SETTINGS))
def test_every_additive_method_exports_its_exact_difference(tiny_sdxl_dir, tmp_path, method):
    adapter = make_adapter(tmp_path / method, tiny_sdxl_dir, method)
    result = export(adapter, tmp_path / "diff.safetensors", "full-diff", dtype="fp32")
    merged = merged_unet(tiny_sdxl_dir, adapter)
    unet = load_unet(tiny_sdxl_dir)
    assert apply_full_diff(unet, result.path) == result.layers == 64
    merged_state = merged.state_dict()
    for key, value in unet.state_dict().items():
        assert torch.equal(value, merged_state[key]), key  # W + diff is the merged weight, bit for bit
    assert torch.equal(unet_output(unet), unet_output(merged))
    lora = export(adapter, tmp_path / "lora.safetensors", "lora", energy=1.0, dtype="fp32")
    assert max(r.relative_error for r in lora.lora_layers) < 1e-3


def test_full_diff_in_fp16_is_the_difference_rounded(tiny_sdxl_dir, waveft_adapter, tmp_path):
    from safetensors.torch import load_file

    exact = load_file(export(waveft_adapter, tmp_path / "32.safetensors", "full-diff", dtype="fp32").path)
    for dtype_name, dtype in [("fp16", torch.float16), ("bf16", torch.bfloat16)]:
        rounded = load_file(export(waveft_adapter, tmp_path / f"{dtype_name}.safetensors", "full-diff",
                                   dtype=dtype_name).path)
        assert rounded.keys() == exact.keys()
        for key, value in exact.items():
            assert rounded[key].dtype == dtype and torch.equal(rounded[key], value.to(dtype)), key


def test_metadata_round_trips(tiny_sdxl_dir, waveft_adapter, tmp_path):
    from safetensors import safe_open

    with open(AdapterFolder(waveft_adapter).weights, "rb") as f:
        sha256 = hashlib.sha256(f.read()).hexdigest()
    with open(os.path.join(waveft_adapter, "waveft_run.json")) as f:
        run_info = json.load(f)
    for fmt, kwargs in [("full-diff", {}), ("lora", {"rank": 4})]:
        result = export(waveft_adapter, tmp_path / f"{fmt}.safetensors", fmt, **kwargs)
        with safe_open(result.path, framework="pt") as f:
            metadata = f.metadata()
        assert metadata == result.metadata
        assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
        assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
        assert metadata["waveft.method"] == "waveft" and metadata["waveft.format"] == fmt
        assert json.loads(metadata["waveft.trainable_parameters"]) == run_info["trainable_parameters"] == 64 * 300
        assert json.loads(metadata["waveft.budget"]) is None
        assert metadata["waveft.adapter_sha256"] == sha256
        assert metadata["waveft.base_model"] == tiny_sdxl_dir
    assert metadata["ss_network_dim"] == "4" and metadata["ss_network_alpha"] == "4.0"
    layer_errors = json.loads(metadata["waveft.layer_errors"])
    assert {r.name: r.rank for r in result.lora_layers} == {k: v["rank"] for k, v in layer_errors.items()}
    worst = max(v["relative_error"] for v in layer_errors.values())
    assert float(metadata["waveft.relative_error_worst"]) == pytest.approx(worst, abs=1e-6)


def test_sdxl_kohya_names_are_the_560_attention_projections(tmp_path):
    """On SDXL's real shapes (meta device, no weights): one kohya name per adapted layer, which diffusers' own
    kohya converter maps back to exactly the UNet's 560 attention projections."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers
    from diffusers.utils import convert_unet_state_dict_to_peft

    from tests.test_budget import SDXL_UNET_CONFIG
    from waveft.config import SDXL_ATTENTION_PROJECTIONS
    from waveft.export.source import attach_source_adapter, read_source_adapter, unet_skeleton

    base = tmp_path / "sdxl"
    unet = unet_skeleton(SDXL_UNET_CONFIG)
    unet.save_config(base / "unet")
    layers = attach_adapter(unet, AdapterConfig(type="lora")).layers  # the names do not depend on the method
    save_adapter(unet, str(tmp_path / "adapter"))
    exported = attach_source_adapter(read_source_adapter(str(tmp_path / "adapter")), str(base))
    names = [layer.kohya_name for layer in exported]
    assert len(names) == len(set(names)) == len(layers) == 560
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q" in names
    assert "lora_unet_up_blocks_0_attentions_2_transformer_blocks_9_attn2_to_out_0" in names
    assert {(x.out_features, x.in_features) for x in exported} == {(640, 640), (640, 2048), (1280, 1280), (1280, 2048)}
    tiny = {f"{name}.{part}": torch.zeros(1, 1) for name in names for part in ("lora_down.weight", "lora_up.weight")}
    converted, _ = _convert_non_diffusers_lora_to_diffusers(tiny)
    converted = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in converted.items()})
    mapped = {k.split(".lora_")[0] for k in converted}
    projections = {n for n, _ in unet.named_modules() if n.rsplit(".", 1)[-1] in SDXL_ATTENTION_PROJECTIONS
                   or n.endswith("to_out.0")}
    assert mapped == projections and len(mapped) == 560


# ---- bad input -------------------------------------------------------------------------------------------------


def run_cli(capsys, *args):
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    err = capsys.readouterr().err.strip()
    return exit_info.value.code, err


def assert_one_line_error(capsys, out, *args, contains=()):
    code, err = run_cli(capsys, "--out", str(out), *args)
    assert code == 2 and err.startswith("error: ") and "\n" not in err, err
    for text in contains:
        assert text in err, err
    assert not os.path.exists(out)
    assert not [p for p in os.listdir(os.path.dirname(out)) if p.startswith(".")]  # no temporary file left


def write_unet_config(path, tiny_sdxl_dir, **changes) -> str:
    """A UNet config folder (all the export reads of a base model): the tiny model's, with `changes`."""
    config = {k: v for k, v in load_unet(tiny_sdxl_dir).config.items() if not k.startswith("_")}
    os.makedirs(os.path.join(path, "unet"))
    with open(os.path.join(path, "unet", "config.json"), "w") as f:
        json.dump(dict(config, **changes), f)
    return str(path)


def test_bad_input_is_one_line_and_writes_nothing(tiny_sdxl_dir, waveft_adapter, tmp_path, capsys):
    out = tmp_path / "out" / "x.safetensors"
    out.parent.mkdir()
    assert_one_line_error(capsys, out, "--adapter", str(tmp_path), "--format", "lora",
                          contains=("is neither an adapter folder", "adapter_config.json"))
    assert_one_line_error(capsys, out, "--adapter", waveft_adapter, "--format", "lora", "--rank", "65",
                          contains=("--rank 65", "at most 64", "attn1.to_q"))
    for energy in ("0", "1.5", "-0.1"):
        assert_one_line_error(capsys, out, "--adapter", waveft_adapter, "--format", "lora", "--energy", energy,
                              contains=("--energy", "(0, 1]"))
    # A WaveFT adapter's saved tensors fit any model: the trainer's recorded layer shapes tell.
    wider = write_unet_config(tmp_path / "wider", tiny_sdxl_dir, block_out_channels=[32, 96],
                              attention_head_dim=[2, 6])
    assert_one_line_error(capsys, out, "--adapter", waveft_adapter, "--format", "full-diff", "--base", wider,
                          contains=("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "64x64", "96x96"))
    # Without a record, tensors whose shape follows the layer's tell: LoRA's A is r x in.
    lora = make_adapter(tmp_path / "lora", tiny_sdxl_dir, "lora", record_shapes=False)
    other_text = write_unet_config(tmp_path / "text", tiny_sdxl_dir, cross_attention_dim=80)
    assert_one_line_error(capsys, out, "--adapter", lora, "--format", "lora", "--base", other_text,
                          contains=("attn2.to_k", "[2, 64] in the adapter", "needs [2, 80]"))


def test_existing_output_is_kept_without_overwrite(waveft_adapter, tmp_path, capsys):
    out = tmp_path / "x.safetensors"
    out.write_bytes(b"earlier export")
    code, err = run_cli(capsys, "--adapter", waveft_adapter, "--format", "full-diff", "--out", str(out))
    assert code == 2 and "--overwrite" in err and "\n" not in err
    assert out.read_bytes() == b"earlier export"
    main(["--adapter", waveft_adapter, "--format", "full-diff", "--out", str(out), "--overwrite"])
    assert out.read_bytes() != b"earlier export"


def test_methods_without_a_weight_difference_are_refused_with_the_reason(tiny_sdxl_dir, tmp_path, capsys):
    from peft import IA3Config, get_peft_model

    out = tmp_path / "out" / "x.safetensors"
    out.parent.mkdir()
    ia3 = get_peft_model(load_unet(tiny_sdxl_dir), IA3Config(target_modules=["to_k", "to_v"], feedforward_modules=[]))
    ia3.save_pretrained(tmp_path / "ia3")
    assert_one_line_error(capsys, out, "--adapter", str(tmp_path / "ia3"), "--format", "full-diff", "--base",
                          tiny_sdxl_dir, contains=("IA3", "scales activations"))
    dora = make_adapter(tmp_path / "dora", tiny_sdxl_dir, "lora", peft={"use_dora": True})
    assert_one_line_error(capsys, out, "--adapter", dora, "--format", "lora", contains=("DoRA", "base weights"))


def test_interrupted_export_leaves_the_earlier_file(waveft_adapter, tmp_path, monkeypatch):
    import waveft.export.writer as export_module

    out = tmp_path / "x.safetensors"
    out.write_bytes(b"earlier export")
    calls = []

    def failing_delta(layer, adapter_name="default"):
        calls.append(layer.name)
        if len(calls) == 10:
            raise KeyboardInterrupt
        return real_delta(layer, adapter_name)

    real_delta = export_module.dense_delta
    monkeypatch.setattr(export_module, "dense_delta", failing_delta)
    with pytest.raises(KeyboardInterrupt):
        export(waveft_adapter, out, "full-diff", overwrite=True)
    assert out.read_bytes() == b"earlier export" and os.listdir(tmp_path) == ["x.safetensors"]
    shutil.rmtree(tmp_path)


# ---- the trainer's `export:` section ------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_run_exports_the_files_its_config_asks_for_and_its_card_says_where_they_load(
        tiny_sdxl_dir, subject_dir, tmp_path):
    from tests.test_training import tiny_cfg
    from waveft.train.loop import train

    cfg = tiny_cfg(tiny_sdxl_dir, subject_dir, tmp_path / "run", "train.max_steps=2",
                   "train.gradient_accumulation_steps=1", "train.checkpointing_steps=0",
                   "export.formats=[lora, full-diff, waveft]", "export.lora_rank=4", "export.dtype=fp32")
    train(cfg)
    adapter = tmp_path / "run" / "adapter"
    lora, diff = adapter / "toy_ball_waveft_lora_r4.safetensors", adapter / "toy_ball_waveft_full_diff.safetensors"
    assert lora.is_file() and diff.is_file() and (adapter / "toy_ball_waveft_native.safetensors").is_file()
    card = (adapter / "README.md").read_text()
    assert "`toy_ball_waveft_native.safetensors` | WaveFT's own file" in card and "custom_nodes/" in card
    assert "<lora:toy_ball_waveft_lora_r4:1>" in card and "Load LoRA" in card and "load_lora_weights" in card
    assert "`toy_ball_waveft_full_diff.safetensors` | full weight difference" in card
    unet = load_unet(tiny_sdxl_dir)
    apply_full_diff(unet, str(diff))
    torch.testing.assert_close(unet_output(unet), unet_output(merged_unet(tiny_sdxl_dir, str(adapter))))
    lora_pipeline_output(tiny_sdxl_dir, str(lora))  # loads in diffusers


@pytest.mark.parametrize("override, message", [
    ("export.formats=[lora, lora]", "names a format twice"),
    ("export.formats=[lycoris]", "export.formats[0]"),
    ("export.lora_energy=1.5", "'export.lora_energy' must be in (0, 1]"),
    ("export.lora_rank=0", "'export.lora_rank' must be > 0"),
    ("export.lora_rnk=4", "unknown key 'export.lora_rnk'"),
    ("adapter.type=lora", "'export.formats' names waveft, WaveFT's own file, but adapter.type is 'lora'"),
])
def test_export_settings_are_checked_with_the_config(override, message):
    from waveft.config import load_config
    from waveft.errors import UserError

    with pytest.raises(UserError, match=re.escape(message)):
        load_config(None, ("output_dir=x", "data.instance_dir=y", "export.formats=[lora, waveft]", override))


def test_a_lora_rank_too_large_for_a_layer_stops_the_run_before_training(tiny_sdxl_dir, subject_dir, tmp_path):
    from tests.test_training import tiny_cfg
    from waveft.errors import UserError
    from waveft.train.loop import train

    cfg = tiny_cfg(tiny_sdxl_dir, subject_dir, tmp_path / "run", "export.formats=[lora]", "export.lora_rank=65")
    with pytest.raises(UserError, match=r"export.lora_rank=65 is larger than layer .* at most 64"):
        train(cfg)
    assert not (tmp_path / "run" / "config.yaml").exists()
