"""The forward of an additive PEFT tuner layer (as PEFT's own layers write it), shared by this project's layers."""
from collections.abc import Callable

import torch


def additive_forward(layer, x: torch.Tensor, parameters: dict, add_delta: Callable, *args, **kwargs) -> torch.Tensor:
    """The base layer's output plus, for each active adapter of `parameters` (adapter -> a parameter of it, whose
    dtype the input is cast to), `add_delta(adapter, result, x)`; none while adapters are disabled (unmerging
    them first) or merged into the weights. The result has the input's dtype."""
    previous_dtype = x.dtype
    if layer.disable_adapters:
        if layer.merged:
            layer.unmerge()
        result = layer.base_layer(x, *args, **kwargs)
    elif layer.merged:
        result = layer.base_layer(x, *args, **kwargs)
    else:
        result = layer.base_layer(x, *args, **kwargs)
        for adapter in layer.active_adapters:
            if adapter not in parameters:
                continue
            x = layer._cast_input_dtype(x, parameters[adapter].dtype)
            result = add_delta(adapter, result, x)
    return result.to(previous_dtype)
