"""Adapter folders with text-encoder adapters (text_encoder/, text_encoder_2/: stock PEFT folders) on the tiny model,
made without the trainer: generation merges them (equal to merging by hand with stock PEFT, different from the
UNet alone), and every export format carries them under kohya's `lora_te1_` / `lora_te2_` names, which ComfyUI's
real CLIP loader (`load_lora_for_models`, CLIP strength) applies as exactly PEFT's difference and diffusers'
`load_lora_weights` reads."""
import json
import logging
import shutil

import pytest
import torch

from tests.helpers import load_text_encoder
from tests.test_export import export, make_adapter
from waveft.io.adapter_folder import AdapterFolder

TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
KOHYA = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
LAYERS_PER_ENCODER = 3 * len(TARGETS)  # the tiny encoders' 3 layers
PROMPT = "a zjw ball on the beach"


def peft_config(method):
    from peft import LoraConfig, WaveFTConfig

    if method == "lora":
        return LoraConfig(r=2, lora_alpha=2, target_modules=TARGETS)
    return WaveFTConfig(n_frequency=100, scaling=5.0, target_modules=TARGETS)


def add_text_encoder_adapters(adapter, tiny_sdxl_dir, method) -> None:
    """Stock PEFT's adapter of `method` on each tiny CLIP encoder, with random (trained-like) weights, saved as
    PeftModel.save_pretrained saves it into the adapter folder's subfolder."""
    from peft import get_peft_model

    for seed, component in enumerate(AdapterFolder.TEXT_ENCODERS):
        model = get_peft_model(load_text_encoder(tiny_sdxl_dir, component), peft_config(method))
        torch.manual_seed(seed)
        for param in model.parameters():
            if param.requires_grad:
                param.data.normal_(0, 0.1)
        model.save_pretrained(AdapterFolder(adapter).text_encoder(component).root)


def adapter_with_encoders(method, tiny_sdxl_dir, tmp_path_factory) -> str:
    """A UNet adapter (as the export tests make it) plus both text encoders' adapters, of one method."""
    path = make_adapter(tmp_path_factory.mktemp("te") / method, tiny_sdxl_dir, method)
    add_text_encoder_adapters(path, tiny_sdxl_dir, method)
    return path


@pytest.fixture(scope="module", params=["waveft", "lora"])
def adapter(request, tiny_sdxl_dir, tmp_path_factory) -> str:
    return adapter_with_encoders(request.param, tiny_sdxl_dir, tmp_path_factory)


@pytest.fixture(scope="module")
def waveft_adapter(tiny_sdxl_dir, tmp_path_factory) -> str:
    """The WaveFT one alone: what WaveFT's own file (and the Load WaveFT node) holds."""
    return adapter_with_encoders("waveft", tiny_sdxl_dir, tmp_path_factory)


def peft_merged_encoder(tiny_sdxl_dir, adapter, component):
    """Stock PEFT: `PeftModel.from_pretrained(encoder, subfolder).merge_and_unload()`, no project code."""
    from peft import PeftModel

    subfolder = AdapterFolder(adapter).text_encoder(component).root
    return PeftModel.from_pretrained(load_text_encoder(tiny_sdxl_dir, component), subfolder).merge_and_unload()


# ---- generation ------------------------------------------------------------------------------------------------


def generate(pipe):
    """The prompt's embeddings and a 2-step image, at a fixed seed."""
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(PROMPT, do_classifier_free_guidance=False)
        image = pipe(PROMPT, num_inference_steps=2, height=64, width=64, output_type="pt",
                     generator=torch.Generator().manual_seed(0)).images
    return embeds, pooled, image


