"""The denoising loss of one micro-batch: what the trainer minimises, its validation loss measures and the tests
check. Latents -> noise at random timesteps -> the UNet's prediction -> MSE against the noise (or velocity),
weighted per pixel (masks), per sample (Min-SNR) and per half (prior preservation)."""
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Conditioning:
    """SDXL's UNet conditioning for a batch of B: text hidden states (B, 77, 2048 at SDXL's size), pooled text
    embeddings (B, 1280) and size/crop time ids (B, 6)."""

    hidden_states: torch.Tensor
    text_embeds: torch.Tensor
    time_ids: torch.Tensor


@dataclass(frozen=True)
class LossSettings:
    prediction_type: str  # "epsilon" or "v_prediction": the scheduler's target
    snr_gamma: Optional[float] = None  # Min-SNR weighting; None: plain MSE
    noise_offset: float = 0.0
    prior_loss_weight: float = 1.0  # weight of the class half of the batch (prior preservation)

    @classmethod
    def from_config(cls, cfg, noise_scheduler) -> "LossSettings":
        return cls(noise_scheduler.config.prediction_type, cfg.train.snr_gamma, cfg.train.noise_offset,
                   cfg.data.prior_preservation.loss_weight)


def micro_batch_loss(unet, noise_scheduler, latents: torch.Tensor, conditioning: Conditioning, num_instance: int,
                     generators: list[torch.Generator], settings: LossSettings,
                     pixel_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The denoising loss of one micro-batch: noise the latents at random timesteps, predict, weighted MSE.

    latents: (B, 4, H/8, W/8), already scaled by the VAE's scaling factor, in the UNet's dtype and device; the first
    `num_instance` rows are instance images, the rest class images (prior preservation). Each row's noise and
    timestep are drawn from its own generator in `generators` (CPU, one per row, in a fixed order), so a row's draws
    do not depend on which other rows share its micro-batch.
    pixel_weights: (B, 1, H/8, W/8) weights of each latent pixel's squared error (masked loss), or None.
    Cost: one UNet forward pass at batch B. Returns a scalar (fp32).
    """
    device, dtype = latents.device, latents.dtype
    noise = torch.stack([torch.randn(latents.shape[1:], generator=g) for g in generators]).to(device, dtype)
    if settings.noise_offset:
        offsets = torch.stack([torch.randn(latents.shape[1:2] + (1, 1), generator=g) for g in generators])
        noise += settings.noise_offset * offsets.to(noise)
    steps = noise_scheduler.config.num_train_timesteps
    timesteps = torch.cat([torch.randint(0, steps, (1,), generator=g) for g in generators]).to(device)
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    model_pred = unet(
        noisy_latents,
        timesteps,
        encoder_hidden_states=conditioning.hidden_states,
        added_cond_kwargs={"text_embeds": conditioning.text_embeds, "time_ids": conditioning.time_ids},
    ).sample
    epsilon = settings.prediction_type == "epsilon"
    target = noise if epsilon else noise_scheduler.get_velocity(latents, noise, timesteps)
    per_pixel = F.mse_loss(model_pred.float(), target.float(), reduction="none")
    if pixel_weights is not None:
        per_pixel = per_pixel * pixel_weights.to(per_pixel)
    per_sample = per_pixel.mean(dim=(1, 2, 3))
    if settings.snr_gamma is not None:
        from diffusers.training_utils import compute_snr

        snr = compute_snr(noise_scheduler, timesteps)
        clipped = torch.clamp(snr, max=settings.snr_gamma)
        per_sample = per_sample * (clipped / snr if epsilon else clipped / (snr + 1))
    loss = per_sample[:num_instance].mean()
    if per_sample.shape[0] > num_instance:
        loss = loss + settings.prior_loss_weight * per_sample[num_instance:].mean()
    return loss


def mask_weights(masks: torch.Tensor, latent_size: tuple[int, int], min_weight: float) -> torch.Tensor:
    """Pixel masks (B, 1, H, W) in [0, 1] -> latent-pixel weights (B, 1, h, w) in [min_weight, 1] (area
    averaging, so a latent pixel half inside the mask weighs half)."""
    masks = F.interpolate(masks, size=latent_size, mode="area")
    return min_weight + (1.0 - min_weight) * masks
