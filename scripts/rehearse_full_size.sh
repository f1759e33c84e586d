#!/usr/bin/env bash
# Full-size SDXL rehearsal on CPU (random weights, no download): build once, train the paper's config a few
# steps at 256 px, reload in stock PEFT and merge, generate, export; prints a table. See rehearse_full_size.py.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python scripts/rehearse_full_size.py "$@"
