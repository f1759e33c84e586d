"""WaveFT personalization of Stable Diffusion XL: trainer, adapters, generation."""
import logging

# bitsandbytes' CPU backend warns at import (diffusers imports it) that its optional 4-bit kernels are missing;
# this project uses only its 8-bit AdamW.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

from waveft.adapters.structured_waveft import enable_structured_waveft  # noqa: E402, F401
