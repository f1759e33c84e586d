#!/usr/bin/env bash
# GPU check of the structured WaveFT layer and the trainer at SDXL's real size (random weights, no download).
#
#   bash scripts/gpu_check.sh [--out DIR] [--wheels DIR]        on a CUDA machine, about 6-8 minutes
#   bash scripts/gpu_check.sh --tiny [--out DIR]                on CPU at a tiny size: a test of this script
#
# 1. One training step (bf16, gradient checkpointing, AdamW, batch 1) of the full-size SDXL UNet (built directly
#    on the GPU in bf16) at 1024 px for frozen / LoRA r1 / PEFT WaveFT / structured WaveFT: median step time by
#    CUDA events and torch.cuda.max_memory_allocated (scripts/bench_adapters.py --sections c).
# 2. 20 optimizer steps of configs/sdxl_waveft_paper.yaml with the real trainer on a full-size random SDXL
#    pipeline (python -m waveft.tiny --size full) at 1024 px.
# Writes DIR/gpu_check.md (default $OUT if set, else .cache/gpu-check) with both tables.
#
# Wheels to carry to a GPU machine whose Python 3.12 has torch, transformers and accelerate but not the rest
# (about 11 MB; `pip download --no-deps -d wheels/ <name>` on any machine with the same Python):
#   diffusers-0.42.1-py3-none-any.whl
#   pywavelets-1.9.0-cp312-cp312-manylinux_2_17_x86_64.manylinux2014_x86_64.whl
#   peft-0.21.2-py3-none-any.whl
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
if [ -n "$wheels" ]; then
  python -m pip install -q --no-deps "$wheels"/*.whl
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout, installed or not

if [ "$tiny" = 1 ]; then
  bench=(--sections c --tiny-unet --full-resolution 64 --step-repeats 1)
  model="$out/tiny-sdxl"
  python -m waveft.tiny "$model"
  train=(data.resolution=64 train.max_steps=2 train.gradient_accumulation_steps=1 train.mixed_precision=no
         adapter.peft.n_frequency=64)  # the tiny model's projections are 64 x 64
else
  python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'error: no CUDA device (use --tiny on CPU)')"
  bench=(--sections c --full-resolution 1024 --step-repeats 5 --clock cuda-events)
  model="$out/sdxl-full"
  [ -f "$model/model_index.json" ] || python -m waveft.tiny "$model" --size full
  train=(train.max_steps=20)
fi

python scripts/bench_adapters.py "${bench[@]}" --out "$out/step.md"

start=$(date +%s)
python train_dreambooth_waveft.py --config configs/sdxl_waveft_paper.yaml \
  output_dir="$out/run" overwrite_output_dir=true model.pretrained="$model" \
  data.instance_dir="$out/toy_ball" data.synthetic_if_missing=true \
  train.checkpointing_steps=1000 train.report_to=none validation.every_steps=0 validation.final=false \
  "${train[@]}"
seconds=$(( $(date +%s) - start ))

python - "$out" "$seconds" <<'EOF'
import json, os, sys

out, seconds = sys.argv[1], int(sys.argv[2])
info = json.load(open(os.path.join(out, "run", "run_info.json")))
rows = "\n".join(f"| {key} | {info[key]} |" for key in ("adapted_layers", "trainable_parameters", "steps", "train_seconds", "final_loss")
                 if key in info)
text = open(os.path.join(out, "step.md")).read() + (
    f"\n### Trainer: configs/sdxl_waveft_paper.yaml on the full-size random pipeline\n\n| | |\n|---|---|\n{rows}\n"
    f"| wall clock of the trainer process, loading included | {seconds} s |\n"
)
with open(os.path.join(out, "gpu_check.md"), "w") as f:
    f.write(text)
print(text)
EOF
