"""Training cost of LoRA rank 1, PEFT's WaveFT and the structured WaveFT at the same trainable-parameter budget.

    python scripts/bench_adapters.py [--quick] [--out BENCHMARKS.md]

(a) every distinct SDXL attention projection (to_q/to_k/to_v/to_out.0, taken from the real SDXL UNet config
    on the meta device) at 1024-px token counts: forward + backward of one layer;
(b) one training step (forward, backward, AdamW) of an SDXL-shaped UNet: real channel widths and attention
    shapes, depth and resolution reduced for a CPU; with CUDA also the full SDXL UNet at 1024 px in bf16.
(c), (d): the full-size UNet's step; the cost's growth with the budget.
(e) waveft.train.memory_estimate's peak for configs/sdxl_waveft_paper.yaml: LoRA r1 / PEFT WaveFT / structured WaveFT
    over a bf16, int8 and nf4 base, gradient checkpointing on and off (no weights: seconds each).
(f) the structured WaveFT's training step over the same UNet unquantized and quantized (--quantize).
(g) the structured backward's spectrum gradient by sampled_addmm vs gather + vecdot at SDXL's shapes.

Variants: frozen base, LoRA r=1, PEFT WaveFT and structured WaveFT with n_frequency = in + out per layer (the
LoRA r=1 budget). Times are medians over interleaved repeats. Peak memory is the peak of bytes held by tensors
allocated during the step (CPU: a dispatch-mode tracker of tensor storages; CUDA: max_memory_allocated).
"""
import argparse
import copy
import datetime
import functools
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass

import torch

from waveft.adapters.structured_waveft import enable_structured_waveft
from waveft.adapters.waveft_locations import shared_waveft_locations
from waveft.fixtures.tiny import SDXL_UNET_CONFIG, materialise, tiny_unet_config
from waveft.models import quantize_linear_layers
from waveft.train.memory_estimate import EstimateUnavailable, LiveStorage, estimate_step_memory

TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TOKENS = 77
VARIANTS = ["base", "lora_r1", "peft_waveft", "structured_waveft"]
VARIANT_TITLES = {
    "base": "frozen base",
    "lora_r1": "LoRA r1",
    "peft_waveft": "PEFT WaveFT",
    "structured_waveft": "structured WaveFT",
}


def target_module_names(model) -> list:
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
        and (name.split(".")[-1] in ("to_q", "to_k", "to_v") or name.endswith(".to_out.0"))
    ]


