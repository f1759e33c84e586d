"""WaveFT's own file (`--format waveft`) and the ComfyUI node that reads it, against ComfyUI's real code
(../shared/vendor/ComfyUI; skipped, saying so, where it is absent): on the tiny model, every adapted weight
ComfyUI patches equals stock PEFT's `merge_and_unload`, at strength 1 and 0.5, WaveFT and SHiRA mode, no key
left unloaded; the reader equals PEFT's difference for every wavelet the project accepts; bad input."""
import ast
import importlib.util
import json
import logging
import os

import pytest
import torch

from tests.comfyui_env import NODE_DIR
from tests.test_export import assert_one_line_error, export, load_unet, make_adapter
from waveft.export.source import kohya_name


def native_reader():
    """The node's torch-only reader, imported by path (the node package itself needs ComfyUI)."""
    spec = importlib.util.spec_from_file_location("waveft_native_reader", NODE_DIR / "waveft_native.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def peft_merged_state(tiny_sdxl_dir, adapter) -> dict:
    """Stock PEFT: `PeftModel.from_pretrained(...).merge_and_unload()`, no project code."""
    from peft import PeftModel

    return PeftModel.from_pretrained(load_unet(tiny_sdxl_dir), adapter).merge_and_unload().state_dict()


def adapted_weight_keys(adapter) -> dict[str, str]:
    """kohya name -> the diffusers weight key, for the adapter's layers (a key map like ComfyUI's)."""
    with open(os.path.join(adapter, "waveft_run.json")) as f:
        return {kohya_name(name): f"{name}.weight" for name in json.load(f)["layer_shapes"]}


def comfy_patched(comfy, native_file, key_map, base_state, strength=1.0):
    """Each weight as `comfy.lora.calculate_weight` patches it with what `comfy.lora.load_lora` made of the file."""
    tensors = comfy.utils.load_torch_file(str(native_file), safe_load=True)
    patches = comfy.lora.load_lora(tensors, key_map)
    return patches, {key: comfy.lora.calculate_weight([(strength, patch, 1.0, None, None)],
                                                      base_state[key].clone(), key)
                     for key, patch in patches.items()}


@pytest.mark.parametrize("mode", [{}, {"use_idwt": False}], ids=["waveft", "shira-mode"])
def test_comfyui_patches_every_weight_as_peft_merges_it(comfy, tiny_sdxl_dir, tmp_path, mode, caplog):
    adapter = make_adapter(tmp_path / "adapter", tiny_sdxl_dir, "waveft", peft=mode)
    native = export(adapter, tmp_path / "native.safetensors", "waveft").path
    key_map = adapted_weight_keys(adapter)
    base = load_unet(tiny_sdxl_dir).state_dict()
    merged = peft_merged_state(tiny_sdxl_dir, adapter)
    with caplog.at_level(logging.WARNING):
        patches, patched = comfy_patched(comfy, native, key_map, base)
    assert not [r.message for r in caplog.records if "not loaded" in r.message]  # every key of the file claimed
    assert sorted(patches) == sorted(key_map.values()) and len(patches) == 64
    assert all(type(p).__name__ == "WaveFTAdapter" for p in patches.values())
    _, halved = comfy_patched(comfy, native, key_map, base, strength=0.5)
    for key in key_map.values():
        delta = merged[key] - base[key]
        largest = delta.abs().max()
        assert largest > 1e-3, key  # a trained (nonzero) difference
        assert (patched[key] - merged[key]).abs().max() <= 1e-5 * largest, key
        assert (halved[key] - (base[key] + 0.5 * delta)).abs().max() <= 1e-5 * largest, key


@pytest.mark.parametrize("fmt, options, tolerance", [("full-diff", {"dtype": "fp32"}, 1e-5),
                                                     ("lora", {"energy": 1.0, "dtype": "fp32"}, 1e-3)])
def test_comfyui_loads_the_full_diff_and_lora_files_as_well(comfy, tiny_sdxl_dir, tmp_path, fmt, options, tolerance,
                                                            caplog):
    """What the README's table says ComfyUI reads: the full difference exactly, a full-rank LoRA to its SVD."""
    adapter = make_adapter(tmp_path / "adapter", tiny_sdxl_dir, "waveft")
    path = export(adapter, tmp_path / f"{fmt}.safetensors", fmt, **options).path
    key_map = adapted_weight_keys(adapter)
    base = load_unet(tiny_sdxl_dir).state_dict()
    merged = peft_merged_state(tiny_sdxl_dir, adapter)
    with caplog.at_level(logging.WARNING):
        patches, patched = comfy_patched(comfy, path, key_map, base)
    assert not [r.message for r in caplog.records if "not loaded" in r.message]
    assert sorted(patches) == sorted(key_map.values())
    for key in key_map.values():
        largest = (merged[key] - base[key]).abs().max()
        assert (patched[key] - merged[key]).abs().max() <= tolerance * largest, key


@pytest.mark.filterwarnings("ignore:wavelet .* stock PEFT cannot run it")
@pytest.mark.parametrize("use_idwt", [True, False])
def test_the_reader_gives_peft_s_difference_for_every_wavelet_the_project_accepts(use_idwt):
    """All of PEFT's WaveFT wavelets (db1-db38, sym2-sym20, coif1-coif17) on odd and even layer shapes: stock
    PEFT's `get_delta_weight` where PEFT runs the wavelet, the project's structured layer (the one that trains
    with it) elsewhere."""
    from peft import WaveFTConfig, get_peft_model
    from peft.tuners.waveft.constants import WAVELET_REDUCTIONS

    from waveft.adapters.structured_waveft import enable_structured_waveft
    from waveft.adapters.structured_waveft.layer import peft_runnable_wavelets
    from waveft.export.native import native_tensors
    from waveft.export.source import ExportLayer

    reader = native_reader()
    runnable = peft_runnable_wavelets()
    for wavelet in WAVELET_REDUCTIONS if use_idwt else ["db1"]:
        for out_features, in_features in [(63, 37), (40, 80)]:
            config = WaveFTConfig(target_modules=["0"], n_frequency=200, wavelet_family=wavelet, use_idwt=use_idwt,
                                  scaling=3.0)
            model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(in_features, out_features)), config)
            layer = model.base_model.model[0]
            torch.manual_seed(0)
            layer.waveft_spectrum["default"].data.normal_()
            with torch.no_grad():
                if wavelet not in runnable:
                    enable_structured_waveft(model)
                expected = layer.get_delta_weight("default")
                tensors = native_tensors([ExportLayer("0", layer, out_features, in_features)], config.to_dict())
            delta = reader.NativeLayer("lora_unet_0", tensors).delta()
            error = (delta - expected).abs().max() / expected.abs().max()
            assert error < 1e-5, (wavelet, out_features, in_features, float(error))


