"""WaveFT personalization of Stable Diffusion XL: trainer, adapters, generation."""
from waveft.adapters.fast_waveft import enable_fast_waveft  # noqa: F401
