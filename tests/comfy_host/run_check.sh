#!/usr/bin/env bash
# Check the pack inside a real ComfyUI, headless on the CPU.
#
#   COMFY_PYTHON=/path/to/comfy/venv/bin/python tests/comfy_host/run_check.sh COMFY_DIR
#
# COMFY_DIR is a ComfyUI checkout whose requirements are installed for COMFY_PYTHON (default: python3).
# The script links this repository into COMFY_DIR/custom_nodes/twig, writes tiny random models into
# COMFY_DIR/models/{diffusion_models,text_encoders,vae}, starts `main.py --cpu` on a free local port,
# runs client.py's checks against it (import, /object_info, text-to-image, inpaint, interrupt, /free), then
# browser_check.py in headless Chromium if one is installed (nodes render, token report shows), then
# the native path (native_check.py: core samplers and VAE nodes on the native outputs give Twig Sampler's
# result), then every example workflow (workflows_check.py: API forms run, UI forms loaded in the frontend), and
# stops it.
# On exit it removes what it put into COMFY_DIR (the custom_nodes/twig link and the twigcheck_* models).
# Nothing of ComfyUI is copied into this repository. Where torchvision cannot be imported (no build for
# this torch), a stand-in carrying the few names imported at start-up is put on PYTHONPATH for this run only.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
COMFY_DIR="$(cd "${1:-${COMFY_DIR:?give the ComfyUI folder as the first argument}}" && pwd)"
PY="${COMFY_PYTHON:-python3}"
CLIENT="$REPO/tests/comfy_host/client.py"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/twig-comfy-check.XXXXXX")"
SERVER_PID=""
LINK=""
CHECK_PREFIX="twigcheck"  # client.py's PREFIX: every model the check writes starts with it

cleanup() {
    if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    # what this run put into COMFY_DIR: the link (only if it is ours) and the tiny models
    if [ -n "${LINK:-}" ] && [ -L "$LINK" ] && [ "$(readlink "$LINK")" = "$REPO" ]; then rm -f "$LINK"; fi
    rm -rf "$COMFY_DIR"/models/*/"${CHECK_PREFIX}"_*
    echo "[check] ComfyUI log and outputs kept in $WORK"
}
trap cleanup EXIT

# 1. the pack, linked as ComfyUI expects custom nodes
LINK="$COMFY_DIR/custom_nodes/twig"
if [ -e "$LINK" ] && [ ! -L "$LINK" ]; then
    echo "[check] $LINK exists and is not a link; move it away first" >&2
    exit 2
fi
mkdir -p "$COMFY_DIR/custom_nodes"
ln -sfn "$REPO" "$LINK"

# 2. tiny models in ComfyUI's model folders
"$PY" "$CLIENT" make-models "$COMFY_DIR/models"

# 2b. for the example workflows: a tiny TIPO model, and a tiny demo-model stand-in when the pack has no demo model
DEMO_DIR="$("$PY" "$REPO/tests/comfy_host/workflows_check.py" make-models "$COMFY_DIR/models" "$WORK/demo_model")"
if [ -n "$DEMO_DIR" ]; then
    export TWIG_DEMO_DIR="$DEMO_DIR"
    echo "[check] twig_core/demo_model is not here: the demo workflows use a tiny stand-in from $DEMO_DIR"
fi

# 3. torchvision stand-in when needed (prints the folder to put on PYTHONPATH, or nothing)
STUBS="$("$PY" "$CLIENT" torchvision-stub "$WORK/stubs")"
if [ -n "$STUBS" ]; then
    export PYTHONPATH="$STUBS${PYTHONPATH:+:$PYTHONPATH}"
    echo "[check] torchvision not importable: using a stand-in from $STUBS for this run"
fi

# 4. ComfyUI, headless on the CPU, on a free local port
PORT="${PORT:-$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
mkdir -p "$WORK/output"
(cd "$COMFY_DIR" && exec "$PY" main.py --cpu --listen 127.0.0.1 --port "$PORT" --disable-auto-launch --preview-method auto \
    --output-directory "$WORK/output" > "$WORK/comfy.log" 2>&1) &
SERVER_PID=$!
echo "[check] ComfyUI pid $SERVER_PID on port $PORT, log $WORK/comfy.log"

# 5. the checks
set +e
"$PY" "$CLIENT" check --url "http://127.0.0.1:$PORT" --log "$WORK/comfy.log" --output "$WORK/output" --pid "$SERVER_PID"
rc=$?
# 6. the same server seen through ComfyUI's frontend in headless Chromium, when Chromium is installed
if [ $rc -eq 0 ]; then
    (cd "$REPO/tests/comfy_host" && "$PY" browser_check.py --url "http://127.0.0.1:$PORT" --out "$WORK")
    rc=$?
fi
# 7. the native path, then every example workflow: API forms POSTed and run, UI forms loaded and converted in the frontend
if [ $rc -eq 0 ]; then
    "$PY" "$REPO/tests/comfy_host/native_check.py" --url "http://127.0.0.1:$PORT" --output "$WORK/output" && \
    "$PY" "$REPO/tests/comfy_host/workflows_check.py" check --url "http://127.0.0.1:$PORT" --output "$WORK/output" && \
    (cd "$REPO/tests/comfy_host" && "$PY" workflows_check.py browser --url "http://127.0.0.1:$PORT" --out "$WORK")
    rc=$?
fi
set -e
if [ $rc -ne 0 ]; then
    echo "[check] last lines of the ComfyUI log:"
    tail -n 60 "$WORK/comfy.log"
fi
exit $rc
