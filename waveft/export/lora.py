"""A kohya LoRA from each layer's difference through PEFT's `convert_to_lora` (an SVD per layer), with its error."""
import statistics
from dataclasses import dataclass
from typing import Optional

import torch
from tqdm.auto import tqdm

from waveft.errors import UserError
from waveft.export.source import ExportLayer, dense_delta


def _dense_delta_layer(delta: torch.Tensor):
    """One layer as PEFT's `convert_to_lora` reads it: a tuner layer whose `get_delta_weight` is `delta`.

    PEFT's converter asks each layer whether it supports conversion; SHiRA (sparse difference), AdaLoRA and
    WaRA say no only because nobody declared it, so the difference is handed over already dense.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    class DenseDelta(torch.nn.Module, BaseTunerLayer):
        def get_delta_weight(self, adapter_name):
            return delta

        def supports_lora_conversion(self, adapter_name="default"):
            return True

    holder = torch.nn.Module()
    holder.layer = DenseDelta()
    return holder


@dataclass
class LoraLayerResult:
    name: str  # kohya name
    out_features: int
    in_features: int
    rank: int
    relative_error: float  # |dW - up @ down|_F / |dW|_F, with the factors as written (in the export dtype)
    energy_kept: float  # sum of the kept squared singular values / |dW|_F^2


@dataclass(frozen=True)
class LoraSize:
    """How a LoRA export is sized: one `rank` for every layer, or per-layer ranks keeping `energy`, the fraction
    of each layer's squared singular values (exactly one of the two is set)."""

    rank: Optional[int] = None
    energy: Optional[float] = None

    def __post_init__(self):
        if (self.rank is None) == (self.energy is None):
            raise ValueError(f"give a LoRA rank or an energy, not both or neither (got {self})")

    @property
    def converter_argument(self):
        """What PEFT's `convert_to_lora` takes for its `rank`: an int rank, or a float energy threshold."""
        return self.rank if self.rank is not None else float(self.energy)


def lora_factors(delta: torch.Tensor, size: LoraSize, dtype) -> tuple[torch.Tensor, torch.Tensor, float, float, float]:
    """(down: r x in, up: out x r, alpha, relative error, energy kept) of PEFT's conversion of one difference.

    A fixed `size.rank` gives alpha = rank and PEFT's factors; an energy threshold gives alpha = 1 and both
    factors carry sqrt(r). Either way the tools' (alpha / r) up @ down is PEFT's B @ A. A file with per-layer
    ranks needs one alpha for all layers: diffusers maps kohya alphas to layers by the most common value only.
    Cost: an SVD of the out x in matrix.
    """
    import warnings

    from peft import convert_to_lora

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, state = convert_to_lora(_dense_delta_layer(delta), size.converter_argument)
    down, up = state["layer.lora_A.weight"], state["layer.lora_B.weight"]
    r = down.shape[0]
    norm = torch.linalg.matrix_norm(delta)
    energy = min(float((torch.linalg.matrix_norm(up) / norm) ** 2), 1.0) if norm > 0 else 1.0
    alpha = float(r)
    if size.energy is not None:
        alpha, root = 1.0, r**0.5
        down, up = down * root, up * root
    down, up = down.to(dtype), up.to(dtype)
    product = (alpha / r) * (up.float() @ down.float())  # what the tools apply, from the factors as written
    error = float(torch.linalg.matrix_norm(delta - product) / norm) if norm > 0 else 0.0
    return down, up, alpha, error, energy


def check_rank(layers, rank: int, setting: str) -> None:
    """A fixed LoRA rank must fit every layer (rows with name, out_features, in_features); `setting` is how the
    user set it (`--rank 64`, `export.lora_rank=64`), for the error."""
    for layer in layers:
        if rank > min(layer.out_features, layer.in_features):
            raise UserError(f"{setting} is larger than layer {layer.name} ({layer.out_features}x"
                            f"{layer.in_features}) allows: at most {min(layer.out_features, layer.in_features)}")


def lora_tensors(layers: list[ExportLayer], size: LoraSize, dtype, progress: bool = True):
    """The kohya LoRA's tensors and each layer's result; one dense difference alive at a time."""
    tensors, results = {}, []
    for layer in tqdm(layers, desc="LoRA (SVD per layer)", disable=not progress):
        delta = dense_delta(layer)
        down, up, alpha, error, energy = lora_factors(delta, size, dtype)
        del delta
        name = layer.kohya_name
        tensors[f"{name}.lora_down.weight"] = down
        tensors[f"{name}.lora_up.weight"] = up
        tensors[f"{name}.alpha"] = torch.tensor(alpha, dtype=dtype)
        results.append(LoraLayerResult(name, layer.out_features, layer.in_features, down.shape[0], error, energy))
    return tensors, results


def format_error_table(results: list[LoraLayerResult]) -> str:
    """Relative error per layer shape (median, worst), ranks and energy kept, and the worst layer by name."""
    by_shape: dict[tuple, list[LoraLayerResult]] = {}
    for r in results:
        by_shape.setdefault((r.out_features, r.in_features), []).append(r)
    lines = ["| out x in | layers | rank | rel. error median | rel. error worst | energy kept (min) |",
             "|---|---|---|---|---|---|"]

    def row(label, group):
        ranks = sorted({r.rank for r in group})
        rank = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"
        errors = [r.relative_error for r in group]
        return (f"| {label} | {len(group)} | {rank} | {statistics.median(errors):.4f} | {max(errors):.4f} | "
                f"{min(r.energy_kept for r in group):.4f} |")

    for (out_f, in_f), group in sorted(by_shape.items()):
        lines.append(row(f"{out_f} x {in_f}", group))
    lines.append(row("all", results))
    worst = max(results, key=lambda r: r.relative_error)
    lines.append(f"worst layer: {worst.name} (rank {worst.rank}, relative error {worst.relative_error:.4f})")
    return "\n".join(lines)
