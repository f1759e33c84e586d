"""WaRA (Wavelet Low-Rank Adaptation) as a PEFT method.

Once registered (`waveft.adapters.registry.register_methods()`, which every entry point of this project calls),
WaRA adapters are added, saved and loaded like PEFT's own methods: `unet.add_adapter(WaraConfig(...))`,
`get_peft_model`, `get_peft_model_state_dict`, `PeftModel.from_pretrained`.
"""
from .config import WaraConfig, WaraPeftType
from .layer import WaraLayer, WaraLinear
from .model import WaraModel

__all__ = ["WaraConfig", "WaraLayer", "WaraLinear", "WaraModel", "WaraPeftType"]
