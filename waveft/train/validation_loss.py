"""The validation loss: the denoising loss on a fixed set of (image, noise, timestep) triples, the same at every
evaluation, so that its curve shows whether the adapter learns (the training batch's loss is too noisy for that).

The images are a held-out folder (validation.loss.images) or the instance images, center-cropped at their
training size, encoded once to their posterior means; the noise and timesteps come from a generator seeded the
same way at each evaluation. Cost per evaluation: images x timesteps UNet forward passes at batch 1, no backward.
"""
import io
import os
import random

import torch

from waveft.io.files import write_atomic
from waveft.train import data as dreambooth_data
from waveft.train.loss import Conditioning, LossSettings, micro_batch_loss

VALIDATION_SEED = 20_240_601  # the triples' seed; fixed, so runs with different seeds share the same triples


class ValidationLoss:
    def __init__(self, cfg, dataset, components, text, device, dtype):
        """Encode the validation images once (the VAE must be on `device`). `text` (a
        `waveft.train.loop.PromptConditioning`) conditions them on the instance prompt at each evaluation, so
        that trained text encoders are evaluated as they are then."""
        self.timesteps = cfg.validation.loss.timesteps
        self.scheduler = components.noise_scheduler
        self.settings = LossSettings(self.scheduler.config.prediction_type)  # plain MSE, no offset
        folder = cfg.validation.loss.images
        paths = dreambooth_data.list_images(folder, "validation.loss.images folder") if folder else \
            [e.path for e in dataset.instances]
        sizes = [dataset.size_of(i) for i in range(len(dataset.instances))] if not folder else None
        self.text, self.prompt = text, dreambooth_data.instance_prompt(cfg.data)
        vae = components.vae
        self.items = []
        with torch.no_grad():
            for index, path in enumerate(paths):
                image = dreambooth_data.load_rgb(path)
                size = sizes[index] if sizes else (cfg.data.resolution, cfg.data.resolution)
                view = dreambooth_data.choose_view(image.size, size, "center", False, random.Random(0))
                pixels, time_ids = dreambooth_data.view_pixels(image, view)
                mean = vae.encode(pixels[None].to(device, vae.dtype)).latent_dist.mean
                latents = (mean * vae.config.scaling_factor).to(dtype)
                self.items.append((latents, time_ids[None].to(device, dtype)))

    @torch.no_grad()
    def evaluate(self, unet) -> float:
        """The mean loss over images x timesteps, in eval mode; the UNet is put back in train mode."""
        generator = torch.Generator().manual_seed(VALIDATION_SEED)
        unet.eval()
        embeds, pooled = self.text([self.prompt])
        losses = [micro_batch_loss(unet, self.scheduler, latents, Conditioning(embeds, pooled, time_ids), 1,
                                   [generator], self.settings).item()
                  for latents, time_ids in self.items for _ in range(self.timesteps)]
        unet.train()
        return sum(losses) / len(losses)


def plot_losses(path: str, train_losses: list, validation_losses: list) -> None:
    """loss.png: the training loss per step (and its running mean) with the validation loss over it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if train_losses:
        steps, values = zip(*train_losses)
        ax.plot(steps, values, color="0.7", linewidth=0.8, label="training loss (batch)")
        window = max(1, len(values) // 20)
        smooth = [sum(values[max(0, i - window + 1): i + 1]) / len(values[max(0, i - window + 1): i + 1])
                  for i in range(len(values))]
        ax.plot(steps, smooth, color="C0", label=f"training loss (mean of {window})")
    if validation_losses:
        steps, values = zip(*validation_losses)
        ax.plot(steps, values, "o-", color="C3", label="validation loss (fixed triples)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("denoising MSE")
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    write_atomic(path, lambda f: f.write(buffer.getvalue()))
