#!/usr/bin/env bash
# Create an isolated virtualenv with mergekit 0.1.5 for the merge benchmark.
# Idempotent: re-running only installs what is missing.
# torch is installed FIRST (a local CPU wheel) so that pip never pulls a CUDA build
# as a dependency of mergekit.
set -euo pipefail
VENV="${MERGEKIT_VENV:-/work/mergekit-venv}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
MERGEKIT_VERSION="${MERGEKIT_VERSION:-0.1.5}"

if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
have() { "$PY" -c "import importlib.metadata as m, sys; sys.exit(0 if m.version('$1').split('+')[0] == '$2' else 1)" 2>/dev/null; }

if ! have torch "$TORCH_VERSION"; then
    "$VENV/bin/pip" install "torch==$TORCH_VERSION"
fi
if ! have mergekit "$MERGEKIT_VERSION"; then
    "$VENV/bin/pip" install "mergekit==$MERGEKIT_VERSION"
fi
# torch must still be the CPU wheel we installed first (version 2.13.0+cpu)
have torch "$TORCH_VERSION" || { echo "torch version changed under mergekit install" >&2; exit 1; }
"$VENV/bin/mergekit-yaml" --help >/dev/null
echo "mergekit $MERGEKIT_VERSION ready in $VENV"