def test_generation_merges_the_text_encoder_adapters(tiny_sdxl_dir, adapter, tmp_path):
    from diffusers import StableDiffusionXLPipeline
    from peft import PeftModel

    from waveft.infer.pipeline import load_pipeline

    unet_only = tmp_path / "unet-only"
    shutil.copytree(adapter, unet_only, ignore=shutil.ignore_patterns(*AdapterFolder.TEXT_ENCODERS))
    with_encoders = generate(load_pipeline(tiny_sdxl_dir, adapter, device="cpu"))
    without = generate(load_pipeline(tiny_sdxl_dir, str(unet_only), device="cpu"))
    # By hand, with stock PEFT: each of the three models merged.
    by_hand = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    by_hand.unet = PeftModel.from_pretrained(by_hand.unet, adapter).merge_and_unload()
    for component in AdapterFolder.TEXT_ENCODERS:
        setattr(by_hand, component, peft_merged_encoder(tiny_sdxl_dir, adapter, component))
    by_hand.scheduler = load_pipeline(tiny_sdxl_dir, device="cpu").scheduler  # the same default scheduler
    by_hand.set_progress_bar_config(disable=True)
    expected = generate(by_hand)
    for got, reference, other in zip(with_encoders, expected, without, strict=True):
        torch.testing.assert_close(got, reference, rtol=1e-4, atol=1e-5)
        assert (got - other).abs().max() > 1e-3  # the encoders' adapters change the prompt's embeddings, the image


# ---- exports -----------------------------------------------------------------------------------------------------


def method_of(adapter) -> str:
    return AdapterFolder(adapter).read_run_record()["method"]


def formats_of(method):
    return ["full-diff", "lora"] + (["waveft"] if method == "waveft" else [])


EXPORT_OPTIONS = {"full-diff": ({"dtype": "fp32"}, 1e-5), "lora": ({"energy": 1.0, "dtype": "fp32"}, 1e-3),
                  "waveft": ({}, 1e-5)}


@pytest.fixture(scope="module")
def exported(adapter, tmp_path_factory) -> dict:
    """{format: ExportResult} of `adapter` in each format it has (fp32; the LoRA at full rank)."""
    folder = tmp_path_factory.mktemp("exports")
    return {fmt: export(adapter, folder / f"{fmt}.safetensors", fmt, **EXPORT_OPTIONS[fmt][0])
            for fmt in formats_of(method_of(adapter))}


def test_every_format_names_the_encoders_layers_the_kohya_way(exported):
    from safetensors import safe_open

    for fmt, result in exported.items():
        with safe_open(result.path, framework="pt") as f:
            layers = {key.split(".")[0] for key in f.keys()}  # noqa: SIM118 (safe_open is no dict)
        for component, prefix in KOHYA.items():
            names = {name for name in layers if name.startswith(prefix)}
            assert len(names) == LAYERS_PER_ENCODER, (fmt, component, sorted(names))
            assert f"{prefix}text_model_encoder_layers_0_self_attn_q_proj" in names
            assert f"{prefix}text_model_encoder_layers_2_self_attn_out_proj" in names
        assert json.loads(result.metadata["waveft.layers_per_model"]) == {
            "unet": 64, "text_encoder": LAYERS_PER_ENCODER, "text_encoder_2": LAYERS_PER_ENCODER}
        assert result.layers == 64 + 2 * LAYERS_PER_ENCODER


class TinySDXLClip(torch.nn.Module):
    """The tiny encoders in the weight layout of ComfyUI's SDXL CLIP (`comfy.sdxl_clip.SDXLClipModel`: clip_l,
    clip_g), so that ComfyUI's own `model_lora_keys_clip` maps kohya's text-encoder names onto them."""

    tiny_sdxl_dir = None

    def __init__(self, device=None, dtype=None, model_options=None):
        super().__init__()
        self.clip_l, self.clip_g = torch.nn.Module(), torch.nn.Module()
        self.clip_l.transformer, self.clip_g.transformer = torch.nn.Module(), None
        # transformers 5's CLIPTextModel lacks the `text_model` level that ComfyUI's (and the checkpoint's) has.
        self.clip_l.transformer.text_model = load_text_encoder(self.tiny_sdxl_dir, "text_encoder")
        self.clip_g.transformer = load_text_encoder(self.tiny_sdxl_dir, "text_encoder_2")
        self.dtypes = {torch.float32}


