"""Shared WaveFT location draws: bit-identical to PEFT's own, one draw per distinct layer size."""
import copy

import torch
from peft import PeftModel, WaveFTConfig, get_peft_model
from peft.tuners.waveft import layer as waveft_layer

from tests.helpers import tiny_unet
from waveft.adapters.waveft_locations import shared_waveft_locations

CONFIG = WaveFTConfig(target_modules=["to_q", "to_k", "to_v", "to_out.0"], n_frequency=24, random_loc_seed=7)


def locations(model) -> dict:
    return {name: m.waveft_indices["default"] for name, m in model.named_modules() if hasattr(m, "waveft_indices")}


def test_locations_equal_stock_peft_with_one_draw_per_size(monkeypatch):
    stock = get_peft_model(tiny_unet(), copy.deepcopy(CONFIG))
    draws = []
    real_randperm = torch.randperm

    def counting_randperm(n, *args, **kwargs):
        draws.append(n)
        return real_randperm(n, *args, **kwargs)

    monkeypatch.setattr(torch, "randperm", counting_randperm)
    with shared_waveft_locations():
        shared = get_peft_model(tiny_unet(), copy.deepcopy(CONFIG))
    assert waveft_layer.torch is torch  # restored on exit
    expected, got = locations(stock), locations(shared)
    assert len(got) == len(expected) > len(set(draws))
    assert sorted(draws) == sorted({m.in_features * m.out_features for m in _waveft_layers(shared)})
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


def test_the_generator_ends_where_torch_randperm_leaves_it():
    with shared_waveft_locations():
        for _ in range(2):  # the second draw comes from the cache
            generator = torch.Generator().manual_seed(3)
            permutation = waveft_layer.torch.randperm(50, generator=generator)
            follow_up = torch.rand(4, generator=generator)
    generator = torch.Generator().manual_seed(3)
    assert torch.equal(permutation, torch.randperm(50, generator=generator))
    assert torch.equal(follow_up, torch.rand(4, generator=generator))


def test_loaded_adapters_get_the_saved_locations(tmp_path):
    trained = get_peft_model(tiny_unet(), copy.deepcopy(CONFIG))
    trained.save_pretrained(tmp_path)
    with shared_waveft_locations():
        loaded = PeftModel.from_pretrained(tiny_unet(), tmp_path)
    for name, indices in locations(trained).items():
        assert torch.equal(locations(loaded)[name], indices), name


def _waveft_layers(model):
    return [m for m in model.modules() if isinstance(m, waveft_layer.WaveFTLayer)]
