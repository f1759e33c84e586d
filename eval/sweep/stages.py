"""The stage CLIs a sweep calls (the trainer, eval.generate_benchmark, eval.score, eval.report): the settings of
the two eval stages as the sweep file holds them (their own dataclasses, embedded, checked by their own checks),
and every stage's command line, built here and nowhere else.
"""
import dataclasses
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from eval.generate_benchmark import BenchmarkGenerationSettings
from eval.score import ScoreSettings
from waveft.errors import UserError


@dataclass(frozen=True)
class ScoringSettings(ScoreSettings):
    """eval.score's settings (ScoreSettings, whose defaults apply), and the sweep's smoke-test encoders."""

    # Smoke-test encoders: built here with eval.tiny_encoders if missing, used for DINO, CLIP and CMMD.
    tiny_encoders: Optional[str] = None

    def score_settings(self) -> ScoreSettings:
        """What eval.score is given: these settings, with the tiny encoders in place of the named ones."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(ScoreSettings)}
        if self.tiny_encoders:
            tiny = Path(self.tiny_encoders)
            values.update(dino=str(tiny / "dino"), clip=str(tiny / "clip"), cmmd_clip=str(tiny / "clip"))
        return ScoreSettings(**values)


def check_stage_settings(generation: BenchmarkGenerationSettings, scoring: ScoringSettings, source: str) -> None:
    generation.check(source, "generation")
    defaults = ScoreSettings()
    if scoring.tiny_encoders and (scoring.dino, scoring.clip, scoring.cmmd_clip) != (
            defaults.dino, defaults.clip, defaults.cmmd_clip):
        raise UserError(f"{source}: key 'scoring.tiny_encoders' replaces 'scoring.dino', 'scoring.clip' and "
                        "'scoring.cmmd_clip': set either")
    scoring.check(source, "scoring")
    check_stage_inputs(generation, scoring, source)
    if scoring.lpips is not None and importlib.util.find_spec("lpips") is None:
        raise UserError(f"{source}: key 'scoring.lpips' is {scoring.lpips!r}, which needs the lpips package "
                        "(pip install lpips==0.1.4; it pulls torchvision); or set scoring.lpips=null")


def check_stage_inputs(generation: BenchmarkGenerationSettings, scoring: ScoringSettings, source: str) -> None:
    """Open what the stages after training will read (the drift prompts file; the encoders' configs, not their
    weights), so that a missing or wrong file fails the sweep (and its dry run) now, not hours later."""
    from eval.encoders import ClipEncoder, DinoEncoder

    if generation.drift and generation.drift_prompts:
        try:
            generation.drift_prompt_list()
        except UserError as exc:
            raise UserError(f"{source}: key 'generation.drift_prompts': {exc}") from None
    tiny = scoring.tiny_encoders
    if tiny and not all((Path(tiny) / name / "config.json").is_file() for name in ("dino", "clip")):
        return  # the launch builds them
    key = "scoring.tiny_encoders" if tiny else None
    settings = scoring.score_settings()
    for encoder, name, own_key in ((DinoEncoder, settings.dino, "scoring.dino"),
                                   (ClipEncoder, settings.clip, "scoring.clip"),
                                   (ClipEncoder, settings.cmmd_clip, "scoring.cmmd_clip")):
        try:
            encoder.check_source(name)
        except UserError as exc:
            raise UserError(f"{source}: key '{key or own_key}': {exc}") from None


REPO = Path(__file__).resolve().parents[2]
TRAIN_SCRIPT = REPO / "train_dreambooth_waveft.py"


def train_argv(config: str, overrides: tuple[str, ...]) -> list[str]:
    """The trainer on `config` with `key.sub=value` overrides."""
    return [sys.executable, str(TRAIN_SCRIPT), "--config", config, *overrides]


def generate_argv(g: BenchmarkGenerationSettings, runs: Path, benchmark: str, out: Path,
                  drift_base: Path) -> list[str]:
    """eval.generate_benchmark for the trained run folder `runs`, images to out/<runs' name>/; the base model's
    drift images in `drift_base`, shared by every run of the sweep's output folder (made once, reused)."""
    return [sys.executable, "-m", "eval.generate_benchmark", "--runs", str(runs), "--benchmark", benchmark,
            "--out", str(out), "--drift-base-dir", str(drift_base), *g.to_argv()]


def score_argv(s: ScoringSettings, images: Path, real: str, out: Path, identifier: str) -> list[str]:
    """eval.score of the images in `images` against the benchmark's real images, metrics to `out`."""
    return [sys.executable, "-m", "eval.score", "--images", str(images), "--real", real, "--out", str(out),
            "--identifier", identifier, *s.score_settings().to_argv()]


def report_argv(metrics_files: list[Path], out: Path) -> list[str]:
    """eval.report over these metrics files, to `out`."""
    return [sys.executable, "-m", "eval.report", *map(str, metrics_files), "--out", str(out)]
