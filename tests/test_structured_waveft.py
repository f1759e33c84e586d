"""The structured WaveFT layer against PEFT's WaveFTLinear: outputs, gradients, adapters, dtypes, files."""
import copy
import os
import warnings

import numpy as np
import pytest
import pywt
import torch
from peft import PeftModel, WaveFTConfig, get_peft_model, get_peft_model_state_dict
from peft.tuners.waveft.constants import WAVELET_REDUCTIONS
from peft.tuners.waveft.layer import WaveFTLinear
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from tests.helpers import tiny_unet, unet_output
from waveft import enable_structured_waveft
from waveft.adapters.structured_waveft import disable_structured_waveft
from waveft.adapters.structured_waveft.layer import StructuredWaveFTLinear, peft_compatible_filters
from waveft.adapters.wavelet_ops import (
    SynthesisAxis,
    idwt2,
    padded_length,
    synthesis_axis,
    wavelet_filters,
)
from waveft.errors import UserError

# Wavelets stock PEFT can run: its filter table (coif5 there has the wrong length and fails in PEFT itself).
PEFT_RUNNABLE = [f"db{i}" for i in range(1, 11)] + [f"sym{i}" for i in range(2, 11)] + [f"coif{i}" for i in range(1, 5)]
SHAPES = [(16, 16), (17, 9), (9, 31), (64, 40)]  # (out, in)


def waveft_config(**kwargs) -> WaveFTConfig:
    kwargs.setdefault("n_frequency", 40)
    return WaveFTConfig(init_weights=False, scaling=kwargs.pop("scaling", 3.0), **kwargs)


def peft_layer(out_features, in_features, dtype=torch.float32, **config) -> WaveFTLinear:
    base = torch.nn.Linear(in_features, out_features).to(dtype).requires_grad_(False)
    cfg = waveft_config(**config)
    n_frequency = min(cfg.n_frequency, out_features * in_features)
    return WaveFTLinear(base, "default", config=cfg, n_frequency=n_frequency)


def structured_copy(layer: WaveFTLinear) -> WaveFTLinear:
    structured = copy.deepcopy(layer)
    structured.__class__ = StructuredWaveFTLinear
    return structured


def forward_backward(layer, x, grad_out):
    x = x.detach().clone().requires_grad_(True)
    for spectrum in layer.waveft_spectrum.values():
        spectrum.grad = None
    y = layer(x)
    y.backward(grad_out)
    return y.detach(), x.grad, {name: p.grad for name, p in layer.waveft_spectrum.items()}


def assert_same_training_step(reference, structured, x, rtol=1e-5, atol=1e-6):
    grad_out = torch.randn(*x.shape[:-1], reference.out_features, dtype=x.dtype)
    y_ref, dx_ref, ds_ref = forward_backward(reference, x, grad_out)
    y, dx, ds = forward_backward(structured, x, grad_out)
    torch.testing.assert_close(y, y_ref, rtol=rtol, atol=atol)
    torch.testing.assert_close(dx, dx_ref, rtol=rtol, atol=atol)
    assert ds.keys() == ds_ref.keys()
    for name in ds_ref:
        if ds_ref[name] is None:
            assert ds[name] is None
        else:
            scale = ds_ref[name].abs().max().item()
            torch.testing.assert_close(ds[name], ds_ref[name], rtol=rtol, atol=atol * max(scale, 1.0))


@pytest.mark.parametrize("wavelet", PEFT_RUNNABLE)
def test_matches_peft_for_every_wavelet_peft_runs(wavelet):
    torch.manual_seed(0)
    for out_features, in_features in SHAPES:
        reference = peft_layer(out_features, in_features, wavelet_family=wavelet)
        structured = structured_copy(reference)
        assert_same_training_step(reference, structured, torch.randn(3, 5, in_features))
        torch.testing.assert_close(
            structured.get_delta_weight("default"), reference.get_delta_weight("default"), rtol=1e-5, atol=1e-6
        )


@pytest.mark.parametrize("shape", SHAPES + [(1, 1), (2, 3)])
def test_matches_peft_without_idwt(shape):
    torch.manual_seed(1)
    reference = peft_layer(*shape, use_idwt=False)
    assert_same_training_step(reference, structured_copy(reference), torch.randn(7, shape[1]))


@pytest.mark.parametrize("use_idwt", [True, False])
def test_empty_batch(use_idwt):
    reference = peft_layer(16, 24, wavelet_family="db2", use_idwt=use_idwt)
    assert_same_training_step(reference, structured_copy(reference), torch.randn(0, 24))


