"""What exporting costs and loses: file size vs relative error |dW - BA|_F / |dW|_F of a WaveFT adapter exported
by `python -m waveft.export` as a LoRA (fixed ranks, energy thresholds), a full difference or WaveFT's own file
(`--format waveft`: its error is that of the ComfyUI node's reader against PEFT's difference, max abs of the
largest entry; its size beside the PEFT file's), with each export's peak memory (the export process's maximum
resident set size) and wall time.

    python scripts/bench_export.py --out outputs/bench-export [--sdxl-sample-blocks 2] [--native-only]

Two models: the built-in tiny SDXL, and SDXL's real shapes (its UNet config only: the export reads no base
weights). The adapters are random WaveFT adapters at budget 1 (the relative error does not depend on the
spectrum's scale; trained spectra sit at the same random locations). On SDXL the full difference is exported
for all 560 layers; a LoRA export needs one SVD per layer (minutes each for SDXL's 1280 x 2048 on a loaded
2-core CPU), so the LoRA columns come from the projections of `--sdxl-sample-blocks` transformer blocks of
each width (one export at rank 32 through the CLI; the other ranks from the same layers' singular values), and
the file size is that of the 560-layer file at that rank.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from scripts.bench_adapters import SDXL_UNET_CONFIG
from waveft.config import AdapterConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY_SETTINGS = [("waveft", []), ("full-diff", []), ("lora", ["--rank", "4"]), ("lora", ["--rank", "8"]),
                 ("lora", ["--rank", "16"]), ("lora", ["--rank", "32"]), ("lora", ["--energy", "0.9"]),
                 ("lora", ["--energy", "0.99"])]
SDXL_RANKS = [8, 16, 32, 64, 128, 256]


def make_waveft_adapter(path: str, base: str, unet, n_frequency: int, target_modules: list[str]) -> int:
    """A random WaveFT adapter on `unet` saved at `path` (kept from an earlier run), recording `base` and its
    layer shapes; its layer count."""
    from waveft.adapters.attach import attach_adapter
    from waveft.io.adapter_folder import AdapterFolder, save_adapter

    folder = AdapterFolder(path)
    if os.path.isfile(folder.run_record):
        return len(folder.read_run_record()["layer_shapes"])

    layers = attach_adapter(unet, AdapterConfig(type="waveft", target_modules=target_modules,
                                                peft={"n_frequency": n_frequency})).layers
    torch.manual_seed(0)
    for param in unet.parameters():
        if param.requires_grad:
            param.data.normal_(0, 1e-3)
    save_adapter(unet, path)
    with open(folder.run_record, "w") as f:
        json.dump({"method": "waveft", "adapter_type": "waveft", "base_model": base, "budget": 1.0,
                   "trainable_parameters": sum(x.trainable_parameters for x in layers),
                   "layer_shapes": {x.name: [x.out_features, x.in_features] for x in layers}}, f)
    return len(layers)


def run_export(adapter: str, out: str, fmt: str, extra: list[str]) -> dict:
    """One CLI export in its own process: its file size, metadata, peak RSS and wall time."""
    from safetensors import safe_open

    command = [sys.executable, "-m", "waveft.export", "--adapter", adapter, "--format", fmt, "--out", out,
               "--overwrite", *extra]
    started = time.time()
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stderr = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    if status != 0:
        raise SystemExit(f"{' '.join(command)} failed: {stderr.decode()[-2000:]}")
    with safe_open(out, framework="pt") as f:
        metadata = f.metadata()
    return {"bytes": os.path.getsize(out), "metadata": metadata, "peak_rss_mb": usage.ru_maxrss / 1024,
            "seconds": time.time() - started}


def native_error(adapter: str, native: str, base: str) -> float:
    """Worst over the layers of max |the ComfyUI node's difference from the native file - PEFT's| / max |PEFT's|."""
    import importlib.util

    from safetensors.torch import load_file

    from waveft.export.source import attach_source_adapter, dense_delta, read_source_adapter

    spec = importlib.util.spec_from_file_location("waveft_native", os.path.join(REPO, "integrations", "comfyui",
                                                                              "waveft_native.py"))
    reader = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reader)
    tensors = load_file(native)
    worst = 0.0
    for layer in attach_source_adapter(read_source_adapter(adapter), base):
        expected = dense_delta(layer)
        delta = reader.NativeLayer(layer.kohya_name, tensors).delta()
        worst = max(worst, float((delta - expected).abs().max() / expected.abs().max()))
    return worst


def row(label: str, result: dict) -> str:
    m = result["metadata"]
    if m["waveft.format"] == "waveft":
        worst = f"{result['native_error']:.1e} (lossless)"
        median = f"{result['bytes'] / result['peft_bytes']:.2f}x the PEFT file"
    elif m["waveft.format"] == "full-diff":
        worst = median = "0 (lossless)"
    else:
        worst = f"{float(m['waveft.relative_error_worst']):.3f}"
        median = f"{float(m['waveft.relative_error_median']):.3f}"
    return (f"| {label} | {result['bytes'] / 1e6:,.1f} MB | {median} | {worst} | {result['peak_rss_mb']:,.0f} MB | "
            f"{result['seconds']:.0f} s |")


HEADER = ["| export | file | rel. error median | rel. error worst | peak memory | time |", "|---|---|---|---|---|---|"]


