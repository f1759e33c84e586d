"""adapter.budget -> each method's size setting: exact counts on SDXL's real layer shapes (meta device, no
weights), agreement with the parameters PEFT creates, and refusals that name the nearest reachable budget."""
from collections import Counter

import pytest
import torch

from tests.helpers import tiny_unet
from waveft.adapters.attach import attach_adapter, target_layers
from waveft.adapters.budget import LayerShape, lora_rank_one_parameters
from waveft.adapters.methods import METHODS, plan_budget, settings_with_peft_defaults
from waveft.config import SDXL_ATTENTION_PROJECTIONS, AdapterConfig, load_config
from waveft.errors import UserError

# stabilityai/stable-diffusion-xl-base-1.0's unet/config.json, the fields that shape its attention layers.
SDXL_UNET_CONFIG = dict(
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    sample_size=128,
)
SDXL_BUDGET_UNIT = 1_451_520  # LoRA rank 1 on SDXL's 560 attention projections


def sdxl_unet_on_meta():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**SDXL_UNET_CONFIG)


@pytest.fixture(scope="module")
def sdxl_shapes() -> list[LayerShape]:
    layers = target_layers(sdxl_unet_on_meta(), SDXL_ATTENTION_PROJECTIONS)
    return [LayerShape(m.out_features, m.in_features) for m in layers.values()]


def test_sdxl_has_560_attention_projections_and_lora_rank_one_holds_1451520(sdxl_shapes):
    assert len(sdxl_shapes) == 560
    assert lora_rank_one_parameters(sdxl_shapes) == SDXL_BUDGET_UNIT
    assert Counter((s.out_features, s.in_features) for s in sdxl_shapes) == {
        (1280, 1280): 360, (1280, 2048): 120, (640, 640): 60, (640, 2048): 20,
    }


# (method, budget, extra adapter.peft) -> (settings the budget chooses, parameters they hold)
SDXL_PLANS = [
    ("waveft", 1.0, {}, {"n_frequency": 2592}, 1_451_520),
    ("waveft", 1.5, {"use_idwt": False}, {"n_frequency": 3888}, 2_177_280),  # the paper's SHiRA
    ("waveft", 0.8, {}, {"n_frequency": 2074}, 1_161_440),  # 2073.6 rounds to 2074 (+0.02%)
    ("shira", 1.0, {}, {"r": 1}, 1_451_520),
    ("lora", 1.0, {}, {"r": 1}, 1_451_520),
    ("lora", 3.0, {}, {"r": 3}, 4_354_560),
    ("loha", 2.0, {}, {"r": 1}, 2_903_040),
    ("lokr", 1.0, {}, {"r": 20}, 1_453_760),
    ("vera", 1.0, {}, {"r": 1403}, 1_451_280),  # 665,600 out-vectors + 560 x 1403
    ("fourierft", 1.0, {}, {"n_frequency": 2592}, 1_451_520),
    ("adalora", 1.0, {}, {"target_r": 1, "init_r": 2}, 1_452_080),  # target_r (out + in + 1) per layer
    ("wara", 1.0, {}, {"r": 1}, 1_451_520),  # db1 pads nothing on SDXL's even widths
    ("wara", 1.0, {"wavelet_family": "db2"}, {"r": 1}, 1_451_520 + 560 * 4),
]


@pytest.mark.parametrize("method, budget, peft, settings, parameters", SDXL_PLANS)
def test_budget_gives_exact_counts_on_sdxl(sdxl_shapes, method, budget, peft, settings, parameters):
    plan = plan_budget(AdapterConfig(type=method, budget=budget, peft=peft), sdxl_shapes)
    assert plan.settings == settings
    assert plan.parameters == parameters
    assert plan.target_parameters == round(budget * SDXL_BUDGET_UNIT)
    assert abs(plan.relative_error) <= 0.01


@pytest.mark.parametrize(
    "method, peft",
    [("lora", {"r": 2}), ("loha", {"r": 1}), ("lokr", {"r": 20}), ("lokr", {"r": 4, "decompose_both": True}),
     ("lokr", {"r": 3, "decompose_factor": 8}), ("vera", {"r": 1403}), ("wara", {"r": 1, "wavelet_family": "sym3"})],
)
def test_counts_match_the_parameters_peft_creates_on_sdxl(sdxl_shapes, method, peft):
    """The count of each setting is PEFT's own: attach to SDXL on the meta device and count."""
    adapter = AdapterConfig(type=method, peft=peft)
    layers = attach_adapter(sdxl_unet_on_meta(), adapter).layers
    size = METHODS[method].size
    settings = settings_with_peft_defaults(adapter)
    assert sum(layer.trainable_parameters for layer in layers) == size.parameters(
        settings[size.key], Counter(sdxl_shapes), settings
    )


