#!/usr/bin/env bash
# Create an isolated virtualenv with avalanche-lib 0.6.0 (ContinualAI's continual-learning library; it pins its
# own dependency versions), the peer of bench/continual_vs_avalanche.py for online ER and ER-ACE. torch is
# installed FIRST (the CPU wheel), then the torchvision release built for that torch (0.28 for 2.13; left to
# itself pip picks the newest torchvision, which pins a newer torch and pulls a CUDA build with it). Only CUDA
# builds of torchvision exist here; bench/_avalanche_worker.py says how it imports against the CPU torch.
set -euo pipefail
source "$(dirname "$0")/_venv.sh"
VENV="${AVALANCHE_VENV:-/work/avalanche-venv}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
TORCHVISION_VERSION="${TORCHVISION_VERSION:-0.28.0}"
AVALANCHE_VERSION="${AVALANCHE_VERSION:-0.6.0}"

peer_venv "$VENV"
have torch "$TORCH_VERSION" || "$PIP" install "torch==$TORCH_VERSION"
have torchvision "$TORCHVISION_VERSION" || "$PIP" install "torchvision==$TORCHVISION_VERSION" "torch==$TORCH_VERSION"
have avalanche-lib "$AVALANCHE_VERSION" || "$PIP" install "avalanche-lib==$AVALANCHE_VERSION"
have torch "$TORCH_VERSION" || { echo "torch version changed under the peer's install" >&2; exit 1; }
# the worker's check imports Avalanche as the benchmark does (with its torchvision shim, see the worker)
echo '{"check": true}' | PYTHONWARNINGS=ignore "$PY" "$(dirname "$0")/_avalanche_worker.py"; echo
echo "avalanche-lib $AVALANCHE_VERSION ready in $VENV"
