#!/usr/bin/env bash
# Create an isolated virtualenv with kvpress 0.5.5 (pins transformers < 5.3; malleable runs a newer one), the
# oracle of bench/slim_kv.py for the KV-cache eviction policies. torch is installed FIRST (the CPU wheel) so
# that pip never pulls a CUDA build as a dependency of the peer.
set -euo pipefail
source "$(dirname "$0")/_venv.sh"
VENV="${KVPRESS_VENV:-/work/kvpress-venv}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
KVPRESS_VERSION="${KVPRESS_VERSION:-0.5.5}"

peer_venv "$VENV"
have torch "$TORCH_VERSION" || "$PIP" install "torch==$TORCH_VERSION"
have kvpress "$KVPRESS_VERSION" || "$PIP" install "kvpress==$KVPRESS_VERSION"
have torch "$TORCH_VERSION" || { echo "torch version changed under the peer's install" >&2; exit 1; }
"$PY" -c "import kvpress, transformers; print('kvpress', kvpress.__name__, 'transformers', transformers.__version__)"
echo "kvpress $KVPRESS_VERSION ready in $VENV"
