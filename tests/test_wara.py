"""WaRA: the structured layer against a dense PyWavelets reference, PEFT registration, save/reload, training."""
import json
import os

import numpy as np
import pytest
import pywt
import torch

from tests.helpers import tiny_unet, unet_output
from waveft.adapters.wara import WaraConfig, WaraLinear
from waveft.config import AdapterConfig
from waveft.errors import UserError

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


# ---- a dense reference built from PyWavelets ---------------------------------------------------------------


def padded(length: int, wavelet: str) -> int:
    size = length + pywt.Wavelet(wavelet).dec_len - 2
    return size + size % 2


def crop(signal: np.ndarray, length: int, axis: int) -> np.ndarray:
    start = (signal.shape[axis] - length) // 2
    return np.take(signal, range(start, start + length), axis=axis)


def pywt_synthesis_matrix(length: int, wavelet: str) -> torch.Tensor:
    """(length x padded): column j < padded/2 is low-pass coefficient j, column padded/2 + j high-pass j;
    each column is pywt's single-level inverse DWT of that unit coefficient, centre-cropped to `length`."""
    half = padded(length, wavelet) // 2
    columns = []
    for band in ("lo", "hi"):
        for j in range(half):
            unit, zero = np.eye(half)[j], np.zeros(half)
            low, high = (unit, zero) if band == "lo" else (zero, unit)
            columns.append(crop(pywt.idwt(low, high, wavelet), length, 0))
    return torch.tensor(np.stack(columns, axis=1), dtype=torch.float64)


def pywt_idwt2(coefficients: np.ndarray, out_features: int, in_features: int, wavelet: str) -> np.ndarray:
    """WaRA's IDWT2 of an (H x W) grid: row halves are the output axis' (axis 0) bands, column halves the input's."""
    h, w = coefficients.shape[0] // 2, coefficients.shape[1] // 2
    bands = {"aa": coefficients[:h, :w], "ad": coefficients[:h, w:],
             "da": coefficients[h:, :w], "dd": coefficients[h:, w:]}
    return crop(crop(pywt.idwtn(bands, wavelet), out_features, 0), in_features, 1)


@pytest.mark.parametrize("wavelet", ["db1", "db3", "sym4"])
def test_reference_matrices_compose_to_pywt_idwt2(wavelet):
    out_features, in_features = 9, 14
    grid = np.random.default_rng(0).standard_normal((padded(out_features, wavelet), padded(in_features, wavelet)))
    rows, columns = pywt_synthesis_matrix(out_features, wavelet), pywt_synthesis_matrix(in_features, wavelet)
    separable = rows @ torch.tensor(grid) @ columns.T
    np.testing.assert_allclose(separable.numpy(), pywt_idwt2(grid, out_features, in_features, wavelet), atol=1e-12)


def wara_linear(out_features, in_features, wavelet, r=3, scaling=1.7, seed=0) -> WaraLinear:
    torch.manual_seed(seed)
    config = WaraConfig(r=r, scaling=scaling, wavelet_family=wavelet, init_weights=False, target_modules=["layer"])
    return WaraLinear(torch.nn.Linear(in_features, out_features), "default", config).double()


@pytest.mark.parametrize("wavelet", ["db1", "db2", "sym4", "coif1"])
@pytest.mark.parametrize("out_features, in_features", [(12, 10), (7, 9), (16, 33)])
def test_structured_forward_and_gradients_equal_the_dense_reference(wavelet, out_features, in_features):
    layer = wara_linear(out_features, in_features, wavelet)
    a, b = layer.wara_A["default"], layer.wara_B["default"]
    x = torch.randn(2, 5, in_features, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(2, 5, out_features, dtype=torch.float64)

    y = layer(x)
    grads = torch.autograd.grad(y, (x, a, b), upstream)

    rows, columns = pywt_synthesis_matrix(out_features, wavelet), pywt_synthesis_matrix(in_features, wavelet)
    dense_delta = 1.7 * rows @ (b @ a) @ columns.T
    y_reference = layer.base_layer(x) + x @ dense_delta.T
    grads_reference = torch.autograd.grad(y_reference, (x, a, b), upstream)

    torch.testing.assert_close(y, y_reference, rtol=0, atol=1e-12)
    for got, expected in zip(grads, grads_reference):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(layer.get_delta_weight("default"), dense_delta.detach(), rtol=0, atol=1e-12)


def test_merge_and_unmerge_restore_the_outputs():
    layer = wara_linear(16, 24, "db2")
    x = torch.randn(4, 24, dtype=torch.float64)
    adapted = layer(x)
    base_weight = layer.base_layer.weight.detach().clone()
    layer.merge()
    torch.testing.assert_close(layer(x), adapted)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, base_weight)


