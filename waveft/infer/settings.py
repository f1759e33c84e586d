"""How images are made: the settings of `waveft.generate`, shared by benchmark generation and training-time
sampling. Importing this module loads no model library, so run configs can check scheduler names early."""
import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from waveft.io.cli_settings import CliSettings, cli

# Keyword arguments of diffusers schedulers, by the names this project uses.
SCHEDULERS = {
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
}
SchedulerName = Literal[tuple(SCHEDULERS)]  # type: ignore[valid-type]  (the names above, one list)
GenerationDtype = Literal["fp32", "fp16", "bf16"]
# bitsandbytes quantization of the UNet's Linear layers (model.quantize, --quantize): none, 8-bit, 4-bit NormalFloat.
Quantization = Literal["none", "int8", "nf4"]


@dataclass
class SamplerSettings(CliSettings):
    """How the denoising runs: the settings every way of generating shares (the CLI, validation samples during
    training, the benchmark), declared once; each adds its own image size, batching and dtype."""

    scheduler: SchedulerName = field(default="dpmpp_2m", metadata=cli("sampler"))
    steps: int = field(default=30, metadata=cli("denoising steps"))
    guidance_scale: float = field(default=7.5, metadata=cli("classifier-free guidance scale"))
    negative_prompt: str = field(default="", metadata=cli("negative prompt"))

    def sampler(self) -> dict:
        """These four settings, by name."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(SamplerSettings)}


@dataclass
class GenerationSettings(SamplerSettings):
    """Everything but the prompts and seeds that decides a generated image (batch_size only decides speed)."""

    height: int = field(default=1024, metadata=cli("image height in pixels"))
    width: int = field(default=1024, metadata=cli("image width in pixels"))
    batch_size: int = field(default=4, metadata=cli("images per call (each image has its own generator)"))
    dtype: GenerationDtype = field(default="fp32", metadata=cli("pipeline dtype"))
    # The UNet's Linear layers quantized by bitsandbytes (as model.quantize); the adapter then stays unmerged.
    quantize: Quantization = field(default="none", metadata=cli("quantize the UNet's Linear layers"))

    def image_settings(self) -> dict:
        """The settings that change the pictures: all but batch_size. An unquantized base is left out, so that
        folders made before `quantize` existed keep their identity."""
        return {k: v for k, v in vars(self).items() if k != "batch_size" and not (k == "quantize" and v == "none")}

    def problems(self) -> list[tuple[str, str]]:
        """(field, what is wrong) for values no pipeline can use."""
        found = [(name, "must be > 0") for name in ("steps", "batch_size") if getattr(self, name) <= 0]
        found += [(name, "must be a positive multiple of 8") for name in ("height", "width")
                  if getattr(self, name) <= 0 or getattr(self, name) % 8]
        return found

