"""A training run's folder: one home for its file names, and `run_info.json` as a typed record.

The trainer writes these files, `eval.generate_benchmark` and the sweep read them; all of them name the files
through `RunFolder`.
"""
import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from typing import Optional

from waveft.errors import UserError
from waveft.io.files import FolderLayout, inside, write_json_atomic


class RunFolder(FolderLayout):
    """The paths inside one run's `output_dir`."""

    CONFIG = "config.yaml"
    RUN_INFO = "run_info.json"
    ADAPTER = "adapter"
    ADAPTER_RAW = "adapter_raw"  # the raw (non-EMA) weights beside an EMA adapter
    SAMPLES = "samples"
    VALIDATION = "validation"
    LOGS = "logs"
    WANDB_RUN_ID = "wandb_run_id"  # in logs/: the wandb run a resumed run goes on logging into
    CLASS_IMAGES = "class_images"  # the default prior-preservation folder
    CLASS_MANIFEST = "class_manifest.jsonl"  # in the prior-preservation folder: the generated class images
    LOSS_PLOT = "loss.png"
    CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
    TRAINING_STATE = "training_state.json"  # inside a checkpoint: the loop state, written last

    config = inside("CONFIG")
    run_info = inside("RUN_INFO")
    adapter = inside("ADAPTER")
    adapter_raw = inside("ADAPTER_RAW")
    samples = inside("SAMPLES")
    validation = inside("VALIDATION")
    logs = inside("LOGS")
    class_images = inside("CLASS_IMAGES")
    loss_plot = inside("LOSS_PLOT")

    @property
    def wandb_run_id(self) -> str:
        return os.path.join(self.logs, self.WANDB_RUN_ID)

    def checkpoint(self, step: int) -> str:
        return self._path(f"checkpoint-{step}")

    def validation_step(self, step: int) -> str:
        return os.path.join(self.validation, f"step-{step:06d}")


@dataclass(frozen=True)
class PlannedExport:
    """One file the `export:` section asks for, written into adapter/ at the end of the run
    (`waveft.export.run_exports`); listed in run_info.json and waveft_run.json, and in the model card."""

    format: str  # "lora", "full-diff" or "waveft"
    file: str  # its name inside the adapter folder
    dtype: str
    rank: Optional[int] = None  # lora at one rank for every layer
    energy: Optional[float] = None  # lora at per-layer ranks keeping this fraction of the squared singular values

    def to_json(self) -> dict:
        size = {"rank": self.rank} if self.rank is not None else {} if self.energy is None else {"energy": self.energy}
        return {"format": self.format, "file": self.file, **size, "dtype": self.dtype}

    @classmethod
    def from_json(cls, item: dict) -> "PlannedExport":
        return cls(item["format"], item["file"], item["dtype"], item.get("rank"), item.get("energy"))


def _optional(**kwargs):
    """A field left out of the JSON file while it is None (keys that only some runs have)."""
    return field(default=None, metadata={"omit_if_none": True}, **kwargs)


@dataclass
class RunInfo:
    """What `run_info.json` holds: the run's identity, its adapter and budget, its outcome and its cost."""

    method: str  # the name in reports (adapter.label or adapter.type)
    adapter_type: str
    seed: int
    implementation: str
    budget: Optional[float]
    trainable_parameters: int
    adapted_layers: int
    subject: str
    class_noun: str
    identifier: str
    instance_prompt: str
    base_model: str
    vae: Optional[str]
    steps: int
    final_loss: Optional[float]
    train_seconds: float
    # This invocation (a resumed run's differs from the run's total): processes that trained, the optimizer step it
    # started from (0, or its checkpoint's), and the micro-batches the main process trained.
    processes: int = 1
    first_step: int = 0
    micro_batches_trained: Optional[int] = _optional()
    # The budget's fit (waveft.adapters.budget.Budget.run_info), present when adapter.budget is set.
    budget_settings: Optional[dict] = _optional()
    budget_target_parameters: Optional[int] = _optional()
    budget_parameters: Optional[int] = _optional()
    budget_relative_error: Optional[float] = _optional()
    # Cost: peak accelerator memory (CUDA max_memory_allocated; peak RSS of the process on CPU).
    peak_memory_bytes: Optional[int] = _optional()
    peak_memory_kind: Optional[str] = _optional()  # "cuda_max_memory_allocated" or "cpu_peak_rss"
    adapter_bytes: Optional[int] = _optional()  # the adapter's size: its weights file (AdapterFolder.weights_bytes)
    # Losses by optimizer step: the training loss and, with validation.loss, the held-out loss.
    train_losses: Optional[list] = _optional()  # [[step, loss], ...]
    validation_losses: Optional[list] = _optional()  # [[step, loss], ...]
    latent_cache: Optional[dict] = _optional()  # hits and misses of the latent cache
    layer_shapes: Optional[dict] = _optional()  # adapted layer -> [out, in]: what waveft.export checks a base against
    # adapter.text_encoders: {component (AdapterFolder.TEXT_ENCODERS): {"trainable_parameters", "adapted_layers",
    # "layer_shapes" as the UNet's above, and the budget_* keys when adapter.budget is set}}; the keys above are
    # the UNet's alone.
    text_encoders: Optional[dict] = _optional()
    exports: Optional[list[PlannedExport]] = _optional()  # the export: section's files in adapter/
    # The adapter's scaling (lambda, where its method has one): added by eval.generate_benchmark's copy.
    scaling: Optional[float] = _optional()
    # Set once the final samples exist (after run_info.json is written); not part of the file.
    samples: Optional[str] = field(default=None, metadata={"in_file": False})

    def to_dict(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("in_file", True) and not (value is None and f.metadata.get("omit_if_none")):
                out[f.name] = value
        if self.exports is not None:
            out["exports"] = [item.to_json() for item in self.exports]
        return out

    def adapter_metadata(self) -> dict:
        """What travels with the adapter (waveft_run.json, the model card): the record without its loss curves."""
        return {k: v for k, v in self.to_dict().items() if k not in ("train_losses", "validation_losses")}

    def write(self, path: str) -> None:
        write_json_atomic(path, self.to_dict())

    @classmethod
    def from_dict(cls, data: dict, source: str = "run_info.json") -> "RunInfo":
        """The record from run_info.json's (or waveft_run.json's, or a copy's) mapping; keys it does not know are
        dropped; a missing required key is a UserError naming `source`."""
        if not isinstance(data, dict):
            raise UserError(f"{source}: not a run record (a JSON object)")
        fields = dataclasses.fields(cls)
        missing = [f.name for f in fields if f.default is dataclasses.MISSING and f.name not in data]
        if missing:
            raise UserError(f"{source}: missing keys {', '.join(missing)}")
        info = cls(**{f.name: data[f.name] for f in fields if f.name in data})
        if info.exports is not None:
            info.exports = [PlannedExport.from_json(item) for item in info.exports]
        return info

    @classmethod
    def read(cls, path: str | os.PathLike) -> "RunInfo":
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(f"cannot read {path}: {exc}") from None
        return cls.from_dict(data, str(path))
