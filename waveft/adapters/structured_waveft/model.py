"""Switch the PEFT WaveFT layers of a model to the structured implementation, in place, and back.

PEFT (and through it transformers) is imported on the first call, not with this module, so that
`import waveft` stays cheap.
"""


def enable_structured_waveft(model) -> int:
    """Make every PEFT `WaveFTLinear` of `model` (a diffusers UNet with adapters added through
    `add_adapter(WaveFTConfig(...))`, a `peft.PeftModel`, any `torch.nn.Module`) compute its delta without
    the dense matrix.

    Only the class changes: parameters, state dict keys, config and saved files stay PEFT's. Layers PEFT
    creates later (a newly targeted module) are stock until the next call. Returns the number of WaveFT
    layers of `model` that now run the structured forward.
    """
    from peft.tuners.waveft.layer import WaveFTLinear

    from waveft.adapters.structured_waveft.layer import StructuredWaveFTLinear

    count = 0
    for module in model.modules():
        if type(module) is WaveFTLinear:
            module.__class__ = StructuredWaveFTLinear
        if type(module) is StructuredWaveFTLinear:
            count += 1
    return count


def disable_structured_waveft(model) -> int:
    """Give every structured WaveFT layer of `model` back PEFT's own forward. Returns how many were switched."""
    from peft.tuners.waveft.layer import WaveFTLinear

    from waveft.adapters.structured_waveft.layer import StructuredWaveFTLinear

    count = 0
    for module in model.modules():
        if type(module) is StructuredWaveFTLinear:
            module.__class__ = WaveFTLinear
            module.__dict__.pop("_structured_waveft_plans", None)
            count += 1
    return count
