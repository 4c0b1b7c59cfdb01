#!/usr/bin/env bash
# CI: the real-host check (run_check.sh) against a scratch copy of the ComfyUI tree that CI lays out beside the
# repository (../shared/comfyui, see its COMFYUI.md), in a virtual environment of its own.
#
#   tests/comfy_host/ci.sh [COMFY_SOURCE] [VENV]
#
# COMFY_SOURCE defaults to ../shared/comfyui; VENV (default .venv-comfy) is built when missing: ComfyUI's
# requirements without torchvision, torchaudio, spandrel and kornia (no CPU build for this torch, or they pull a
# CUDA torch), plus requests (imported by ComfyUI, not listed) and the pack's own requirements, with the same CPU
# torch as the main test environment. Set COMFY_VENV_REBUILD=1 to rebuild it.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
SRC="$(cd "${1:-$REPO/../shared/comfyui}" && pwd)"
VENV="$(realpath -m "${2:-$REPO/.venv-comfy}")"  # absolute: the check runs ComfyUI from its own folder

if [ "${COMFY_VENV_REBUILD:-0}" = 1 ] || [ ! -x "$VENV/bin/python" ]; then
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    grep -viE '^\s*(torchvision|torchaudio|spandrel|kornia)\b' "$SRC/requirements.txt" > "$VENV/comfy-requirements.txt"
    "$VENV/bin/pip" install -q torch==2.13.0 requests -r "$VENV/comfy-requirements.txt" -r "$REPO/requirements.txt"
fi

SCRATCH="$(mktemp -d "${TMPDIR:-/tmp}/twig-comfyui.XXXXXX")"
trap 'rm -rf "$SCRATCH"' EXIT
cp -r "$SRC" "$SCRATCH/ComfyUI"
chmod -R u+w "$SCRATCH/ComfyUI"
# a ComfyUI checkout ships input/example.png (768², the image workflows' default); this tree may not carry it
if [ ! -f "$SCRATCH/ComfyUI/input/example.png" ]; then
    mkdir -p "$SCRATCH/ComfyUI/input"
    "$VENV/bin/python" -c 'import sys, numpy as np; from PIL import Image; y, x = np.mgrid[0:768, 0:768]; Image.fromarray(np.stack([x / 3, y / 3, (x + y) / 6], -1).astype("uint8")).save(sys.argv[1])' "$SCRATCH/ComfyUI/input/example.png"
fi
COMFY_PYTHON="$VENV/bin/python" "$REPO/tests/comfy_host/run_check.sh" "$SCRATCH/ComfyUI"