def bench_tiny(out: str, native_only: bool = False) -> list[str]:
    from diffusers import UNet2DConditionModel

    from waveft.fixtures.tiny import ensure_tiny_sdxl

    base = os.path.join(out, "tiny-sdxl")
    ensure_tiny_sdxl(base)
    adapter = os.path.join(out, "tiny-waveft")
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    make_waveft_adapter(adapter, base, unet, 128, ["to_q", "to_k", "to_v", "to_out.0"])  # budget 1 on 64 x 64
    lines = ["Tiny SDXL (64 layers of 64 x 64), WaveFT n_frequency 128 (budget 1), fp16 files:", "", *HEADER]
    for fmt, extra in TINY_SETTINGS[:1] if native_only else TINY_SETTINGS:
        label = fmt + (" " + " ".join(extra) if extra else "")
        result = run_export(adapter, os.path.join(out, "tiny.safetensors"), fmt, [*extra, "--dtype", "fp16"])
        if fmt == "waveft":
            add_native_columns(result, adapter, os.path.join(out, "tiny.safetensors"), base)
        lines.append(row(label, result))
    return lines


def add_native_columns(result: dict, adapter: str, native: str, base: str) -> None:
    from waveft.io.adapter_folder import AdapterFolder

    result.update(native_error=native_error(adapter, native, base), peft_bytes=AdapterFolder(adapter).weights_bytes())


def sdxl_base(out: str) -> str:
    """A folder with SDXL's unet/config.json: all the export reads of a base model."""
    from waveft.export.source import unet_skeleton

    base = os.path.join(out, "sdxl-config")
    unet_skeleton(SDXL_UNET_CONFIG).save_config(os.path.join(base, "unet"))
    return base


def lora_file_bytes(shapes: list[tuple[int, int]], rank: int, itemsize: int = 2) -> int:
    return sum((o + i) * rank * itemsize + itemsize for o, i in shapes)


def bench_sdxl(out: str, sample_blocks: int, native_only: bool = False) -> list[str]:
    from waveft.export.source import attach_source_adapter, dense_delta, read_source_adapter, unet_skeleton

    base = sdxl_base(out)
    full = os.path.join(out, "sdxl-waveft")
    make_waveft_adapter(full, base, unet_skeleton(SDXL_UNET_CONFIG), 2592, ["to_q", "to_k", "to_v", "to_out.0"])
    native = run_export(full, os.path.join(out, "sdxl-native.safetensors"), "waveft", [])
    add_native_columns(native, full, os.path.join(out, "sdxl-native.safetensors"), base)
    if native_only:
        return ["SDXL's real shapes (560 layers), WaveFT n_frequency 2592 (budget 1):", "", *HEADER,
                row("waveft, native (560 layers)", native)]
    diff = run_export(full, os.path.join(out, "sdxl-full-diff.safetensors"), "full-diff", ["--dtype", "fp16"])
    shapes = [(x.out_features, x.in_features) for x in attach_source_adapter(read_source_adapter(full), base)]
    os.remove(os.path.join(out, "sdxl-full-diff.safetensors"))
    # The sample: every projection of the first `sample_blocks` transformer blocks of each width.
    blocks = [f"down_blocks.1.attentions.0.transformer_blocks.{i}" for i in range(min(sample_blocks, 2))]
    blocks += [f"down_blocks.2.attentions.0.transformer_blocks.{i}" for i in range(sample_blocks)]
    targets = [f"{b}.{a}.{p}" for b in blocks for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out.0")]
    sample = os.path.join(out, "sdxl-waveft-sample")
    n = make_waveft_adapter(sample, base, unet_skeleton(SDXL_UNET_CONFIG), 2592, targets)
    lora = run_export(sample, os.path.join(out, "sdxl-sample-r32.safetensors"), "lora",
                      ["--rank", "32", "--dtype", "fp16"])
    singular = [torch.linalg.svdvals(dense_delta(x)) for x in attach_source_adapter(read_source_adapter(sample), base)]
    lines = [f"SDXL's real shapes (560 layers), WaveFT n_frequency 2592 (budget 1), fp16 files. Full difference: all "
             f"560 layers; LoRA: {n} sampled layers of all four shapes, file size for all 560:", "", *HEADER,
             row("waveft, native (560 layers)", native), row("full-diff (560 layers)", diff)]
    for rank in SDXL_RANKS:
        errors = [float((s[rank:] ** 2).sum().sqrt() / (s**2).sum().sqrt()) for s in singular]
        measured = f"{lora['peak_rss_mb']:,.0f} MB ({n} layers)" if rank == 32 else ""
        lines.append(f"| lora --rank {rank} | {lora_file_bytes(shapes, rank) / 1e6:,.1f} MB | "
                     f"{statistics.median(errors):.3f} | {max(errors):.3f} | {measured} | |")
    cli = json.loads(lora["metadata"]["waveft.layer_errors"])
    m = lora["metadata"]
    lines += ["", f"The CLI's rank-32 export of the sample: median {float(m['waveft.relative_error_median']):.3f}, "
              f"worst {float(m['waveft.relative_error_worst']):.3f} over {len(cli)} layers "
              f"({lora['seconds']:.0f} s). Largest dense difference held: 1280 x 2048 fp32 = 10.5 MB."]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/bench-export")
    parser.add_argument("--sdxl-sample-blocks", type=int, default=1)
    parser.add_argument("--skip-sdxl", action="store_true")
    parser.add_argument("--skip-tiny", action="store_true")
    parser.add_argument("--native-only", action="store_true", help="only WaveFT's own file (seconds, not hours)")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    lines = [] if args.skip_tiny else bench_tiny(args.out, args.native_only)
    print("\n".join(lines), flush=True)
    if not args.skip_sdxl:
        sdxl = bench_sdxl(args.out, args.sdxl_sample_blocks, args.native_only)
        print("\n" + "\n".join(sdxl))
        lines += ["", *sdxl]
    with open(os.path.join(args.out, "bench_export.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
