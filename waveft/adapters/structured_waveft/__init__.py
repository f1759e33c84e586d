"""WaveFT without the dense delta weight: a drop-in for PEFT's `WaveFTLinear`.

`enable_structured_waveft(model)` switches a model's WaveFT layers to `layer.StructuredWaveFTLinear`; importing this
package does not import PEFT.
"""
from waveft.adapters.structured_waveft.model import (  # noqa: F401
    disable_structured_waveft,
    enable_structured_waveft,
)
