"""WaveFT personalization of Stable Diffusion XL: trainer, adapters, generation, export.

Importing `waveft` changes no other library's state; commands call `waveft.entry.set_up_process()`.
"""
from waveft.adapters.structured_waveft import enable_structured_waveft  # noqa: F401
