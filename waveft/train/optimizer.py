"""The optimizer a run's `train.optimizer` asks for, over the adapter's parameters (the trainer's and the memory
estimate's)."""
import torch

from waveft.errors import UserError


def build_optimizer(cfg, params) -> torch.optim.Optimizer:
    """AdamW, bitsandbytes' 8-bit AdamW or Prodigy with the run's settings (`cfg`: a RunConfig)."""
    settings = cfg.train
    kwargs = dict(lr=settings.learning_rate, betas=(settings.adam_beta1, settings.adam_beta2),
                  weight_decay=settings.adam_weight_decay, eps=settings.adam_epsilon)
    if settings.optimizer == "prodigy":  # load_config checked that prodigyopt is installed
        from prodigyopt import Prodigy

        return Prodigy(params, **kwargs, safeguard_warmup=settings.prodigy_safeguard_warmup,
                       use_bias_correction=settings.prodigy_use_bias_correction, d_coef=settings.prodigy_d_coef)
    if settings.optimizer == "adamw_8bit":
        try:
            import bitsandbytes
        except ImportError:
            raise UserError("train.optimizer=adamw_8bit needs bitsandbytes: pip install bitsandbytes") from None
        return bitsandbytes.optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, **kwargs)
