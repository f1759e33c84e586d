"""Exports at the end of a training run (the `export:` section): which files, checked before training, written after."""
import os

from waveft.entry import return_freed_blocks_to_the_system
from waveft.export.lora import check_rank
from waveft.export.request import DEFAULT_LORA_RANK, ExportRequest
from waveft.export.writer import export_adapter
from waveft.io.run_folder import PlannedExport, RunInfo


def planned_exports(export_cfg, run_info: RunInfo) -> list[PlannedExport]:
    """The files an `export:` section asks for, named so that A1111's `<lora:NAME:1>` says what they are."""
    stem = "_".join(str(v or "") for v in (run_info.subject, run_info.method)).strip("_") or "adapter"
    stem = "".join(c if c.isalnum() or c in "-_" else "-" for c in stem)
    planned = []
    for fmt in export_cfg.formats:
        if fmt == "full-diff":
            planned.append(PlannedExport(fmt, f"{stem}_full_diff.safetensors", export_cfg.dtype))
        elif fmt == "waveft":
            planned.append(PlannedExport(fmt, f"{stem}_native.safetensors", "fp32"))
        elif export_cfg.lora_energy is not None:
            planned.append(PlannedExport(fmt, f"{stem}_lora_energy{export_cfg.lora_energy:g}.safetensors",
                                         export_cfg.dtype, energy=export_cfg.lora_energy))
        else:
            rank = export_cfg.lora_rank or DEFAULT_LORA_RANK
            planned.append(PlannedExport(fmt, f"{stem}_lora_r{rank}.safetensors", export_cfg.dtype, rank=rank))
    return planned


def check_export_fits(export_cfg, layers) -> None:
    """Before training: a fixed LoRA rank must fit every adapted layer (`layers`: rows with out/in_features)."""
    if "lora" not in export_cfg.formats or export_cfg.lora_energy is not None:
        return
    rank = export_cfg.lora_rank or DEFAULT_LORA_RANK
    check_rank(layers, rank, f"export.lora_rank={rank}")


def export_run(adapter_dir: str, planned: list[PlannedExport], say=print) -> None:
    """Write the planned files into the saved adapter folder (each atomically, replacing an earlier export)."""
    return_freed_blocks_to_the_system()
    for item in planned:
        request = ExportRequest(adapter=adapter_dir, format=item.format, out=os.path.join(adapter_dir, item.file),
                                rank=item.rank, energy=item.energy, dtype=item.dtype, overwrite=True)
        export_adapter(request, say=say)