def add_adapter(model, variant: str, budget: int = 1):
    """Put `variant` on every attention projection of `model` at `budget` LoRA-rank-1 units (LoRA r=budget,
    WaveFT n_frequency = budget * (in + out)); returns the trainable params."""
    from peft import LoraConfig, WaveFTConfig, inject_adapter_in_model

    model.requires_grad_(False)
    if variant == "base":
        return []
    names = target_module_names(model)
    if variant == "lora_r1":
        config = LoraConfig(r=budget, lora_alpha=budget, target_modules=TARGET_MODULES)
    else:
        n_frequency = {}
        for name in names:
            layer = model.get_submodule(name)
            n_frequency[name] = budget * (layer.in_features + layer.out_features)
        config = WaveFTConfig(n_frequency=2592, n_frequency_pattern=n_frequency, target_modules=TARGET_MODULES)
    with shared_waveft_locations():
        inject_adapter_in_model(config, model)
    if variant == "structured_waveft":
        enable_structured_waveft(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        for p in trainable:
            p.data = p.data.float()  # as get_peft_model(autocast_adapter_dtype=True) does
            if variant != "lora_r1":
                p.normal_(0, 1e-3)  # nonzero spectra; LoRA's B stays zero as initialised
    return trainable


@dataclass
class Measurement:
    seconds: float
    peak_bytes: int


def cuda_event_seconds(step) -> float:
    """Seconds `step` takes on the current CUDA stream, by CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    step()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


CLOCKS = {
    "wall": time.perf_counter,
    # CPU time of the calling thread: with --threads 1 all of torch's CPU work runs on it, and time spent
    # descheduled by other tenants of the machine is not counted.
    "thread": time.thread_time,
    "cuda-events": cuda_event_seconds,  # CUDA only
}


def interleaved_medians(steps: dict, warmup: int, repeats: int, synchronize, clock) -> dict:
    """Median time of each step function, repeats interleaved across variants so drift hits all alike."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            synchronize()
            if clock is cuda_event_seconds:
                times[name].append(cuda_event_seconds(step))
                continue
            start = clock()
            step()
            synchronize()
            times[name].append(clock() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def peak_memory(step, device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize()
        baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - baseline
    with LiveStorage() as tracker:
        step()
    return tracker.peak


def synchronizer(device: torch.device):
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


# ---------------------------------------------------------------- (a) one attention projection per SDXL shape


@dataclass(frozen=True)
class ProjectionShape:
    tokens: int
    in_features: int
    out_features: int
    count: int  # how many of SDXL's 560 projections have it

    @property
    def label(self) -> str:
        return f"{self.tokens} x {self.in_features} -> {self.out_features} (x{self.count})"


def sdxl_projection_shapes(latent_size: int = 128) -> list:
    """Distinct (tokens, in, out) of SDXL's attention projections at 1024 px (latent 128 x 128)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(SDXL_UNET_CONFIG)
    levels = len(SDXL_UNET_CONFIG["block_out_channels"])
    counts = {}
    for name in target_module_names(unet):
        layer = unet.get_submodule(name)
        block, index = name.split(".")[:2]
        if block == "down_blocks":
            level = int(index)
        elif block == "up_blocks":
            level = levels - 1 - int(index)
        else:  # mid_block
            level = levels - 1
        cross = ".attn2." in name and name.split(".")[-1] in ("to_k", "to_v")
        tokens = TEXT_TOKENS if cross else (latent_size // 2**level) ** 2
        key = (tokens, layer.in_features, layer.out_features)
        counts[key] = counts.get(key, 0) + 1
    assert sum(counts.values()) == 560, counts
    return [ProjectionShape(*key, count) for key, count in sorted(counts.items(), key=lambda kv: -kv[1])]


class OneProjection(torch.nn.Module):
    def __init__(self, in_features, out_features):
        super().__init__()
        self.to_q = torch.nn.Linear(in_features, out_features)


def bench_projection(shape: ProjectionShape, device, dtype, warmup, repeats, clock, variants=VARIANTS, budget=1):
    torch.manual_seed(0)
    base = OneProjection(shape.in_features, shape.out_features).to(device, dtype)
    models = {}
    for variant in variants:
        models[variant] = copy.deepcopy(base)
        add_adapter(models[variant], variant, budget)
    x = torch.randn(shape.tokens, shape.in_features, device=device, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(shape.tokens, shape.out_features, device=device, dtype=dtype)

    def step_of(model):
        def step():
            model.to_q(x).backward(grad_out)
            x.grad = None
            model.zero_grad(set_to_none=True)

        return step

    steps = {variant: step_of(model) for variant, model in models.items()}
    seconds = interleaved_medians(steps, warmup, repeats, synchronizer(device), clock)
    return {v: Measurement(seconds[v], peak_memory(steps[v], device)) for v in variants}


def bench_budget_growth(budgets, device, dtype, warmup, repeats, clock) -> dict:
    """{budget: {variant: Measurement}} for LoRA r=budget and structured WaveFT at the same budget over SDXL's
    560 projections at 1024-px token counts (time: sum over the 560; memory: the largest projection's)."""
    variants = ["lora_r1", "structured_waveft"]
    growth = {}
    for budget in budgets:
        total = {v: 0.0 for v in variants}
        largest = {v: 0 for v in variants}
        for shape in sdxl_projection_shapes():
            measured = bench_projection(shape, device, dtype, warmup, repeats, clock, variants, budget)
            for v in variants:
                total[v] += shape.count * measured[v].seconds
                largest[v] = max(largest[v], measured[v].peak_bytes)
        growth[budget] = {v: Measurement(total[v], largest[v]) for v in variants}
        print(f"budget {budget}: " + ", ".join(f"{v} {m.seconds:.2f} s" for v, m in growth[budget].items()))
    return growth


def budget_growth_table(growth: dict) -> str:
    lines = [
        "### (d) Cost growth with the budget: all 560 SDXL projections, forward + backward, 1024-px token counts",
        "",
        "| budget (LoRA rank) | LoRA time (ms) | structured WaveFT time (ms) | structured / LoRA "
        "| LoRA time / budget 1 | structured time / budget 1 | LoRA peak (MiB) | structured peak (MiB) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    first = growth[min(growth)]
    for budget, m in growth.items():
        lora, structured = m["lora_r1"], m["structured_waveft"]
        lines.append(
            f"| {budget} | {lora.seconds * 1e3:.1f} | {structured.seconds * 1e3:.1f} | "
            f"{ratio(structured.seconds, lora.seconds)} | {ratio(lora.seconds, first['lora_r1'].seconds)} | "
            f"{ratio(structured.seconds, first['structured_waveft'].seconds)} | {lora.peak_bytes / 2**20:.1f} | "
            f"{structured.peak_bytes / 2**20:.1f} |"
        )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- (b) one UNet training step


REDUCED_UNET = dict(layers_per_block=1, transformer_layers_per_block=(1, 2, 4))


def unet_config(reduced: bool, latent_size: int) -> dict:
    return dict(SDXL_UNET_CONFIG, sample_size=latent_size, **(REDUCED_UNET if reduced else {}))


def sharing_frozen_weights(model):
    """A deep copy of `model` whose parameters and buffers are `model`'s own: variants differ only in adapters."""
    memo = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return copy.deepcopy(model, memo)


def frozen_unet_and_inputs(config, device, dtype) -> tuple:
    """The UNet of `config` with random frozen weights (seed 0), the conditioning of one sample and its latents:
    (base, inputs for its forward besides the latents, latents)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    with torch.device("meta"):
        base = UNet2DConditionModel.from_config(config)
    base = materialise(base, dtype, device).requires_grad_(False)  # never a full fp32 copy on the way
    size = config["sample_size"]
    pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
    inputs = dict(
        timestep=torch.tensor([500], device=device),
        encoder_hidden_states=torch.randn(1, TEXT_TOKENS, config["cross_attention_dim"], device=device, dtype=dtype),
        added_cond_kwargs=dict(
            text_embeds=torch.randn(1, pooled, device=device, dtype=dtype),
            time_ids=torch.tensor([[size * 8, size * 8, 0, 0, size * 8, size * 8]], device=device, dtype=dtype),
        ),
    )
    latents = torch.randn(1, 4, size, size, device=device, dtype=dtype)
    return base, inputs, latents


def bench_unet_step(config, device, dtype, warmup, repeats, clock, gradient_checkpointing=False):
    """One training step per variant, the variants interleaved; returns ({variant: Measurement}, trainable counts)."""
    base, inputs, latents = frozen_unet_and_inputs(config, device, dtype)
    target = torch.randn(latents.shape, device=device, dtype=dtype)

    def step_of(variant):
        unet = sharing_frozen_weights(base)
        trainable = add_adapter(unet, variant)
        if gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        unet.train()
        sample = latents.clone().requires_grad_(not trainable)  # frozen base: backward to the input latents
        optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=1e-4) if trainable else None

        def step():
            loss = torch.nn.functional.mse_loss(unet(sample, **inputs).sample.float(), target.float())
            loss.backward()
            if optimizer:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            sample.grad = None

        return step, sum(p.numel() for p in trainable)

    steps, trainable_counts = {}, {}
    for variant in VARIANTS:
        steps[variant], trainable_counts[variant] = step_of(variant)
    seconds = interleaved_medians(steps, warmup, repeats, synchronizer(device), clock)
    return {v: Measurement(seconds[v], peak_memory(steps[v], device)) for v in VARIANTS}, trainable_counts


# ---------------------------------------------------------------- (e) estimated peak memory of the paper config

ESTIMATE_METHODS = {
    "structured WaveFT": (),
    "LoRA r1": ("adapter.type=lora", "adapter.peft={}", "adapter.budget=1"),
    "PEFT WaveFT": ("adapter.implementation=peft",),
}
PAPER_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                            "sdxl_waveft_paper.yaml")


def estimate_table(resolution: int) -> str:
    """waveft.train.memory_estimate for configs/sdxl_waveft_paper.yaml (bf16) at `resolution`: each method over a bf16,
    int8 and nf4 base, gradient checkpointing on and off."""
    from waveft.config import load_config

    lines = [
        f"### (e) Estimated peak accelerator memory of a training step, configs/sdxl_waveft_paper.yaml at "
        f"{resolution} px (bf16, batch 1; `--estimate-memory`, no weights; CUDA context not included)",
        "",
        "| method | base | gradient checkpointing | weights (GiB) | adapter + optimizer (GiB) | activations (GiB) "
        "| largest temporary (GiB) | total (GiB) |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for checkpointing in ("true", "false"):
        for quantize in ("none", "int8", "nf4"):
            for method, overrides in ESTIMATE_METHODS.items():
                cfg = load_config(PAPER_CONFIG, (*overrides, f"model.quantize={quantize}",
                                                 f"data.resolution={resolution}",
                                                 f"train.gradient_checkpointing={checkpointing}"))
                base = "bf16" if quantize == "none" else quantize
                row = f"| {method} | {base} | {'on' if checkpointing == 'true' else 'off'} | "
                try:
                    e = estimate_step_memory(cfg)
                except EstimateUnavailable as exc:  # e.g. PEFT's WaveFT layer reads its indices' values
                    lines.append(row + f"not estimable: {exc} | | | | |")
                    print(lines[-1], flush=True)
                    continue
                parts = (e.weights, e.adapter_state, e.activations, e.largest_temporary, e.total)
                lines.append(row + " | ".join(f"{part / 2**30:.2f}" for part in parts) + " |")
                print(lines[-1], flush=True)
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- (f) the structured layer over a quantized base


def bench_quantized_step(config, device, dtype, kinds, warmup, repeats, clock) -> dict:
    """One training step of the structured WaveFT (budget 1) over the same UNet with its Linear layers as they
    are and quantized (`kinds`: none, int8, nf4), interleaved; {kind: (Measurement, weight bytes)}."""
    base, inputs, latents = frozen_unet_and_inputs(config, device, dtype)

    def step_of(kind):
        unet = sharing_frozen_weights(base)
        if kind != "none":
            quantize_linear_layers(unet, kind, dtype)
        weight_bytes = sum(t.untyped_storage().nbytes() for t in [*unet.parameters(), *unet.buffers()])
        trainable = add_adapter(unet, "structured_waveft")
        unet.enable_gradient_checkpointing()
        unet.train()
        optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=1e-4)

        def step():
            loss = torch.nn.functional.mse_loss(unet(latents, **inputs).sample.float(), latents.float())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step, weight_bytes

    steps, weights = {}, {}
    for kind in kinds:
        steps[kind], weights[kind] = step_of(kind)
    seconds = interleaved_medians(steps, warmup, repeats, synchronizer(device), clock)
    return {k: (Measurement(seconds[k], peak_memory(steps[k], device)), weights[k]) for k in kinds}


def quantized_step_table(measured: dict, label: str) -> str:
    lines = [f"### (f) Structured WaveFT training step over a quantized base: {label}", "",
             "| base | UNet weights (MiB) | step time (s) | step peak beyond the weights (MiB) | time / unquantized |",
             "|---|---:|---:|---:|---:|"]
    plain = measured["none"][0].seconds
    for kind, (m, weight_bytes) in measured.items():
        lines.append(f"| {kind} | {weight_bytes / 2**20:,.0f} | {m.seconds:.2f} | {m.peak_bytes / 2**20:,.0f} | "
                     f"{ratio(m.seconds, plain)} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- (g) the structured backward's two kernels


def bench_backward_kernels(shapes, device, warmup, repeats, clock) -> list:
    """For each projection shape: the structured layer's spectrum gradient (fp32) by `sampled_addmm` and by
    gather + `vecdot`, timed on the same (coefficients x tokens) operands; [(shape, {kernel: seconds})]."""
    rows = []
    for shape in shapes:
        torch.manual_seed(0)
        model = OneProjection(shape.in_features, shape.out_features).to(device)
        add_adapter(model, "structured_waveft")
        layer = model.to_q
        plan = layer._plan("default", torch.device(device))
        w_t = torch.randn(plan.output_axis.transposed_rows, shape.tokens, device=device)
        u_t = torch.randn(plan.input_axis.transposed_rows, shape.tokens, device=device)
        kernels = {"sampled_addmm": functools.partial(plan.sampled_addmm_products, w_t, u_t),
                   "gather + vecdot": functools.partial(plan.gathered_products, w_t, u_t)}
        rows.append((shape, interleaved_medians(kernels, warmup, repeats, synchronizer(device), clock)))
    return rows


def backward_kernel_table(rows: list, label: str) -> str:
    lines = [f"### (g) Structured WaveFT backward, spectrum gradient: sampled_addmm vs gather + vecdot ({label})", "",
             "| tokens x in x out | layers | sampled_addmm (ms) | gather + vecdot (ms) | vecdot / sampled_addmm |",
             "|---|---:|---:|---:|---:|"]
    totals = {"sampled_addmm": 0.0, "gather + vecdot": 0.0}
    for shape, seconds in rows:
        for kernel in totals:
            totals[kernel] += shape.count * seconds[kernel]
        lines.append(f"| {shape.tokens} x {shape.in_features} -> {shape.out_features} | {shape.count} | "
                     f"{seconds['sampled_addmm'] * 1e3:.3f} | "
                     f"{seconds['gather + vecdot'] * 1e3:.3f} | "
                     f"{ratio(seconds['gather + vecdot'], seconds['sampled_addmm'])} |")
    count = sum(shape.count for shape, _ in rows)
    lines.append(f"| all {count} layers (sum) | {count} | {totals['sampled_addmm'] * 1e3:.1f} | "
                 f"{totals['gather + vecdot'] * 1e3:.1f} | "
                 f"{ratio(totals['gather + vecdot'], totals['sampled_addmm'])} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- report


def machine_description(device, load_at_start) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    parts = [f"CPU {cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"]
    if device.type == "cuda":
        parts.append(f"GPU {torch.cuda.get_device_name()}")
    parts.append(f"date {datetime.datetime.now().isoformat(timespec='minutes')}")
    if load_at_start is not None:
        parts.append(
            f"1-minute load average {load_at_start[0]:.1f} at the start and {os.getloadavg()[0]:.1f} at the end"
            " (other jobs shared the machine when it is above the thread count)"
        )
    return ", ".join(parts)


def ratio(a, b) -> str:
    return f"{a / b:.2f}" if b else "-"


def table(title: str, rows: list) -> str:
    """rows: (label, {variant: Measurement}). One line per (row, variant) with ratios to LoRA and PEFT WaveFT."""
    lines = [
        f"### {title}",
        "",
        "| case | variant | time (ms) | peak memory (MiB) | time / LoRA | memory / LoRA "
        "| time / PEFT WaveFT | memory / PEFT WaveFT |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, measured in rows:
        lora, peft = measured["lora_r1"], measured["peft_waveft"]
        for variant in VARIANTS:
            m = measured[variant]
            lines.append(
                f"| {label} | {VARIANT_TITLES[variant]} | {m.seconds * 1e3:.1f} | {m.peak_bytes / 2**20:.1f} | "
                f"{ratio(m.seconds, lora.seconds)} | {ratio(m.peak_bytes, lora.peak_bytes)} | "
                f"{ratio(m.seconds, peft.seconds)} | {ratio(m.peak_bytes, peft.peak_bytes)} |"
            )
    return "\n".join(lines) + "\n"


def targets_summary(shape_total: dict, step: dict) -> str:
    structured, lora = step["structured_waveft"], step["lora_r1"]
    checks = [
        ("training step time <= 1.10x LoRA r1 (goal 1.05x)", structured.seconds / lora.seconds, 1.10),
        ("training step peak memory <= 1.05x LoRA r1", structured.peak_bytes / lora.peak_bytes, 1.05),
        (
            "SDXL projection set: >= 2x faster than PEFT WaveFT",
            shape_total["peft_waveft"] / shape_total["structured_waveft"],
            None,
        ),
    ]
    lines = ["### Targets", "", "| target | measured | met |", "|---|---:|---|"]
    for name, value, limit in checks:
        met = value <= limit if limit is not None else value >= 2.0
        lines.append(f"| {name} | {value:.2f}x | {'yes' if met else '**no**'} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few repeats and a small UNet: a smoke run")
    parser.add_argument("--out", help="write the Markdown report here too")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall: elapsed time; thread: CPU time of the main thread, for --threads 1 on a shared machine",
    )
    parser.add_argument(
        "--sections", default="a,b",
        help="comma-separated: a (projections), b (reduced UNet step), c (full-size UNet step at "
        "--full-resolution, gradient checkpointing), d (cost growth with the budget, 1/3/10), e (estimated peak "
        "memory of the paper config at --estimate-resolution), f (structured WaveFT step over --quantize bases "
        "at --full-resolution), g (the structured backward's two spectrum-gradient kernels at SDXL's shapes)",
    )  # fmt: skip
    parser.add_argument("--full-resolution", type=int, default=256, help="image size of sections c and f, in pixels")
    parser.add_argument("--estimate-resolution", type=int, default=1024, help="image size of section e, in pixels")
    parser.add_argument("--quantize", default="none,nf4", help="section f: bases to compare (none, int8, nf4)")
    parser.add_argument("--step-repeats", type=int, help="timed repeats per UNet step (default: 7 in b, 2 in c)")
    parser.add_argument(
        "--tiny-unet", action="store_true", help="section c on the built-in tiny UNet: a test of this script"
    )
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    if not sections <= set("abcdefg"):
        parser.error(f"--sections: unknown {sorted(sections - set('abcdefg'))}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.clock == "thread" and (device.type == "cuda" or torch.get_num_threads() != 1):
        parser.error("--clock thread measures only the main thread: use it with --threads 1 on CPU")
    if args.clock == "cuda-events" and device.type != "cuda":
        parser.error("--clock cuda-events needs CUDA")
    clock = CLOCKS[args.clock]
    load_at_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    warmup, repeats = (1, 3) if args.quick else (3, 15)
    step_repeats = args.step_repeats or (2 if args.quick else 7)
    repeats_c = args.step_repeats or 2
    clock_name = "CPU time of the main thread" if args.clock == "thread" else "wall clock"
    report = [
        "## Adapter training cost: LoRA r1 vs PEFT WaveFT vs structured WaveFT",
        "",
        f"Machine: {machine_description(device, load_at_start)}.",
        f"Command: `python {' '.join(sys.argv)}`.",
        "",
        "Same trainable-parameter budget: LoRA rank 1 and WaveFT with n_frequency = in + out on every",
        f"to_q/to_k/to_v/to_out.0 (wavelet db1, use_idwt=True). {dtype} weights, fp32 adapter parameters.",
        f"Times ({clock_name}): medians of interleaved repeats ({repeats} per projection, {step_repeats} per reduced",
        f"UNet step, {repeats_c} per full-size step) after warm-up runs. Peak memory: bytes of tensors allocated",
        "during the step, at their peak.",
        "",
    ]
    shape_total = step = None
    if "a" in sections:
        projection_rows, shape_total = [], {v: 0.0 for v in VARIANTS}
        for shape in sdxl_projection_shapes():
            measured = bench_projection(shape, device, dtype, warmup, repeats, clock)
            projection_rows.append((shape.label, measured))
            for variant in VARIANTS:
                shape_total[variant] += shape.count * measured[variant].seconds
            times = ", ".join(f"{v} {m.seconds * 1e3:.1f} ms" for v, m in measured.items())
            print(f"projection {shape.label}: {times}")
        largest = {v: max(m[v].peak_bytes for _, m in projection_rows) for v in VARIANTS}
        set_total = {v: Measurement(shape_total[v], largest[v]) for v in VARIANTS}
        projection_rows.append(("all 560 SDXL projections (time: sum; memory: largest)", set_total))
        title = "(a) One attention projection, forward + backward, 1024-px SDXL token counts"
        report.append(table(title, projection_rows))
    if "b" in sections:
        latent = 16 if args.quick else 48
        step, counts = bench_unet_step(unet_config(True, latent), device, dtype, 1, step_repeats, clock)
        label = f"SDXL UNet, latent {latent}x{latent}, " + ", ".join(f"{k} {v}" for k, v in REDUCED_UNET.items())
        step_rows = [(label, step)]
        print(f"UNet step ({label}): " + ", ".join(f"{v} {m.seconds:.2f} s" for v, m in step.items()))
        if device.type == "cuda":
            full, _ = bench_unet_step(unet_config(False, 128), device, dtype, 2, 5, clock, gradient_checkpointing=True)
            step_rows.append(("full SDXL UNet, 1024 px (latent 128x128), bf16, gradient checkpointing", full))
            step = full
        report.append(table("(b) One UNet training step (forward, backward, AdamW)", step_rows))
        report.append(
            "Trainable parameters in (b): "
            + ", ".join(f"{VARIANT_TITLES[v]} {n:,}" for v, n in counts.items() if v != "base")
            + ". Frozen base: backward to the input latents, no optimizer.\n"
        )
    latent = args.full_resolution // 8  # sections c and f: the full-size (or --tiny-unet) UNet
    full_config = dict(tiny_unet_config(), sample_size=latent) if args.tiny_unet else unet_config(False, latent)
    if "c" in sections:
        full, counts = bench_unet_step(full_config, device, dtype, 1, repeats_c, clock, gradient_checkpointing=True)
        unet_name = "tiny UNet" if args.tiny_unet else "full SDXL UNet (all 560 projections)"
        label = f"{unet_name}, {args.full_resolution} px, {dtype}, gradient checkpointing"
        print(f"UNet step ({label}): " + ", ".join(f"{v} {m.seconds:.2f} s" for v, m in full.items()))
        title = f"(c) One training step of the full-size UNet (1 warm-up, median of {repeats_c})"
        report.append(table(title, [(label, full)]))
        report.append(
            "Trainable parameters in (c): "
            + ", ".join(f"{VARIANT_TITLES[v]} {n:,}" for v, n in counts.items() if v != "base")
            + ".\n"
        )
    if "d" in sections:
        report.append(budget_growth_table(bench_budget_growth((1, 3, 10), device, dtype, 1, repeats // 3, clock)))
    if "e" in sections:
        report.append(estimate_table(args.estimate_resolution))
    if "f" in sections:
        kinds = args.quantize.split(",")
        measured = bench_quantized_step(full_config, device, dtype, kinds, 1, repeats_c, clock)
        unet_name = "tiny UNet" if args.tiny_unet else "full SDXL UNet"
        label = (f"{unet_name}, {args.full_resolution} px, {dtype} compute, gradient checkpointing, AdamW, "
                 f"median of {repeats_c} after 1 warm-up")
        report.append(quantized_step_table(measured, label))
    if "g" in sections:
        if args.tiny_unet:
            shapes = [ProjectionShape(16, 64, 64, 64)]
        else:
            shapes = sdxl_projection_shapes(args.full_resolution // 8)
        label = f"{'tiny' if args.tiny_unet else 'SDXL'} projections at {args.full_resolution} px, fp32 operands"
        report.append(backward_kernel_table(bench_backward_kernels(shapes, device, warmup, repeats, clock), label))
    if shape_total is not None and step is not None:
        report.append(targets_summary(shape_total, step))
    text = "\n".join(report)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
