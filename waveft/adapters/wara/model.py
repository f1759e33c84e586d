"""WaRA's tuner: finds the target Linear layers and wraps them in `WaraLinear`."""
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from .layer import WaraLayer, WaraLinear


class WaraModel(BaseTuner):
    """Adds WaRA adapters to a model (`peft.get_peft_model`, `PeftModel.from_pretrained`, or diffusers'
    `add_adapter`). `target_modules` must be given: WaRA has no per-architecture defaults."""

    prefix: str = "wara_"
    tuner_layer_cls = WaraLayer
    target_module_mapping = {}

    def _create_and_replace(
        self, wara_config, adapter_name, target, target_name, parent, current_key, **optional_kwargs
    ):
        if isinstance(target, WaraLayer):
            target.update_layer(adapter_name, wara_config)
            return
        new_module = self._create_new_module(wara_config, adapter_name, target)
        if adapter_name != self.active_adapter:
            # an additional adapter is not trainable until it is made active
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    @staticmethod
    def _create_new_module(wara_config, adapter_name, target, **kwargs):
        base_layer = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"Target module {target} is not supported: WaRA adapts torch.nn.Linear layers only.")
        return WaraLinear(target, adapter_name, config=wara_config, **kwargs)
