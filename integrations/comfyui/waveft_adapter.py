"""ComfyUI's weight adapter for WaveFT's own file: `comfy.lora.load_lora` offers each layer's key prefix to the
classes in `comfy.weight_adapter.adapters`; this one claims prefixes with a `.waveft_spectrum` and, when ComfyUI
patches that weight (`comfy.lora.calculate_weight`, also in partial / low-VRAM loading), builds the layer's
dense difference and adds `strength` times it. Nothing dense exists before or after: peak memory is about one
layer's difference, whatever the number of layers.

Problems go to ComfyUI's log as one line each (no stack trace), and the weight is left as it was: a layer whose
shape is not the model's (the file was made for another model), a file of a newer format version.

A "bypass" mode (newer ComfyUI: an adapter adds `h(x)` to a layer's output instead of patching its weight) can
use `NativeLayer` as is: `h(x) = x @ layer.delta().T`, or WaveFT's structured forward, which never forms it.
"""
import logging
import weakref

import torch
from comfy.weight_adapter.base import WeightAdapterBase

from .waveft_native import SPECTRUM, VERSION_KEY, NativeFormatError, NativeLayer, check_version

# Files already reported as unreadable (their version tensor), so a file says so once, not once per layer.
_reported = weakref.WeakSet()


class WaveFTAdapter(WeightAdapterBase):
    name = "waveft"

    def __init__(self, loaded_keys: set, layer: NativeLayer):
        self.loaded_keys = loaded_keys
        self.layer = layer
        self.weights = [layer.spectrum]

    @classmethod
    def load(cls, x, lora, alpha, dora_scale, loaded_keys=None):
        if x + SPECTRUM not in lora:
            return None
        if loaded_keys is None:
            loaded_keys = set()
        try:
            check_version(lora)
            layer = NativeLayer(x, lora)
        except NativeFormatError as exc:
            marker = lora.get(VERSION_KEY, lora[x + SPECTRUM])
            if marker not in _reported:
                _reported.add(marker)
                logging.error(f"WaveFT: file not applied: {exc}")
            loaded_keys.update(k for k in lora if k.startswith(x + ".") or k.startswith("waveft"))  # reported
            return None
        return cls(layer.keys, layer)  # load_lora adds them to its loaded keys

    def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                         intermediate_dtype=torch.float32, original_weight=None):
        layer = self.layer
        if tuple(weight.shape) != layer.shape:
            logging.error(f"WaveFT: layer {layer.name} is {layer.out_features}x{layer.in_features} in the file, "
                          f"but the model's {key} is {'x'.join(map(str, weight.shape))}: not applied (a file "
                          f"for another model?)")
            return weight
        if strength != 0.0:
            delta = layer.delta(device=weight.device, dtype=torch.float32)  # PEFT computes it in fp32 too
            weight += function((strength * delta).type(weight.dtype))
        return weight


def register() -> None:
    """Add (or, on a reload, replace) the WaveFT class in ComfyUI's list of weight adapters."""
    import comfy.weight_adapter as weight_adapter

    weight_adapter.adapters[:] = [a for a in weight_adapter.adapters if getattr(a, "name", None) != "waveft"]
    weight_adapter.adapters.append(WaveFTAdapter)
