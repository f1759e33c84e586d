#!/usr/bin/env bash
# GPU check of the structured WaveFT layer, the quantized base, the memory estimate and the trainer at SDXL's real
# size (random weights, no download), for a short GPU lend (about 15 minutes, 10 per command).
#
#   bash scripts/gpu_check.sh [--out DIR] [--wheels DIR]        on a CUDA machine, about 8-10 minutes
#   bash scripts/gpu_check.sh --tiny [--out DIR]                on CPU at a tiny size: a test of this script
#
# Stages, each under its own time limit; each writes its table (DIR/<stage>.md) and log (DIR/<stage>.log) as
# soon as it ends, and gpu_check.md (every table so far) is rewritten after each, so a lend cut short still
# returns what finished. Big files (the 6.9 GB model, the run, the subject) go to a temporary folder, never DIR.
# 1. build:    the full-size random SDXL (python3 -m waveft.tiny --size full), in the temporary folder.
# 2. step:     one training step (bf16, gradient checkpointing, AdamW, batch 1) of the full-size UNet at 1024 px for
#              frozen / LoRA r1 / PEFT WaveFT / structured WaveFT (scripts/bench_adapters.py --sections c).
# 3. kernels:  the structured backward's spectrum gradient, sampled_addmm vs gather + vecdot, at SDXL's shapes
#              (section g), to choose the faster per device.
# 4. quantized: the structured WaveFT's step over a bf16, int8 and nf4 base (section f): time and memory.
# 5. estimate: waveft.train.memory_estimate's peak for configs/sdxl_waveft_paper.yaml (bf16, int8, nf4) against
#              torch.cuda.max_memory_allocated of the same training step on the GPU, and their ratio.
# 6. train:    20 optimizer steps of configs/sdxl_waveft_paper.yaml with the real trainer at 1024 px.
# Writes into DIR (default $OUT if set, else .cache/gpu-check).
#
# Wheels to carry to a GPU machine whose Python 3.12 has torch, transformers and accelerate but not the rest
# (`pip download --no-deps -d wheels/ <name>` on any machine with the same Python):
#   diffusers-0.42.1-py3-none-any.whl
#   pywavelets-1.9.0-cp312-cp312-manylinux_2_17_x86_64.manylinux2014_x86_64.whl
#   peft-0.21.2-py3-none-any.whl
#   bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl
# --wheels DIR installs every wheel in DIR (pip install --no-deps) before the check.
set -euo pipefail
cd "$(dirname "$0")/.."

tiny=0
out="${OUT:-.cache/gpu-check}"
wheels=""
while [ $# -gt 0 ]; do
  case "$1" in
    --tiny) tiny=1 ;;
    --out) out="$2"; shift ;;
    --wheels) wheels="$2"; shift ;;
    *) echo "error: unknown argument $1 (expected --tiny, --out DIR, --wheels DIR)" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$out"
out="$(cd "$out" && pwd)"
work="$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")"
trap 'rm -rf "$work"' EXIT
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout, installed or not
if [ -n "$wheels" ]; then
  python3 -m pip install -q --no-deps "$wheels"/*.whl
fi

if [ "$tiny" = 1 ]; then
  size=(--tiny-unet --full-resolution 64 --step-repeats 1)
  model="$work/tiny-sdxl"
  limit=600
  paper=(data.resolution=64 adapter.peft.n_frequency=64 train.mixed_precision=no)  # 64 x 64 projections
  train=(train.max_steps=2 train.gradient_accumulation_steps=1)
else
  python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'error: no CUDA device (use --tiny on CPU)')"
  size=(--full-resolution 1024 --step-repeats 5 --clock cuda-events)
  model="$work/sdxl-full"
  limit=240
  paper=()
  train=(train.max_steps=20)
fi

# run_stage NAME SECONDS COMMAND...: its output to DIR/NAME.log; the table it writes is DIR/NAME.md.
run_stage() {
  local name="$1" seconds="$2"; shift 2
  local start; start=$(date +%s)
  echo "== $name (limit ${seconds}s): $*"
  local status=0
  timeout --kill-after=10 "$seconds" "$@" > >(tee "$out/$name.log") 2>&1 || status=$?
  echo "== $name: exit $status after $(( $(date +%s) - start )) s" | tee -a "$out/$name.log"
  { echo "# GPU check: tables so far"; echo; for table in "$out"/{step,kernels,quantized,estimate,train}.md; do
      [ -f "$table" ] && { cat "$table"; echo; }; done; } > "$out/gpu_check.md"
  return $status
}

failed=0
if [ "$tiny" = 1 ]; then
  run_stage build 300 python3 -m waveft.tiny "$model" || failed=1
else
  run_stage build 420 python3 -m waveft.tiny "$model" --size full || failed=1
fi
run_stage step "$limit" python3 scripts/bench_adapters.py --sections c "${size[@]}" --out "$out/step.md" || failed=1
run_stage kernels 120 python3 scripts/bench_adapters.py --sections g "${size[@]}" --out "$out/kernels.md" || failed=1
run_stage quantized "$limit" python3 scripts/bench_adapters.py --sections f --quantize none,int8,nf4 "${size[@]}" \
  --out "$out/quantized.md" || failed=1
run_stage estimate "$limit" python3 scripts/estimate_vs_measured.py --model "$model" --out "$out/estimate.md" \
  -- "${paper[@]}" || failed=1

start=$(date +%s)
if run_stage train "$limit" python3 train_dreambooth_waveft.py --config configs/sdxl_waveft_paper.yaml \
    output_dir="$work/run" overwrite_output_dir=true model.pretrained="$model" \
    data.instance_dir="$work/toy_ball" data.synthetic_if_missing=true \
    train.checkpointing_steps=1000 train.report_to=none validation.every_steps=0 validation.final=false \
    "${paper[@]}" "${train[@]}"; then
  python3 - "$work/run/run_info.json" "$(( $(date +%s) - start ))" > "$out/train.md" <<'EOF'
import json, sys

info = json.load(open(sys.argv[1]))
print("### Trainer: configs/sdxl_waveft_paper.yaml on the full-size random pipeline\n\n| | |\n|---|---|")
for key in ("adapted_layers", "trainable_parameters", "steps", "train_seconds", "final_loss", "peak_memory_bytes",
            "peak_memory_kind"):
    if key in info:
        print(f"| {key} | {info[key]} |")
print(f"| wall clock of the trainer process, loading included | {sys.argv[2]} s |")
EOF
  run_stage summary 10 true
else
  failed=1
fi
cat "$out/gpu_check.md"
exit $failed