def test_mixed_precision_keeps_fp32_factors_and_gradients():
    torch.manual_seed(0)
    config = WaraConfig(r=2, wavelet_family="db2", init_weights=False, target_modules=["layer"])
    layer = WaraLinear(torch.nn.Linear(24, 16).to(torch.bfloat16), "default", config)
    layer.wara_A["default"].data = layer.wara_A["default"].data.float()
    layer.wara_B["default"].data = layer.wara_B["default"].data.float()
    x = torch.randn(3, 24, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16
    assert layer.wara_A["default"].grad.dtype == torch.float32 and layer.wara_B["default"].grad.dtype == torch.float32


def test_bad_settings_are_refused_naming_the_key():
    from waveft.adapters.methods import build_peft_config

    with pytest.raises(UserError, match="wavelet_family.*'nope'"):
        build_peft_config(AdapterConfig(type="wara", peft={"wavelet_family": "nope"}))
    with pytest.raises(UserError, match="`r` must be a positive integer"):
        build_peft_config(AdapterConfig(type="wara", peft={"r": 0}))


# ---- on the tiny SDXL UNet through PEFT ----------------------------------------------------------------------


def test_wara_attaches_trains_saves_and_reloads_through_peft(tmp_path):
    from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict

    from waveft.adapters.attach import attach_adapter
    from waveft.io.adapter_folder import save_adapter

    adapter = AdapterConfig(type="wara", peft={"r": 2, "wavelet_family": "db2", "scaling": 4.0})
    unet = tiny_unet()
    with torch.no_grad():
        base_output = unet_output(unet)
    layers = attach_adapter(unet, adapter).layers
    assert len(layers) == 64
    # db2 pads each axis by 2: r * (H + W) per layer
    assert all(layer.trainable_parameters == 2 * (layer.out_features + 2 + layer.in_features + 2) for layer in layers)
    with torch.no_grad():
        torch.testing.assert_close(unet_output(unet), base_output, rtol=0, atol=0)  # B starts at zero

    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    for _ in range(3):
        unet_output(unet).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        trained = unet_output(unet)
    assert (trained - base_output).abs().max() > 1e-4

    save_adapter(unet, str(tmp_path / "adapter"))
    with open(tmp_path / "adapter" / "adapter_config.json") as f:
        assert json.load(f)["peft_type"] == "WARA"

    reloaded = PeftModel.from_pretrained(tiny_unet(), str(tmp_path / "adapter"))
    with torch.no_grad():
        torch.testing.assert_close(unet_output(reloaded.base_model.model), trained, rtol=0, atol=0)
        torch.testing.assert_close(unet_output(reloaded.merge_and_unload()), trained, rtol=1e-4, atol=1e-5)

    fresh = tiny_unet()
    attach_adapter(fresh, adapter)
    set_peft_model_state_dict(fresh, get_peft_model_state_dict(unet))
    with torch.no_grad():
        torch.testing.assert_close(unet_output(fresh), trained, rtol=0, atol=0)


def test_wara_through_get_peft_model_saves_and_loads(tmp_path):
    from peft import PeftModel, get_peft_model

    config = WaraConfig(r=1, wavelet_family="sym2", init_weights=False, target_modules=TARGETS)
    model = get_peft_model(tiny_unet(), config)
    with torch.no_grad():
        expected = unet_output(model.base_model.model)
    model.save_pretrained(str(tmp_path))
    assert os.path.isfile(tmp_path / "adapter_model.safetensors")
    reloaded = PeftModel.from_pretrained(tiny_unet(), str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(unet_output(reloaded.base_model.model), expected, rtol=0, atol=0)


def test_generating_under_inference_mode_then_training_in_the_same_process():
    """WaRA's cached operators and block orders are safe to build under `torch.inference_mode()` and reuse in
    training (shapes no other test uses, so the process-wide caches are first filled here)."""
    layer = wara_linear(19, 29, "sym5").float()
    x = torch.randn(3, 29)
    with torch.inference_mode():
        layer(x)
        layer.get_delta_weight("default")
    layer(x).square().mean().backward()
    layer.get_delta_weight("default").square().sum().backward()
    factors = (layer.wara_A["default"], layer.wara_B["default"])
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in factors)