def test_transformers_conv1d_base_layer():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(15)
    base = Conv1D(20, 12).requires_grad_(False)  # weight stored (in, out): fan_in_fan_out
    config = waveft_config(wavelet_family="db3", fan_in_fan_out=True)
    reference = WaveFTLinear(base, "default", config=config, n_frequency=40)
    structured = structured_copy(reference)
    assert_same_training_step(reference, structured, torch.randn(3, 12))
    for layer in (reference, structured):
        layer.merge()
    torch.testing.assert_close(structured.base_layer.weight, reference.base_layer.weight, rtol=1e-5, atol=1e-6)


def test_several_adapters_active_sets_and_disable():
    torch.manual_seed(2)
    reference = peft_layer(24, 20, wavelet_family="db1")
    reference.update_layer("wide", 90, waveft_config(wavelet_family="db4", random_loc_seed=5, scaling=2.0))
    reference.update_layer("plain", 30, waveft_config(use_idwt=False, random_loc_seed=9))
    structured = structured_copy(reference)
    x = torch.randn(6, 20)
    for active in (["default"], ["default", "wide"], ["wide", "plain"], ["default", "wide", "plain"]):
        for layer in (reference, structured):
            layer.set_adapter(active)
        assert_same_training_step(reference, structured, x)
    for layer in (reference, structured):
        layer.enable_adapters(False)
    torch.testing.assert_close(structured(x), reference(x))
    torch.testing.assert_close(structured(x), reference.base_layer(x))


