"""Full-size SDXL rehearsal on CPU: the paper's WaveFT config on a random-weight SDXL base of the real size.

    bash scripts/rehearse_full_size.sh [--steps 3] [--resolution 256] [--work .cache/rehearsal]

Stages, each in its own process (so each has its own peak RSS): build the full-size random SDXL once
(`.cache/sdxl-full`), train `configs/sdxl_waveft_paper.yaml` on it (fp32: this CPU has no bf16 instructions;
gradient checkpointing; a synthetic subject; `--steps` optimizer steps at `--resolution`), reload the saved
adapter in stock PEFT and merge it (and time PEFT's own load against this project's), generate one image
with `python -m waveft.generate`, export it (full difference; WaveFT's own file) when `waveft.export` exists,
and run that file in ComfyUI's real code where it is beside the checkout (`scripts/comfyui_full_size.py`).
Prints a Markdown table: layers adapted, trainable parameters, adapter size on disk, peak RSS and seconds per
stage. Fails if a stage
fails, if the adapter does not have SDXL's 560 layers and 1,451,520 parameters, or if a stage's peak RSS
exceeds 16 GB.
"""
import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(REPO, ".cache", "sdxl-full")
CONFIG = os.path.join(REPO, "configs", "sdxl_waveft_paper.yaml")
RSS_LIMIT_GB = 16.0
EXPECTED_LAYERS, EXPECTED_TRAINABLE = 560, 1_451_520

# Stage "reload": stock PEFT loads the adapter (no project code), then the project's load path; same locations.
RELOAD = r"""
import json, sys, time, torch
from diffusers import UNet2DConditionModel
from peft import PeftModel
from peft.tuners.waveft.layer import WaveFTLayer
model, adapter = sys.argv[1:3]
unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", dtype=torch.float16)
start = time.perf_counter()
stock = PeftModel.from_pretrained(unet, adapter)
stock_seconds = time.perf_counter() - start
layers = [m for m in stock.modules() if isinstance(m, WaveFTLayer)]
trainable = sum(m.waveft_spectrum["default"].numel() for m in layers)
stock_indices = [m.waveft_indices["default"].clone() for m in layers]
start = time.perf_counter()
merged = stock.merge_and_unload()
merge_seconds = time.perf_counter() - start
from waveft.adapters.waveft_locations import shared_waveft_locations
start = time.perf_counter()
with shared_waveft_locations():
    ours = PeftModel.from_pretrained(merged, adapter)
ours_seconds = time.perf_counter() - start
ours_layers = [m for m in ours.modules() if isinstance(m, WaveFTLayer)]
same = len(ours_layers) == len(layers) and all(
    torch.equal(m.waveft_indices["default"], i) for m, i in zip(ours_layers, stock_indices))
print("RESULT " + json.dumps(dict(layers=len(layers), trainable=trainable, stock_load_s=stock_seconds,
      merge_s=merge_seconds, project_load_s=ours_seconds, same_locations=same)))
"""


class Stage:
    def __init__(self, name: str, seconds: float, peak_rss_gb: float, output: str):
        self.name, self.seconds, self.peak_rss_gb, self.output = name, seconds, peak_rss_gb, output