def comfy_clip(tiny_sdxl_dir):
    """A real `comfy.sd.CLIP` (ModelPatcher and all) around the tiny encoders."""
    import comfy.sd

    class Target:
        params = {}
        clip = type("Clip", (TinySDXLClip,), {"tiny_sdxl_dir": tiny_sdxl_dir})
        tokenizer = staticmethod(lambda embedding_directory=None, tokenizer_data=None: None)

    return comfy.sd.CLIP(Target())


def stock_load_lora(path, clip, strength_clip):
    """ComfyUI's "Load LoRA" on the CLIP alone: `load_lora_for_models` (the model's strength does not matter)."""
    import comfy.sd
    import comfy.utils

    return comfy.sd.load_lora_for_models(None, clip, comfy.utils.load_torch_file(str(path), safe_load=True),
                                         0.0, strength_clip)[1]


def comfy_patched_clip(tiny_sdxl_dir, path, strength_clip, load=stock_load_lora):
    """`load(path, clip, strength_clip)` on a fresh tiny CLIP (the patcher changes the weights in place), then the
    weights as its patcher sets them: ({"text_encoder" | "text_encoder_2": {transformers key: weight}}, how many
    patches it holds)."""
    patched = load(path, comfy_clip(tiny_sdxl_dir), strength_clip)
    for key in patched.patcher.patches:  # what its patcher does to each weight when it loads the CLIP
        patched.patcher.patch_weight_to_device(key)
    state = patched.cond_stage_model.state_dict()
    prefixes = {"text_encoder": "clip_l.transformer.text_model.", "text_encoder_2": "clip_g.transformer."}
    weights = {c: {k.removeprefix(p): v for k, v in state.items() if k.startswith(p)} for c, p in prefixes.items()}
    return weights, len(patched.patcher.patches)


def assert_patched_by_the_difference(patched, merged, base, strength, tolerance, what) -> None:
    """Each CLIP weight is the base one plus `strength` times PEFT's difference, and every adapted layer moved."""
    for component in AdapterFolder.TEXT_ENCODERS:
        changed = 0
        for key, weight in base[component].items():
            delta = merged[component][key] - weight
            largest = delta.abs().max()
            changed += bool(largest > 0)
            got = patched[component][key] - weight
            assert (got - strength * delta).abs().max() <= tolerance * max(largest, 1e-3), (what, key)
        assert changed == LAYERS_PER_ENCODER, (what, component)


def encoder_states(tiny_sdxl_dir, adapter):
    """(stock PEFT's merged encoders, the base encoders): {component: state dict} each."""
    merged = {c: peft_merged_encoder(tiny_sdxl_dir, adapter, c).state_dict() for c in AdapterFolder.TEXT_ENCODERS}
    return merged, {c: load_text_encoder(tiny_sdxl_dir, c).state_dict() for c in AdapterFolder.TEXT_ENCODERS}


def test_comfyui_s_clip_strength_applies_the_encoders_difference(comfy, tiny_sdxl_dir, adapter, exported, caplog):
    merged, base = encoder_states(tiny_sdxl_dir, adapter)
    for fmt, result in exported.items():
        path, tolerance = result.path, EXPORT_OPTIONS[fmt][1]
        for strength in (1.0, 0.5):
            with caplog.at_level(logging.WARNING):
                patched, patches = comfy_patched_clip(tiny_sdxl_dir, path, strength)
            # Only the UNet's layers are left unloaded: no model was given here.
            assert not [r.getMessage() for r in caplog.records if "lora_te" in r.getMessage()], fmt
            caplog.clear()
            assert patches == 2 * LAYERS_PER_ENCODER, fmt
            assert_patched_by_the_difference(patched, merged, base, strength, tolerance, fmt)


