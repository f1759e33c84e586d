"""WaveFT personalization of Stable Diffusion XL: trainer, adapters, generation."""