def test_the_paper_sized_file_is_near_the_peft_file(tmp_path):
    """SDXL's 560 layers at the paper's 2592 coefficients (shapes only, no weights): the native file stays
    within 2x of PEFT's (it is 1.05x: one float per coefficient, 4 location tables)."""
    from tests.test_budget import SDXL_UNET_CONFIG
    from waveft.adapters.attach import attach_adapter
    from waveft.config import AdapterConfig
    from waveft.export.source import unet_skeleton
    from waveft.io.adapter_folder import AdapterFolder, save_adapter

    base = tmp_path / "sdxl"
    unet = unet_skeleton(SDXL_UNET_CONFIG)
    unet.save_config(base / "unet")
    layers = attach_adapter(unet, AdapterConfig(type="waveft", peft={"n_frequency": 2592})).layers
    adapter = tmp_path / "adapter"
    save_adapter(unet, str(adapter))
    result = export(str(adapter), tmp_path / "native.safetensors", "waveft", base=str(base))
    peft_bytes = AdapterFolder(str(adapter)).weights_bytes()
    assert sum(layer.trainable_parameters for layer in layers) == 1_451_520 and result.layers == 560
    assert result.bytes < 2 * peft_bytes and result.metadata["waveft.location_tables"] == "4"
    assert result.metadata["ss_base_model_version"] == "sdxl_base_v1-0"


def test_export_says_the_native_size_beside_the_peft_file_and_writes_its_metadata(tiny_sdxl_dir, tmp_path):
    from safetensors import safe_open

    adapter = make_adapter(tmp_path / "adapter", tiny_sdxl_dir, "waveft")
    said = []
    result = export(adapter, tmp_path / "native.safetensors", "waveft", say=said.append)
    assert any("native WaveFT file" in line and "the PEFT weights file" in line for line in said), said
    with safe_open(result.path, framework="pt") as f:
        metadata = f.metadata()
    assert metadata["waveft.format"] == "waveft" and metadata["waveft.format_version"] == "1"
    assert metadata["waveft.wavelet"] == "db1" and metadata["waveft.use_idwt"] == "true"
    assert metadata["waveft.trainable_parameters"] == str(64 * 300) and metadata["waveft.dtype"] == "fp32"
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"