def test_load_waveft_node_applies_the_encoders_to_a_connected_clip(comfy, tiny_sdxl_dir, waveft_adapter, tmp_path):
    import folder_paths
    import nodes

    (tmp_path / "loras").mkdir()
    export(waveft_adapter, tmp_path / "loras" / "te_native.safetensors", "waveft")
    folder_paths.add_model_folder_path("loras", str(tmp_path / "loras"))
    node = nodes.NODE_CLASS_MAPPINGS["LoadWaveFT"]()

    def load(path, clip, strength_clip):
        model, patched = node.load_waveft(None, "te_native.safetensors", 1.0, clip=clip, strength_clip=strength_clip)
        assert model is None
        return patched

    merged, base = encoder_states(tiny_sdxl_dir, waveft_adapter)
    patched, patches = comfy_patched_clip(tiny_sdxl_dir, None, 0.5, load)
    assert patches == 2 * LAYERS_PER_ENCODER
    assert_patched_by_the_difference(patched, merged, base, 0.5, 1e-5, "Load WaveFT")
    assert node.load_waveft(None, "te_native.safetensors", 1.0) == (None, None)  # no CLIP: the model alone


def test_sdxl_s_encoders_names_are_comfyui_s_sdxl_clip_keys(comfy, tmp_path):
    """On SDXL's real encoders (12 and 32 layers; configs only, meta device): every kohya name of an adapter on
    their attention projections is a key of ComfyUI's own SDXL CLIP (`model_lora_keys_clip` on
    `comfy.sdxl_clip.SDXLClipModel`), CLIP-L's as `lora_te1_`, CLIP-G's as `lora_te2_`."""
    import comfy.sdxl_clip
    from peft import LoraConfig, get_peft_model
    from transformers import CLIPTextConfig

    from tests.test_budget import SDXL_UNET_CONFIG
    from waveft.adapters.attach import attach_adapter
    from waveft.config import AdapterConfig
    from waveft.export.source import attach_source_adapter, read_source_adapter, text_encoder_skeleton, unet_skeleton
    from waveft.fixtures.tiny import SDXL_TEXT_ENCODER_2_CONFIG, SDXL_TEXT_ENCODER_CONFIG
    from waveft.io.adapter_folder import save_adapter

    base, adapter = tmp_path / "sdxl", tmp_path / "adapter"
    unet = unet_skeleton(SDXL_UNET_CONFIG)
    unet.save_config(base / "unet")
    attach_adapter(unet, AdapterConfig(type="lora"))
    save_adapter(unet, str(adapter))
    configs = {"text_encoder": SDXL_TEXT_ENCODER_CONFIG, "text_encoder_2": SDXL_TEXT_ENCODER_2_CONFIG}
    for component, config in configs.items():
        config = CLIPTextConfig(**config)
        config.save_pretrained(base / component)
        encoder = get_peft_model(text_encoder_skeleton(config, component), LoraConfig(r=1, target_modules=TARGETS))
        encoder.save_pretrained(AdapterFolder(str(adapter)).text_encoder(component).root)
    layers = attach_source_adapter(read_source_adapter(str(adapter)), str(base))
    names = {component: [x.kohya_name for x in layers if x.model == component] for component in configs}
    comfy_keys = comfy.lora.model_lora_keys_clip(comfy.sdxl_clip.SDXLClipModel(device="meta"), {})
    for component, layer_count in (("text_encoder", 12), ("text_encoder_2", 32)):
        assert len(set(names[component])) == layer_count * len(TARGETS)
        assert all(name.startswith(KOHYA[component]) and name in comfy_keys for name in names[component])
        clip = "clip_l" if component == "text_encoder" else "clip_g"
        assert {comfy_keys[name].split(".")[0] for name in names[component]} == {clip}


