"""Every adapter method on the tiny SDXL UNet: attach, train a few steps, save in PEFT's format, reload exactly."""
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import REPO, tiny_unet, unet_output
from waveft.adapters.attach import attach_adapter
from waveft.adapters.methods import METHODS
from waveft.adapters.structured_waveft import enable_structured_waveft
from waveft.config import AdapterConfig, load_config
from waveft.errors import UserError
from waveft.io.adapter_folder import save_adapter

STEPS = 4
# Small settings: the paper's defaults are sized for SDXL's 1280-wide layers, the tiny UNet's are 32-64 wide.
CASES = {
    "waveft": AdapterConfig(type="waveft", peft={"n_frequency": 64, "wavelet_family": "db2"}),
    "waveft-peft": AdapterConfig(type="waveft", implementation="peft", peft={"n_frequency": 64}),
    "shira-paper": AdapterConfig(type="waveft", peft={"n_frequency": 64, "use_idwt": False}),
    "shira": AdapterConfig(type="shira"),
    "lora": AdapterConfig(type="lora", peft={"lora_alpha": 8}),
    "loha": AdapterConfig(type="loha", peft={"alpha": 8}),
    "lokr": AdapterConfig(type="lokr", peft={"r": 4, "alpha": 8}),
    "vera": AdapterConfig(type="vera", peft={"r": 16}),
    "fourierft": AdapterConfig(type="fourierft", peft={"n_frequency": 64}),
    "adalora": AdapterConfig(type="adalora", peft={"tinit": 1, "tfinal": 1}),
    "wara": AdapterConfig(type="wara", peft={"wavelet_family": "db2", "scaling": 4.0}),
}


def train_a_few_steps(unet, adapter):
    """AdamW on a simple loss, with the method's step hook where the trainer calls it."""
    make_step_hook = METHODS[adapter.type].make_step_hook
    step_hook = make_step_hook(unet) if make_step_hook is not None else None
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    g = torch.Generator().manual_seed(1)
    for step in range(1, STEPS + 1):
        sample = torch.randn(1, 4, 8, 8, generator=g)
        added = {"text_embeds": torch.randn(1, 32, generator=g), "time_ids": torch.randn(1, 6, generator=g)}
        out = unet(sample, torch.tensor([100]), torch.randn(1, 7, 64, generator=g), added_cond_kwargs=added).sample
        (out - sample).pow(2).mean().backward()
        optimizer.step()
        if step_hook is not None:
            step_hook(unet, step)
        optimizer.zero_grad()


def assert_adalora_pruned_to_target_rank(unet, num_layers):
    """The schedule ran to its end: init_r 2 singular values per layer, target_r 1 per layer kept on average."""
    singular_values = [p for n, p in unet.named_parameters() if "lora_E" in n]
    assert sum(e.numel() for e in singular_values) == 2 * num_layers
    assert sum(int((e != 0).sum()) for e in singular_values) == num_layers
    assert unet.peft_config["default"].total_step == STEPS


def test_every_registered_method_is_covered():
    assert {case.type for case in CASES.values()} == set(METHODS)


@pytest.mark.parametrize("case", CASES)
def test_method_trains_saves_and_reloads_with_identical_outputs(case, tmp_path):
    from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict

    adapter = CASES[case]
    unet = tiny_unet()
    base_output = unet_output(unet)
    layers = attach_adapter(unet, adapter, total_steps=STEPS).layers
    assert len(layers) == 64 and all(layer.trainable_parameters > 0 for layer in layers)
    assert all(p.dtype == torch.float32 for p in unet.parameters() if p.requires_grad)
    train_a_few_steps(unet, adapter)
    trained = unet_output(unet)
    assert (trained - base_output).abs().max() > 1e-5, "training left the outputs unchanged"
    if adapter.type == "adalora":
        assert_adalora_pruned_to_target_rank(unet, len(layers))

    save_adapter(unet, str(tmp_path / "adapter"))
    reloaded = PeftModel.from_pretrained(tiny_unet(), str(tmp_path / "adapter"))
    if adapter.type == "waveft" and adapter.implementation == "structured":
        enable_structured_waveft(reloaded)  # as the project loads it; stock PEFT's dense layer differs by rounding
    torch.testing.assert_close(unet_output(reloaded.base_model.model), trained, rtol=0, atol=0)

    fresh = tiny_unet()
    attach_adapter(fresh, adapter, total_steps=STEPS)
    result = set_peft_model_state_dict(fresh, get_peft_model_state_dict(unet))
    assert not result.unexpected_keys
    torch.testing.assert_close(unet_output(fresh), trained, rtol=0, atol=0)


def test_adalora_needs_the_run_length_and_refuses_setting_it_by_hand():
    with pytest.raises(ValueError, match="total_steps"):
        attach_adapter(tiny_unet(), AdapterConfig(type="adalora"))
    with pytest.raises(UserError, match="'adapter.peft.total_step' is set from 'train.max_steps'"):
        load_config(None, ("output_dir=x", "data.instance_dir=y", "adapter.type=adalora", "adapter.peft.total_step=9"))
    with pytest.raises(UserError, match="schedule values don't allow for a budgeting phase"):
        attach_adapter(tiny_unet(), AdapterConfig(type="adalora", peft={"tinit": 3}), total_steps=3)


