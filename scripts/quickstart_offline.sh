#!/usr/bin/env bash
# The offline quick start, on the built-in tiny SDXL and smoke-test encoders (random weights: the numbers only
# show that every stage runs): write a tiny benchmark, train, generate the benchmark prompts, score.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m eval.tiny_benchmark .cache/tiny-benchmark
python train_dreambooth_waveft.py --config configs/tiny.yaml overwrite_output_dir=true "$@"
rm -rf outputs/tiny-benchmark  # images of an earlier tiny run would be kept as already done
python -m eval.generate_benchmark --runs outputs/tiny --benchmark .cache/tiny-benchmark --out outputs/tiny-benchmark \
  --resolution 64 --steps 4 --seeds 42 43 --dtype fp32
[ -f .cache/tiny-encoders/dino/config.json ] || python -m eval.tiny_encoders .cache/tiny-encoders
python -m eval.score --images outputs/tiny-benchmark/tiny --real .cache/tiny-benchmark --out outputs/tiny-metrics \
  --dino .cache/tiny-encoders/dino --clip .cache/tiny-encoders/clip --cmmd-clip .cache/tiny-encoders/clip
