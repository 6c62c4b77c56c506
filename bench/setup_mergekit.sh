#!/usr/bin/env bash
# Create an isolated virtualenv with mergekit 0.1.5 for the merge benchmark.
# torch is installed FIRST (a local CPU wheel) so that pip never pulls a CUDA build
# as a dependency of mergekit.
set -euo pipefail
source "$(dirname "$0")/_venv.sh"
VENV="${MERGEKIT_VENV:-/work/mergekit-venv}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
MERGEKIT_VERSION="${MERGEKIT_VERSION:-0.1.5}"

peer_venv "$VENV"
have torch "$TORCH_VERSION" || "$PIP" install "torch==$TORCH_VERSION"
have mergekit "$MERGEKIT_VERSION" || "$PIP" install "mergekit==$MERGEKIT_VERSION"
# torch must still be the CPU wheel we installed first (version 2.13.0+cpu)
have torch "$TORCH_VERSION" || { echo "torch version changed under mergekit install" >&2; exit 1; }
"$VENV/bin/mergekit-yaml" --help >/dev/null
echo "mergekit $MERGEKIT_VERSION ready in $VENV"