def test_vera_projections_cannot_be_saved_from_a_unet():
    with pytest.raises(UserError, match="'adapter.peft.save_projection' must be false for vera"):
        load_config(None, ("output_dir=x", "data.instance_dir=y", "adapter.type=vera",
                           "adapter.peft.save_projection=true"))


def test_paper_defaults():
    cfg = lambda method: load_config(None, ("output_dir=x", "data.instance_dir=y", f"adapter.type={method}"))  # noqa: E731
    from waveft.adapters.methods import resolved_peft_settings

    expected = {
        "waveft": dict(n_frequency=2592, scaling=25.0, wavelet_family="db1", random_loc_seed=777, use_idwt=True),
        "lora": dict(r=1, lora_alpha=1),
        "vera": dict(r=1402),
        "loha": dict(r=1, alpha=64),
        "lokr": dict(r=20, alpha=192),
        "adalora": dict(target_r=1, init_r=2, lora_alpha=32),
        "fourierft": dict(n_frequency=2592, scaling=32.0),
    }
    for method, settings in expected.items():
        resolved = resolved_peft_settings(cfg(method).adapter)
        assert {k: resolved[k] for k in settings} == settings, method


@pytest.mark.parametrize("name", sorted(os.listdir(os.path.join(REPO, "configs", "paper"))))
def test_paper_configs_load(name):
    cfg = load_config(os.path.join(REPO, "configs", "paper", name), ("data.instance_dir=somewhere",))
    assert cfg.adapter.type in METHODS
    assert cfg.train.max_steps == 500 and cfg.train.gradient_accumulation_steps == 4


@pytest.mark.parametrize("name", sorted(set(os.listdir(os.path.join(REPO, "configs", "paper"))) - {"shared.yaml"}))
def test_every_method_is_compared_at_the_same_settings(name):
    """A fair comparison: each method's paper config differs from the shared settings only in its adapter (and
    VeRA in its learning rate, as in the paper)."""
    shared = load_config(os.path.join(REPO, "configs", "paper", "shared.yaml"))
    cfg = load_config(os.path.join(REPO, "configs", "paper", name))
    for section in ("seed", "model", "data", "validation"):
        assert getattr(cfg, section) == getattr(shared, section), section
    learning_rate = 3.2e-3 if cfg.adapter.type == "vera" else shared.train.learning_rate
    assert cfg.train == dataclasses.replace(shared.train, learning_rate=learning_rate)
    assert cfg.adapter.target_modules == shared.adapter.target_modules


def test_unknown_method_is_a_user_error():
    with pytest.raises(UserError, match="'adapter.type' names an unknown method 'nope' .*known: waveft, shira, lora"):
        load_config(None, ("output_dir=x", "data.instance_dir=y", "adapter.type=nope"))


@pytest.mark.slow
def test_trainer_cli_refuses_an_unknown_method_in_one_line():
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "train_dreambooth_waveft.py"), "--config", "configs/tiny.yaml",
         "adapter.type=nope"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "'nope'" in lines[0]


@pytest.mark.slow
def test_trainer_end_to_end_with_wara_at_a_budget(tiny_sdxl_dir, subject_dir, tmp_path):
    from waveft.adapters.budget import LayerShape, lora_rank_one_parameters
    from waveft.infer.pipeline import merge_adapter
    from waveft.train.loop import train

    cfg = load_config(
        os.path.join(REPO, "configs", "tiny.yaml"),
        (
            f"output_dir={tmp_path / 'run'}",
            f"model.pretrained={tiny_sdxl_dir}",
            f"data.instance_dir={subject_dir}",
            "data.resolution=32",
            "adapter.type=wara",
            "adapter.peft={}",
            "adapter.budget=2",
            "train.max_steps=3",
            "train.gradient_accumulation_steps=1",
            "train.checkpointing_steps=0",
            "train.report_to=none",
            "validation.final=false",
            "validation.every_steps=0",
        ),
    )
    train(cfg)
    with open(tmp_path / "run" / "run_info.json") as f:
        run_info = json.load(f)
    with open(tmp_path / "run" / "adapter" / "adapter_config.json") as f:
        adapter_config = json.load(f)
    assert run_info["method"] == "wara" and run_info["steps"] == 3
    assert adapter_config["peft_type"] == "WARA" and adapter_config["r"] == 2
    # db1 on even widths: WaRA rank 2 holds exactly budget 2
    unet = tiny_unet()
    shapes = [LayerShape(m.out_features, m.in_features) for n, m in unet.named_modules()
              if isinstance(m, torch.nn.Linear) and n.endswith(("to_q", "to_k", "to_v", "to_out.0"))]
    assert run_info["trainable_parameters"] == 2 * lora_rank_one_parameters(shapes)
    merged = merge_adapter(tiny_unet(), str(tmp_path / "run" / "adapter"))
    assert not any("wara" in n for n, _ in merged.named_parameters())
