#!/usr/bin/env bash
# Create an isolated virtualenv with the steering peers, repeng 0.4.0 (pins numpy < 2) and steering-vectors
# 0.12.2 (pins transformers < 5), for the oracle tests (tests/test_steer_oracle.py runs its peer tests when
# this venv exists) and the steering benchmark. torch is installed FIRST (the CPU wheel) so that pip never
# pulls a CUDA build as a dependency of the peers.
set -euo pipefail
source "$(dirname "$0")/_venv.sh"
VENV="${STEERING_VENV:-/work/steering-venv}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
REPENG_VERSION="${REPENG_VERSION:-0.4.0}"
STEERING_VECTORS_VERSION="${STEERING_VECTORS_VERSION:-0.12.2}"

peer_venv "$VENV"
have torch "$TORCH_VERSION" || "$PIP" install "torch==$TORCH_VERSION"
have repeng "$REPENG_VERSION" || "$PIP" install "repeng==$REPENG_VERSION" "numpy<2"
have steering-vectors "$STEERING_VECTORS_VERSION" || "$PIP" install "steering-vectors==$STEERING_VECTORS_VERSION" \
    "transformers<5" "numpy<2"
# torch must still be the CPU wheel we installed first
have torch "$TORCH_VERSION" || { echo "torch version changed under the peers' install" >&2; exit 1; }
"$PY" -c "import repeng, steering_vectors, numpy, transformers; assert numpy.__version__ < '2'; \
assert transformers.__version__ < '5'"
echo "repeng $REPENG_VERSION and steering-vectors $STEERING_VECTORS_VERSION ready in $VENV"