def test_diffusers_loads_the_encoders_of_the_kohya_lora(tiny_sdxl_dir, adapter, exported):
    from diffusers import StableDiffusionXLPipeline

    path = exported["lora"].path
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    base = pipe.encode_prompt(PROMPT, do_classifier_free_guidance=False)
    pipe.load_lora_weights(path)
    loaded = pipe.encode_prompt(PROMPT, do_classifier_free_guidance=False)
    for component in AdapterFolder.TEXT_ENCODERS:
        setattr(pipe, component, peft_merged_encoder(tiny_sdxl_dir, adapter, component))
    pipe.unload_lora_weights()
    expected = pipe.encode_prompt(PROMPT, do_classifier_free_guidance=False)
    for got, reference, before in zip(loaded[::2], expected[::2], base[::2], strict=True):
        torch.testing.assert_close(got, reference, rtol=1e-3, atol=1e-4)
        assert (got - before).abs().max() > 1e-3


def test_a_unet_only_adapter_exports_as_before(adapter, exported, tmp_path):
    """The same UNet adapter without its subfolders: the UNet's tensors bit for bit, no text-encoder key."""
    from safetensors.torch import load_file

    unet_only = tmp_path / "unet-only"
    shutil.copytree(adapter, unet_only, ignore=shutil.ignore_patterns(*AdapterFolder.TEXT_ENCODERS))
    for fmt, result in exported.items():
        alone = export(str(unet_only), tmp_path / f"alone-{fmt}.safetensors", fmt, **EXPORT_OPTIONS[fmt][0])
        both = load_file(result.path)
        tensors = load_file(alone.path)
        assert not [key for key in tensors if key.startswith("lora_te")], fmt
        # The native file's location tables are shared: the encoders' layers may add tables, never change one.
        extra = both.keys() - tensors.keys()
        assert tensors.keys() <= both.keys() and all(k.startswith(("lora_te", "waveft_locations.")) for k in extra)
        assert all(torch.equal(value, both[key]) for key, value in tensors.items()), fmt
        assert json.loads(alone.metadata["waveft.layers_per_model"]) == {"unet": 64}
        assert "waveft.text_encoder_sha256" not in alone.metadata


# ---- bad input -------------------------------------------------------------------------------------------------


def test_a_damaged_or_foreign_text_encoder_adapter_is_one_line(tiny_sdxl_dir, adapter, tmp_path, capsys):
    from tests.test_export import assert_one_line_error
    from waveft.errors import UserError
    from waveft.infer.pipeline import load_pipeline

    out = tmp_path / "out" / "x.safetensors"
    out.parent.mkdir()
    damaged = tmp_path / "damaged"
    shutil.copytree(adapter, damaged)
    weights = AdapterFolder(str(damaged)).text_encoder("text_encoder_2").weights
    with open(weights, "r+b") as f:
        f.truncate(f.seek(0, 2) // 2)
    assert_one_line_error(capsys, out, "--adapter", str(damaged), "--format", "full-diff",
                          contains=(weights, "damaged adapter weights"))
    with pytest.raises(UserError, match="damaged adapter weights"):
        load_pipeline(tiny_sdxl_dir, str(damaged), device="cpu")
    # The trainer's record of an encoder's layer shapes is checked against the base's encoder, as the UNet's is.
    foreign = tmp_path / "foreign"
    shutil.copytree(adapter, foreign)
    record = AdapterFolder(str(foreign)).read_run_record()
    record["text_encoders"] = {"text_encoder": {"layer_shapes": {"encoder.layers.0.self_attn.q_proj": [48, 32]}}}
    with open(AdapterFolder(str(foreign)).run_record, "w") as f:
        json.dump(record, f)
    assert_one_line_error(capsys, out, "--adapter", str(foreign), "--format", "full-diff",
                          contains=("text_encoder layer encoder.layers.0.self_attn.q_proj is 48x32", "32x32"))
