"""Step time and peak memory of training with and without the latent cache, measured side by side.

    python scripts/bench_latent_cache.py [--model DIR] [--config YAML] [--resolution 64] [--steps 20] [--repeats 3]
                                         [--mixed-precision no|bf16|fp16] [--batch-size 1]

Each repeat trains the same run twice in fresh processes, interleaved: `data.cache_latents=false` (the VAE encodes
every micro-batch) and `data.cache_latents=true` with a warm cache (center crops, so every latent is precomputed and
the VAE leaves the accelerator during the loop). Step time is the loop's wall clock over its optimizer steps
(run_info.json's train_seconds: model loading and cache filling excluded); the process's CPU time (one compute
thread, so that it measures work even on a busy machine; it includes loading, the same for both); peak memory is
run_info.json's
peak_memory_bytes (CUDA: max_memory_allocated; CPU: the process's peak RSS, which model loading
dominates).
Medians over repeats; the ratio column is cached / uncached. Without --model it builds the tiny SDXL; for SDXL's
size give a full-size pipeline folder (e.g. one written by `python -m waveft.tiny --size full`) on a GPU.
"""
import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One compute thread per process: its CPU time then measures the work, even on a machine shared with other jobs.
THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run_once(args, work: str, name: str, cache: str, cached: bool) -> dict:
    out = os.path.join(work, name)
    command = [
        sys.executable, os.path.join(REPO, "train_dreambooth_waveft.py"), "--config", args.config,
        f"output_dir={out}", "overwrite_output_dir=true", f"model.pretrained={args.model}",
        f"data.instance_dir={os.path.join(work, 'subject')}", f"data.resolution={args.resolution}",
        "data.crop=center", f"data.cache_latents={'true' if cached else 'false'}", f"data.latent_cache_dir={cache}",
        f"train.max_steps={args.steps}", f"train.batch_size={args.batch_size}", "train.gradient_accumulation_steps=1",
        f"train.mixed_precision='{args.mixed_precision}'", "train.checkpointing_steps=0", "train.report_to=none",
        "validation.final=false", "validation.every_steps=0",
    ]
    started, cpu_before = time.time(), resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(command, check=True, capture_output=True, cwd=REPO, env={**os.environ, **THREADS})
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = (cpu_after.ru_utime + cpu_after.ru_stime) - (cpu_before.ru_utime + cpu_before.ru_stime)
    from waveft.io.run_folder import RunFolder, RunInfo

    info = RunInfo.read(RunFolder(out).run_info)
    return {"step_s": info.train_seconds / info.steps, "peak_mib": info.peak_memory_bytes / 2**20,
            "wall_s": time.time() - started, "cpu_s": cpu_s, "memory_kind": info.peak_memory_kind}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="SDXL pipeline folder (default: build the tiny one)")
    parser.add_argument("--config", default=os.path.join(REPO, "configs", "tiny.yaml"),
                        help="the run config (its adapter, text conditioning, gradient checkpointing)")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    args = parser.parse_args()
    from waveft.fixtures.synthetic_subject import write_synthetic_subject

    with tempfile.TemporaryDirectory() as work:
        if args.model is None:
            from waveft.fixtures.tiny import build_tiny_sdxl

            args.model = os.path.join(work, "tiny-sdxl")
            build_tiny_sdxl(args.model)
        write_synthetic_subject(os.path.join(work, "subject"), size=max(96, args.resolution))
        cache = os.path.join(work, "cache")
        run_once(args, work, "warm-up", cache, cached=True)  # fills the cache; not measured
        results = {"uncached": [], "cached": []}
        for repeat in range(args.repeats):
            for name in results:
                results[name].append(run_once(args, work, f"{name}-{repeat}", cache, cached=name == "cached"))
                row = results[name][-1]
                print(f"repeat {repeat} {name}: {1000 * row['step_s']:.1f} ms/step, {row['peak_mib']:.0f} MiB, "
                      f"{row['cpu_s']:.1f} s CPU, {row['wall_s']:.1f} s wall", flush=True)

    median = {name: {key: statistics.median(r[key] for r in rows) for key in ("step_s", "peak_mib", "wall_s", "cpu_s")}
              for name, rows in results.items()}
    kind = results["cached"][0]["memory_kind"]
    model = args.model if "/tmp" not in args.model else "tiny SDXL"
    print(f"model {model}, config {os.path.relpath(args.config, REPO)}, {args.resolution} px, batch "
          f"{args.batch_size}, {args.steps} steps, mixed precision {args.mixed_precision}, {args.repeats} repeats "
          f"(medians), peak memory = {kind}")
    print("| latents | step time, wall (ms) | peak memory (MiB) | process CPU time (s) | process wall clock (s) |")
    print("|---|---:|---:|---:|---:|")
    for name in ("uncached", "cached"):
        m = median[name]
        print(f"| {name} | {1000 * m['step_s']:.1f} | {m['peak_mib']:.0f} | {m['cpu_s']:.1f} | {m['wall_s']:.1f} |")
    u, c = median["uncached"], median["cached"]
    print(f"| ratio cached / uncached | {c['step_s'] / u['step_s']:.2f} | {c['peak_mib'] / u['peak_mib']:.2f} | "
          f"{c['cpu_s'] / u['cpu_s']:.2f} | {c['wall_s'] / u['wall_s']:.2f} |")


if __name__ == "__main__":
    main()
