"""The settings of the stage CLIs a run calls (eval.generate_benchmark, eval.score) as the sweep file holds
them, their checks, and the command lines they become: the one place where the sweep meets those CLIs
(to become their own settings dataclasses' `to_argv` once they have them).
"""
import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from eval.encoders import DEFAULT_CLIP, DEFAULT_CMMD_CLIP, DEFAULT_DINO
from eval.generate_benchmark import PAPER_NEGATIVE_PROMPT, PAPER_SEEDS
from eval.score import CLIP_T_PROMPTS, LPIPS_NETS
from waveft.errors import UserError


@dataclass
class GenerationSettings:
    """eval.generate_benchmark's settings; defaults are the paper's."""

    seeds: list[int] = field(default_factory=lambda: list(PAPER_SEEDS))  # images per prompt, one per seed
    scheduler: str = "dpmpp_2m"
    steps: int = 30
    guidance_scale: float = 7.5
    negative_prompt: str = PAPER_NEGATIVE_PROMPT
    resolution: int = 1024
    batch_size: int = 4
    dtype: Literal["fp32", "fp16", "bf16"] = "bf16"


@dataclass
class ScoringSettings:
    """eval.score's settings; None means eval.score's default."""

    dino: Optional[str] = None
    clip: Optional[str] = None  # CLIP-I and CLIP-T
    cmmd_clip: Optional[str] = None
    # Smoke-test encoders: built here with eval.tiny_encoders if missing, used for DINO, CLIP and CMMD.
    tiny_encoders: Optional[str] = None
    clip_t_prompt: str = "without-identifier"  # one of eval.score's CLIP_T_PROMPTS
    lpips: Optional[str] = None  # LPIPS diversity's network (alex, vgg, squeeze); null: not computed
    batch_size: int = 32
    device: Optional[str] = None
    cache_dir: Optional[str] = None  # real-image embedding cache


def check_stage_settings(generation: GenerationSettings, scoring: ScoringSettings, source: str) -> None:
    g, s = generation, scoring
    if not g.seeds or len(set(g.seeds)) != len(g.seeds):
        raise UserError(f"{source}: key 'generation.seeds' must list distinct seeds, got {g.seeds}")
    if g.steps <= 0 or g.batch_size <= 0 or g.resolution <= 0 or g.resolution % 8:
        raise UserError(f"{source}: keys 'generation.steps' and 'generation.batch_size' must be > 0 and "
                        f"'generation.resolution' a positive multiple of 8")
    if s.tiny_encoders and (s.dino or s.clip or s.cmmd_clip):
        raise UserError(f"{source}: key 'scoring.tiny_encoders' replaces 'scoring.dino', 'scoring.clip' and "
                        "'scoring.cmmd_clip': set either")
    if s.batch_size <= 0:
        raise UserError(f"{source}: key 'scoring.batch_size' must be > 0")
    if s.clip_t_prompt not in CLIP_T_PROMPTS:
        raise UserError(f"{source}: key 'scoring.clip_t_prompt' must be one of {', '.join(CLIP_T_PROMPTS)}, "
                        f"got {s.clip_t_prompt!r}")
    if s.lpips is not None:
        networks = [net for net in LPIPS_NETS if net != "off"]
        if s.lpips not in networks:
            raise UserError(f"{source}: key 'scoring.lpips' must be one of {', '.join(networks)} or null, "
                            f"got {s.lpips!r}")
        if importlib.util.find_spec("lpips") is None:
            raise UserError(f"{source}: key 'scoring.lpips' is {s.lpips!r}, which needs the lpips package "
                            "(pip install lpips==0.1.4; it pulls torchvision); or set scoring.lpips=null")


def generate_argv(g: GenerationSettings, runs: Path, benchmark: str, out: Path) -> list[str]:
    """eval.generate_benchmark for the trained run folder `runs`, images to out/<runs' name>/."""
    return [sys.executable, "-m", "eval.generate_benchmark", "--runs", str(runs), "--benchmark", benchmark,
            "--out", str(out), "--seeds", *map(str, g.seeds), "--scheduler", g.scheduler, "--steps", str(g.steps),
            "--guidance-scale", str(g.guidance_scale), "--negative-prompt", g.negative_prompt,
            "--resolution", str(g.resolution), "--batch-size", str(g.batch_size), "--dtype", g.dtype]


def encoder_paths(scoring: ScoringSettings) -> dict[str, str]:
    if scoring.tiny_encoders:
        tiny = Path(scoring.tiny_encoders)
        return {"dino": str(tiny / "dino"), "clip": str(tiny / "clip"), "cmmd_clip": str(tiny / "clip")}
    return {"dino": scoring.dino or DEFAULT_DINO, "clip": scoring.clip or DEFAULT_CLIP,
            "cmmd_clip": scoring.cmmd_clip or DEFAULT_CMMD_CLIP}


def score_argv(s: ScoringSettings, images: Path, real: str, out: Path, identifier: str) -> list[str]:
    """eval.score of the images in `images` against the benchmark's real images, metrics to `out`."""
    encoders = encoder_paths(s)
    command = [sys.executable, "-m", "eval.score", "--images", str(images), "--real", real, "--out", str(out),
               "--dino", encoders["dino"], "--clip", encoders["clip"], "--cmmd-clip", encoders["cmmd_clip"],
               "--clip-t-prompt", s.clip_t_prompt, "--identifier", identifier, "--lpips", s.lpips or "off",
               "--batch-size", str(s.batch_size)]
    if s.device:
        command += ["--device", s.device]
    if s.cache_dir:
        command += ["--cache-dir", s.cache_dir]
    return command