def test_merge_and_unmerge():
    torch.manual_seed(3)
    reference = peft_layer(18, 26, wavelet_family="sym3")
    reference.update_layer("other", 50, waveft_config(wavelet_family="db1", random_loc_seed=1))
    reference.set_adapter(["default", "other"])
    structured = structured_copy(reference)
    x = torch.randn(4, 26)
    unmerged = structured(x)
    original_weight = structured.base_layer.weight.clone()
    for layer in (reference, structured):
        layer.merge()
    torch.testing.assert_close(structured.base_layer.weight, reference.base_layer.weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(structured(x), unmerged, rtol=1e-5, atol=1e-5)
    structured.unmerge()
    torch.testing.assert_close(structured.base_layer.weight, original_weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(structured(x), unmerged)


@pytest.mark.parametrize("spectrum_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("base_dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base(base_dtype, spectrum_dtype):
    torch.manual_seed(4)
    reference = peft_layer(40, 48, dtype=base_dtype, wavelet_family="db2", n_frequency=88)
    # PEFT creates the spectrum in the base dtype; get_peft_model(autocast_adapter_dtype=True) makes it fp32.
    reference.waveft_spectrum["default"] = torch.nn.Parameter(reference.waveft_spectrum["default"].to(spectrum_dtype))
    structured = structured_copy(reference)
    x = torch.randn(5, 48, dtype=base_dtype)
    y_ref, y = reference(x), structured(x)
    assert y.dtype == y_ref.dtype == base_dtype
    scale = y_ref.abs().max().item()
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=2e-2, atol=2e-2 * scale)
    y.float().square().sum().backward()
    assert structured.waveft_spectrum["default"].grad.dtype == spectrum_dtype


def test_under_autocast():
    torch.manual_seed(14)
    reference = peft_layer(32, 48, wavelet_family="db1", n_frequency=80)
    structured = structured_copy(reference)
    x = torch.randn(6, 48)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ref, y = reference(x), structured(x)
        y.float().square().sum().backward()
    assert y.dtype == y_ref.dtype
    scale = y_ref.abs().max().item()
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=2e-2, atol=2e-2 * scale)
    assert structured.waveft_spectrum["default"].grad.dtype == torch.float32


def test_saved_adapters_are_interchangeable(tmp_path):
    class TwoLayers(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q = torch.nn.Linear(12, 20)
            self.v = torch.nn.Linear(20, 12)

        def forward(self, x):
            return self.v(torch.tanh(self.q(x)))

    def base_model():
        torch.manual_seed(5)
        return TwoLayers()

    config = WaveFTConfig(target_modules=["q", "v"], n_frequency=32, wavelet_family="db3", scaling=4.0)
    x = torch.randn(3, 12)

    def train(model, steps=3):
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(steps):
            optimizer.zero_grad()
            model(x).square().mean().backward()
            optimizer.step()

    for trained_structured in (True, False):
        model = get_peft_model(base_model(), copy.deepcopy(config))
        if trained_structured:
            assert enable_structured_waveft(model) == 2
        train(model)
        expected = model(x).detach()
        keys = set(get_peft_model_state_dict(model))
        path = tmp_path / f"structured-{trained_structured}"
        model.save_pretrained(path)

        loaded = PeftModel.from_pretrained(base_model(), path)
        if not trained_structured:
            assert enable_structured_waveft(loaded) == 2
        assert set(get_peft_model_state_dict(loaded)) == keys
        torch.testing.assert_close(loaded(x), expected, rtol=1e-5, atol=1e-6)


def dense_reference(layer: WaveFTLinear, adapter: str = "default") -> np.ndarray:
    """PEFT's recipe for delta_W, with PyWavelets' idwt2 in float64."""
    wavelet = layer.waveft_wavelet_family[adapter]
    reduction = pywt.Wavelet(wavelet).dec_len - 2
    out_features, in_features = layer.out_features, layer.in_features
    height, width = (n + reduction + (n + reduction) % 2 for n in (out_features, in_features))
    rows, cols = layer.waveft_indices[adapter].numpy()
    coefficients = np.zeros((height, width))
    coefficients[rows + (height - out_features) // 2, cols + (width - in_features) // 2] = (
        layer.waveft_spectrum[adapter].detach().double().numpy()
    )
    h2, w2 = height // 2, width // 2
    quadrants = (coefficients[:h2, :w2], (coefficients[:h2, w2:], coefficients[h2:, :w2], coefficients[h2:, w2:]))
    full = pywt.idwt2(quadrants, wavelet, mode="zero")
    top, left = (full.shape[0] - out_features) // 2, (full.shape[1] - in_features) // 2
    return full[top : top + out_features, left : left + in_features] * layer.waveft_scaling[adapter]


def test_dense_reference_agrees_with_peft():
    torch.manual_seed(6)
    reference = peft_layer(21, 30, wavelet_family="db4")
    np.testing.assert_allclose(
        reference.get_delta_weight("default").detach().numpy(), dense_reference(reference), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("wavelet", ["db12", "sym14", "coif5", "coif9"])
def test_wavelets_stock_peft_cannot_run(wavelet):
    torch.manual_seed(7)
    reference = peft_layer(37, 50, wavelet_family=wavelet, n_frequency=120)
    structured = structured_copy(reference)
    x = torch.randn(4, 50, dtype=torch.float32)
    with pytest.warns(UserWarning, match=f"{wavelet}.*stock PEFT cannot run it"):
        y = structured(x)
    expected = dense_reference(structured)
    dense = structured.base_layer(x) + x @ torch.from_numpy(expected).float().T
    np.testing.assert_allclose(y.detach().numpy(), dense.detach().numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(structured.get_delta_weight("default").detach().numpy(), expected, rtol=1e-4, atol=1e-6)


def test_padding_rule_agrees_with_peft_table():
    for name, (rows, cols) in WAVELET_REDUCTIONS.items():
        length = wavelet_filters(name).length
        assert rows == cols == length - 2, name
        assert padded_length(10, length) == 10 + rows + rows % 2


def test_unknown_wavelet_is_a_user_error():
    with pytest.raises(UserError, match="'db99'"):
        wavelet_filters("db99")
    with pytest.raises(UserError, match="'morl'"):
        wavelet_filters("morl")  # continuous


def check_transposed_forms(axis: SynthesisAxis, signal, coefficients):
    """The feature-major forms equal the token-major ones; padding rows past `padded` are ignored/zero."""
    rows = axis.transposed_rows
    assert rows >= axis.padded
    torch.testing.assert_close(axis.analyze_transposed(signal)[: axis.padded], axis.analyze(signal).T)
    coefficients_t = torch.zeros(rows, coefficients.shape[0], dtype=coefficients.dtype)
    coefficients_t[: axis.padded] = coefficients.T
    expected = axis.synthesize(coefficients)
    torch.testing.assert_close(axis.synthesize_transposed(coefficients_t), expected)
    base = torch.randn_like(expected)
    torch.testing.assert_close(axis.synthesize_transposed(coefficients_t, add_to=base), base + expected)


@pytest.mark.parametrize("length", [1, 9, 16, 32, 50])
def test_identity_axis(length):
    axis = SynthesisAxis.identity(length)
    signal = torch.randn(4, length, dtype=torch.float64)
    assert axis.padded == length and axis.offset == 0
    torch.testing.assert_close(axis.matrix(torch.float64), torch.eye(length, dtype=torch.float64))
    check_transposed_forms(axis, signal, torch.randn(4, length, dtype=torch.float64))


@pytest.mark.parametrize("wavelet", ["db1", "db3", "bior2.4", "dmey"])
def test_synthesis_axis_adjoint_and_idwt2(wavelet):
    torch.manual_seed(8)
    filters = wavelet_filters(wavelet)
    for length in (1, 2, 7, 30, 32, 48):
        axis = SynthesisAxis(length, filters)
        signal = torch.randn(3, length, dtype=torch.float64)
        coefficients = torch.randn(3, axis.padded, dtype=torch.float64)
        matrix = axis.matrix(torch.float64)
        torch.testing.assert_close(axis.synthesize(coefficients), coefficients @ matrix.T)
        torch.testing.assert_close(axis.analyze(signal), signal @ matrix)
        check_transposed_forms(axis, signal, coefficients)
    output_axis, input_axis = synthesis_axis(9, filters), synthesis_axis(14, filters)
    quadrants = torch.randn(output_axis.padded, input_axis.padded, dtype=torch.float64)
    h2, w2 = output_axis.padded // 2, input_axis.padded // 2
    q = quadrants.numpy()
    full = pywt.idwt2((q[:h2, :w2], (q[:h2, w2:], q[h2:, :w2], q[h2:, w2:])), wavelet, mode="zero")
    top, left = (full.shape[0] - 9) // 2, (full.shape[1] - 14) // 2
    np.testing.assert_allclose(
        idwt2(quadrants, output_axis, input_axis).numpy(), full[top : top + 9, left : left + 14], atol=1e-12
    )


def test_recreated_adapter_is_not_served_from_a_stale_cache():
    torch.manual_seed(9)
    reference = peft_layer(16, 24, wavelet_family="db2")
    structured = structured_copy(reference)
    x = torch.randn(3, 24)
    structured(x)
    for layer in (reference, structured):
        torch.manual_seed(10)
        layer.update_layer("default", 60, waveft_config(wavelet_family="sym4", random_loc_seed=123))
    torch.testing.assert_close(structured(x), reference(x), rtol=1e-5, atol=1e-6)


def dense_tensors(tree):
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor) and t.layout == torch.strided]


class LargestNewTensor(TorchDispatchMode):
    """Records the largest number of elements of any dense tensor an operation allocates (views excluded;
    a sparse tensor's memory is its dense index and value tensors)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in dense_tensors((args, kwargs))}
        for t in dense_tensors(out):
            if t.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, t.numel())
        return out


def test_training_step_never_allocates_an_out_by_in_tensor():
    torch.manual_seed(11)
    size, tokens = 256, 8  # out * in = 65536 dwarfs every activation (8 x 256)
    layer = peft_layer(size, size, wavelet_family="db2", n_frequency=2 * size)
    for module, must_stay_small in ((structured_copy(layer), True), (layer, False)):
        x = torch.randn(tokens, size, requires_grad=True)
        with LargestNewTensor() as recorder:
            module(x).square().sum().backward()
        assert (recorder.largest < size * size) == must_stay_small, recorder.largest


def test_enable_on_a_diffusers_unet_keeps_its_output():
    unet = tiny_unet()
    unet.add_adapter(WaveFTConfig(target_modules=["to_q", "to_k", "to_v", "to_out.0"], n_frequency=64))
    with torch.no_grad():
        for module in unet.modules():
            if isinstance(module, WaveFTLinear):
                module.waveft_spectrum["default"].normal_(0, 0.05)
        expected = unet_output(unet)
        layers = sum(isinstance(m, WaveFTLinear) for m in unet.modules())
        assert layers > 0 and enable_structured_waveft(unet) == layers
        assert all(type(m) is StructuredWaveFTLinear for m in unet.modules() if isinstance(m, WaveFTLinear))
        torch.testing.assert_close(unet_output(unet), expected, rtol=1e-5, atol=1e-5)
        assert disable_structured_waveft(unet) == layers
        torch.testing.assert_close(unet_output(unet), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_import_of_waveft_does_not_import_peft():
    import subprocess
    import sys

    code = "import sys, waveft; assert callable(waveft.enable_structured_waveft); print('peft' in sys.modules)"
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=repo)
    assert result.stdout.strip() == "False"


def test_warning_is_emitted_once_per_wavelet():
    torch.manual_seed(13)
    structured = structured_copy(peft_layer(10, 12, wavelet_family="db20"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for _ in range(3):
            structured(torch.randn(2, 12))
    assert sum("stock PEFT cannot run" in str(w.message) for w in caught) == 1


def test_generating_under_inference_mode_then_training_in_the_same_process():
    """The kernels and index plans cached on first use are built outside inference mode: a notebook that samples
    under `torch.inference_mode()` and then trains (or merges with gradients) must not hit "Inference tensors
    cannot be saved for backward"."""
    shape_in, shape_out, wavelet = 27, 23, "sym5"  # shapes no other test uses: the process-wide caches start empty
    assert not synthesis_axis(shape_out, peft_compatible_filters(wavelet))._kernels
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(shape_in, shape_out), torch.nn.Tanh(), torch.nn.Linear(shape_out, 5))
    config = waveft_config(target_modules=["0"], wavelet_family=wavelet, n_frequency=60)
    model = get_peft_model(model, config)
    assert enable_structured_waveft(model) == 1
    layer = model.base_model.model[0]
    x = torch.randn(4, shape_in)
    with torch.inference_mode():
        generated = model(x)
        layer.get_delta_weight("default")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(x).square().mean().backward()
    layer.get_delta_weight("default").square().sum().backward()
    optimizer.step()
    assert layer.waveft_spectrum["default"].grad.abs().sum() > 0
    assert not torch.equal(model(x).detach(), generated)