def test_the_node_package_needs_nothing_beyond_comfyui():
    """No import of this project, PEFT or PyWavelets anywhere in the package (ComfyUI installs none of them)."""
    imported = set()
    for path in NODE_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                imported.add(node.module.split(".")[0])
    assert imported <= {"torch", "comfy", "folder_paths", "logging", "weakref"}, imported


def test_comfyui_reads_the_package_s_registry_table(comfy):
    from comfy_config import config_parser

    config = config_parser.extract_node_configuration(str(NODE_DIR))
    assert config.project.name == "comfyui-waveft" and config.tool_comfy.display_name == "WaveFT adapters"
    assert config.project.dependencies == []


# ---- bad input -------------------------------------------------------------------------------------------------


def test_format_waveft_of_another_method_names_the_formats_it_has(tiny_sdxl_dir, tmp_path, capsys):
    out = tmp_path / "out" / "x.safetensors"
    out.parent.mkdir()
    for method in ("lora", "shira"):
        adapter = make_adapter(tmp_path / method, tiny_sdxl_dir, method)
        assert_one_line_error(capsys, out, "--adapter", adapter, "--format", "waveft",
                              contains=("--format waveft", "full-diff, lora", method))


def test_a_truncated_adapter_file_is_one_line(tiny_sdxl_dir, tmp_path, capsys):
    from waveft.io.adapter_folder import AdapterFolder

    adapter = make_adapter(tmp_path / "adapter", tiny_sdxl_dir, "waveft")
    weights = AdapterFolder(adapter).weights
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    out = tmp_path / "out" / "x.safetensors"
    out.parent.mkdir()
    assert_one_line_error(capsys, out, "--adapter", adapter, "--format", "waveft",
                          contains=(weights, "damaged adapter weights"))


def test_comfyui_logs_a_layer_of_another_shape_and_leaves_the_weight(comfy, tiny_sdxl_dir, tmp_path, caplog):
    adapter = make_adapter(tmp_path / "adapter", tiny_sdxl_dir, "waveft")
    native = export(adapter, tmp_path / "native.safetensors", "waveft").path
    key_map = adapted_weight_keys(adapter)
    name = next(iter(key_map))
    wider = {key_map[name]: torch.zeros(96, 96)}
    patches = comfy.lora.load_lora(comfy.utils.load_torch_file(native, safe_load=True), {name: key_map[name]},
                                   log_missing=False)
    with caplog.at_level(logging.WARNING):
        weight = comfy.lora.calculate_weight([(1.0, patches[key_map[name]], 1.0, None, None)],
                                             wider[key_map[name]].clone(), key_map[name])
    assert torch.equal(weight, wider[key_map[name]])
    (message,) = [r.getMessage() for r in caplog.records]
    assert name in message and "64x64 in the file" in message and "96x96" in message and "\n" not in message


def test_comfyui_logs_a_newer_format_version_once_and_applies_nothing(comfy, tiny_sdxl_dir, tmp_path, caplog):
    from safetensors.torch import load_file, save_file

    adapter = make_adapter(tmp_path / "adapter", tiny_sdxl_dir, "waveft")
    native = export(adapter, tmp_path / "native.safetensors", "waveft").path
    tensors = load_file(native)
    tensors["waveft.format_version"] = torch.tensor(2, dtype=torch.int32)
    save_file(tensors, tmp_path / "v2.safetensors")
    with caplog.at_level(logging.WARNING):
        patches = comfy.lora.load_lora(comfy.utils.load_torch_file(str(tmp_path / "v2.safetensors")),
                                       adapted_weight_keys(adapter))
    assert patches == {}
    (message,) = [r.getMessage() for r in caplog.records]  # one line, no "lora key not loaded" flood
    assert "format version 2" in message and "update the WaveFT custom node" in message


def test_load_waveft_node_refuses_a_file_that_is_not_waveft(comfy, tiny_sdxl_dir, tmp_path):
    import folder_paths
    import nodes

    lora = make_adapter(tmp_path / "lora", tiny_sdxl_dir, "lora")
    export(lora, tmp_path / "loras" / "plain_lora.safetensors", "lora", rank=2)
    folder_paths.add_model_folder_path("loras", str(tmp_path / "loras"))
    with pytest.raises(ValueError, match="plain_lora.safetensors is not a WaveFT file"):
        nodes.NODE_CLASS_MAPPINGS["LoadWaveFT"]().load_waveft(None, "plain_lora.safetensors", 1.0)