@pytest.mark.parametrize(
    "method, budget",
    [("waveft", 1.0), ("waveft", 2.0), ("shira", 1.0), ("fourierft", 1.0), ("lora", 2.0), ("adalora", 1.0),
     ("wara", 1.0), ("lokr", 1.0)],
)
def test_attached_adapter_holds_what_the_budget_planned(method, budget):
    adapter = AdapterConfig(type=method, budget=budget)
    attached = attach_adapter(tiny_unet(), adapter, total_steps=10)
    layers = attached.layers
    info = attached.budget.run_info()
    trainable = sum(layer.trainable_parameters for layer in layers)
    unit = lora_rank_one_parameters([LayerShape(l.out_features, l.in_features) for l in layers])
    assert info["budget_target_parameters"] == round(budget * unit)
    if method == "adalora":  # starts at init_r = 2 target_r, ends at target_r
        assert trainable == 2 * info["budget_parameters"]
    else:
        assert trainable == info["budget_parameters"]
    assert set(info) == {"budget_settings", "budget_target_parameters", "budget_parameters", "budget_relative_error"}


@pytest.mark.parametrize(
    "method, budget, message",
    [
        ("lora", 1.5,
         r"'adapter.budget'=1.5 cannot be reached by lora .*nearest reachable budgets are 1 \(r=1\) and 2 \(r=2\)"),
        ("lora", 0.5, r"nearest reachable budget is 1 \(r=1\)"),
        ("loha", 1.0, r"cannot be reached by loha .*nearest reachable budget is 2 \(r=1\)"),
        ("lokr", 2.0, r"nearest reachable budget is 1.111 \(r=31\)"),
        ("adalora", 1.5, r"nearest reachable budgets are 1 \(target_r=1\) and 2.001 \(target_r=2\)"),
        ("waveft", 200.0, r"nearest reachable budget is 158 \(n_frequency=409600\)"),
    ],
)
def test_unreachable_budget_names_the_nearest(sdxl_shapes, method, budget, message):
    with pytest.raises(UserError, match=message):
        plan_budget(AdapterConfig(type=method, budget=budget), sdxl_shapes)


def test_budget_and_its_setting_together_are_refused_before_loading_models():
    base = ("output_dir=x", "data.instance_dir=y", "adapter.budget=1")
    with pytest.raises(UserError, match="'adapter.peft.r' is set by 'adapter.budget' for lora"):
        load_config(None, (*base, "adapter.type=lora", "adapter.peft.r=2"))
    with pytest.raises(UserError, match="'adapter.peft.n_frequency' is set by 'adapter.budget' for waveft"):
        load_config(None, (*base, "adapter.peft.n_frequency=100"))
    with pytest.raises(UserError, match="'adapter.peft.init_r' is set by 'adapter.budget' for adalora"):
        load_config(None, (*base, "adapter.type=adalora", "adapter.peft.init_r=4"))
    with pytest.raises(UserError, match="'adapter.peft.use_dora'=True changes the parameter count"):
        load_config(None, (*base, "adapter.type=lora", "adapter.peft.use_dora=true"))


def test_budget_overrides_the_default_setting_and_is_exact_on_the_tiny_unet():
    unet = tiny_unet()
    layers = attach_adapter(unet, AdapterConfig(type="waveft", budget=0.5)).layers
    unit = lora_rank_one_parameters([LayerShape(l.out_features, l.in_features) for l in layers])
    assert unet.peft_config["default"].n_frequency == unit // 2 // len(layers)
    assert sum(l.trainable_parameters for l in layers) == unit // 2


def test_attach_returns_the_plan_it_made():
    """The run's adapter settings are resolved once: the trainer prints and records what attach_adapter planned."""
    attached = attach_adapter(tiny_unet(), AdapterConfig(type="lora", budget=2.0))
    assert attached.method.name == "lora" and attached.budget.settings == {"r": 2}
    assert attached.trainable_parameters == attached.budget.parameters
    assert attached.describe().splitlines()[-1] == attached.budget.describe()
    assert attach_adapter(tiny_unet(), AdapterConfig(type="lora")).budget is None