def run_stage(name: str, command: list[str]) -> Stage:
    """Run `command` in a child process (through a fresh interpreter, so the peak RSS is the stage's own)."""
    print(f"== {name}: {' '.join(command)}", flush=True)
    probe = (
        "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
        "print('PEAK_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)"
    )
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", probe, *command], capture_output=True, text=True, cwd=REPO)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        sys.stderr.write(result.stdout[-4000:] + result.stderr[-8000:])
        raise SystemExit(f"error: stage {name} failed (exit status {result.returncode})")
    peak_kb = int(result.stdout.rsplit("PEAK_KB", 1)[1].split()[0])
    return Stage(name, seconds, peak_kb / 2**20, result.stdout)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--work", default=os.path.join(REPO, ".cache", "rehearsal"))
    args = parser.parse_args(argv)
    run_dir = os.path.join(args.work, "run")
    adapter = os.path.join(run_dir, "adapter")
    py = sys.executable
    stages = []
    if not os.path.isfile(os.path.join(MODEL, "model_index.json")):
        stages.append(run_stage("build full-size SDXL (fp16)", [py, "-m", "waveft.tiny", MODEL, "--size", "full"]))
    overrides = [
        f"output_dir={run_dir}", "overwrite_output_dir=true", f"model.pretrained={MODEL}",
        f"data.instance_dir={os.path.join(args.work, 'toy_ball')}", "data.synthetic_if_missing=true",
        f"data.resolution={args.resolution}", f"train.max_steps={args.steps}", "train.gradient_accumulation_steps=1",
        "train.mixed_precision=no", "train.gradient_checkpointing=true",
        f"train.checkpointing_steps={args.steps + 1}", "train.report_to=none", "validation.every_steps=0",
        "validation.final=false",
    ]
    stages.append(run_stage("train", [py, "train_dreambooth_waveft.py", "--config", CONFIG, *overrides]))
    stages.append(run_stage("reload in stock PEFT + merge", [py, "-c", RELOAD, MODEL, adapter]))
    reload = json.loads(stages[-1].output.split("RESULT ", 1)[1].splitlines()[0])
    images = os.path.join(args.work, "images")
    stages.append(run_stage("generate (waveft.generate)", [
        py, "-m", "waveft.generate", "--adapter", adapter, "--base", MODEL, "--prompt", "a zjw ball on the beach",
        "--seeds", "0", "--steps", "2", "--height", str(args.resolution), "--width", str(args.resolution),
        "--dtype", "fp32", "--device", "cpu", "--out", images,
    ]))  # fmt: skip
    if importlib.util.find_spec("waveft.export") is not None:
        os.makedirs(os.path.join(args.work, "export"), exist_ok=True)
        stages.append(run_stage("export (waveft.export, full-diff)", [
            py, "-m", "waveft.export", "--adapter", adapter, "--base", MODEL, "--format", "full-diff",
            "--out", os.path.join(args.work, "export", "full-diff.safetensors"), "--overwrite",
        ]))  # fmt: skip
        native = os.path.join(args.work, "export", "native.safetensors")
        stages.append(run_stage("export (waveft.export, native waveft)", [
            py, "-m", "waveft.export", "--adapter", adapter, "--base", MODEL, "--format", "waveft", "--out", native,
            "--overwrite",
        ]))  # fmt: skip
        print(next(line for line in stages[-1].output.splitlines() if line.startswith("native WaveFT file")))
        stages += comfyui_stage(adapter, native, args)
    else:
        print("(no waveft.export in this tree: export stage skipped)")
    from waveft.io.adapter_folder import AdapterFolder

    adapter_bytes = AdapterFolder(adapter).weights_bytes()
    print_table(stages, reload, adapter_bytes, args)
    failures = []
    if (reload["layers"], reload["trainable"]) != (EXPECTED_LAYERS, EXPECTED_TRAINABLE):
        failures.append(f"adapter has {reload['layers']} layers and {reload['trainable']:,} trainable parameters")
    if not reload["same_locations"]:
        failures.append("the project's load path gave other locations than stock PEFT")
    failures += [f"stage {s.name} peaked at {s.peak_rss_gb:.1f} GB RSS" for s in stages if s.peak_rss_gb > RSS_LIMIT_GB]
    for failure in failures:
        print(f"error: {failure}")
    return 1 if failures else 0


def comfyui_stage(adapter: str, native: str, args) -> list[Stage]:
    """The native file in ComfyUI's real code (scripts/comfyui_full_size.py), where its source is beside the
    checkout: the example workflow through ComfyUI's executor, 560 patched weights against PEFT's merge."""
    sys.path.insert(0, REPO)
    from tests.comfyui_env import ABSENT, comfyui_dir

    if comfyui_dir() is None:
        print(f"(ComfyUI stage skipped: {ABSENT})")
        return []
    stage = run_stage("ComfyUI: workflow with the native file; 560 layers vs PEFT merge", [
        sys.executable, os.path.join(REPO, "scripts", "comfyui_full_size.py"), "--model", MODEL, "--adapter",
        adapter, "--native", native, "--resolution", str(args.resolution), "--work",
        os.path.join(args.work, "comfyui"),
    ])  # fmt: skip
    print(stage.output[stage.output.index("## WaveFT's own file in ComfyUI"):].rsplit("PEAK_KB", 1)[0])
    return [stage]


def print_table(stages: list[Stage], reload: dict, adapter_bytes: int, args) -> None:
    print(f"\n## Full-size SDXL rehearsal (CPU, fp32, {args.resolution} px, {args.steps} optimizer steps)\n")
    print("| | value |\n|---|---|")
    print(f"| layers adapted | {reload['layers']} |")
    print(f"| trainable parameters | {reload['trainable']:,} |")
    print(f"| adapter size on disk | {adapter_bytes / 2**20:.2f} MiB ({adapter_bytes:,} bytes) |")
    print(f"| stock PEFT `PeftModel.from_pretrained` | {reload['stock_load_s']:.1f} s |")
    print(f"| the project's load (`shared_waveft_locations`), same locations: {reload['same_locations']} "
          f"| {reload['project_load_s']:.1f} s |")
    print(f"| stock PEFT `merge_and_unload` | {reload['merge_s']:.1f} s |")
    print("\n| stage | seconds | peak RSS |\n|---|---|---|")
    for stage in stages:
        print(f"| {stage.name} | {stage.seconds:.0f} | {stage.peak_rss_gb:.1f} GB |")


if __name__ == "__main__":
    sys.exit(main())
