"""Training: the loop (`loop.train`), one micro-batch's loss, data, latent cache, checkpoints, sampling."""
