#!/usr/bin/env bash
# The offline quick start, on the built-in tiny SDXL and smoke-test encoders (random weights: the numbers only
# show that every stage runs): write a tiny benchmark, train, generate the benchmark prompts, score, report.
set -euo pipefail
cd "$(dirname "$0")/.."
BENCHMARK=.cache/tiny-benchmark ENCODERS=.cache/tiny-encoders
RUN=outputs/tiny  # configs/tiny.yaml's output_dir
IMAGES=outputs/tiny-benchmark METRICS=outputs/tiny-metrics REPORT=outputs/tiny-report
python -m eval.tiny_benchmark "$BENCHMARK"
python train_dreambooth_waveft.py --config configs/tiny.yaml overwrite_output_dir=true "$@"
rm -rf "$IMAGES"  # images of an earlier tiny run would be kept as already done
python -m eval.generate_benchmark --runs "$RUN" --benchmark "$BENCHMARK" --out "$IMAGES" \
  --resolution 64 --steps 4 --seeds 42 43 --dtype fp32
[ -f "$ENCODERS/dino/config.json" ] || python -m eval.tiny_encoders "$ENCODERS"
python -m eval.score --images "$IMAGES/tiny" --real "$BENCHMARK" --out "$METRICS" \
  --dino "$ENCODERS/dino" --clip "$ENCODERS/clip" --cmmd-clip "$ENCODERS/clip"
python -m eval.report "$METRICS" --out "$REPORT"
cat <<DONE

Quick start done (random weights: the pictures and numbers only show that every stage runs).
  training run:     $RUN (adapter/, loss.png, samples/grid.png)
  benchmark images: $IMAGES/tiny
  metrics:          $METRICS/metrics.md
  report:           $REPORT/index.html (open it in a browser)
DONE
