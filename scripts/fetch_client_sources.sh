#!/usr/bin/env bash
# InvokeAI's source for scripts/check_client_loaders.py, from its release on PyPI (the wheel is its source tree:
# invokeai/), with the few packages its imports need, into .cache/clients/ (or $1): InvokeAI/ and packages/.
# Nothing is installed into the venv. Forge is not released on PyPI: put its checkout (with
# repositories/huggingface_guess) at .cache/clients/stable-diffusion-webui-forge or ../shared/vendor/ by hand.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST="${1:-.cache/clients}"
INVOKEAI=invokeai==6.14.2
PACKAGES=(blake3==1.0.11 picklescan==1.0.5 gguf==0.19.0 deprecated==1.3.1 wrapt==2.5.2)
if [ -f "$DEST/InvokeAI/invokeai/backend/patches/layer_patcher.py" ] && [ -d "$DEST/packages/wrapt" ]; then
    echo "client sources: $DEST (already there)"
    exit 0
fi
WHEELS="$(mktemp -d)"
trap 'rm -rf "$WHEELS"' EXIT
pip download -q --no-deps -d "$WHEELS" "$INVOKEAI" "${PACKAGES[@]}"
rm -rf "$DEST/InvokeAI" "$DEST/packages"
mkdir -p "$DEST/InvokeAI"
python -m zipfile -e "$WHEELS"/invokeai-*.whl "$DEST/InvokeAI"
rm "$WHEELS"/invokeai-*.whl
pip install -q --no-deps --target "$DEST/packages" "$WHEELS"/*.whl
echo "client sources: $DEST/InvokeAI ($INVOKEAI), $DEST/packages (${PACKAGES[*]})"
