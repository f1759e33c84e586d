"""WaveFT without the dense delta weight: a drop-in for PEFT's `WaveFTLinear`.

`enable_fast_waveft(model)` switches a model's WaveFT layers to `layer.FastWaveFTLinear`; importing this
package does not import PEFT.
"""
from waveft.adapters.fast_waveft.model import disable_fast_waveft, enable_fast_waveft  # noqa: F401
