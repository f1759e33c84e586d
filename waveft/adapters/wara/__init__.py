"""WaRA (Wavelet Low-Rank Adaptation) as a PEFT method: importing this package registers it with PEFT.

After the import, WaRA adapters are added, saved and loaded like PEFT's own methods:
`unet.add_adapter(WaraConfig(...))`, `get_peft_model`, `get_peft_model_state_dict`,
`PeftModel.from_pretrained`.
"""
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

from .config import WaraConfig, WaraPeftType
from .layer import WaraLayer, WaraLinear
from .model import WaraModel

__all__ = ["WaraConfig", "WaraLayer", "WaraLinear", "WaraModel", "WaraPeftType"]


def _register_with_peft() -> None:
    """What `peft.utils.register_peft_method` does, which only accepts members of PEFT's own `PeftType`."""
    peft_type = WaraPeftType.WARA
    PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = WaraConfig
    PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = WaraModel
    PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = WaraModel.prefix


_register_with_peft()
