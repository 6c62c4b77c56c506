#!/usr/bin/env bash
# Create an isolated virtualenv with llm-compressor 0.14.0.1 (pins transformers <= 5.17; malleable runs a newer
# one), the peer of the pruning benchmark (Wanda and SparseGPT, unstructured and 2:4). torch is installed FIRST
# (the CPU wheel) so that pip never pulls a CUDA build as a dependency of the peer.
set -euo pipefail
source "$(dirname "$0")/_venv.sh"
VENV="${LLMCOMPRESSOR_VENV:-/work/llmcompressor-venv}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
LLMCOMPRESSOR_VERSION="${LLMCOMPRESSOR_VERSION:-0.14.0.1}"

peer_venv "$VENV"
have torch "$TORCH_VERSION" || "$PIP" install "torch==$TORCH_VERSION"
have llmcompressor "$LLMCOMPRESSOR_VERSION" || "$PIP" install "llmcompressor==$LLMCOMPRESSOR_VERSION"
have torch "$TORCH_VERSION" || { echo "torch version changed under the peer's install" >&2; exit 1; }
"$PY" -c "import llmcompressor, transformers; print('transformers', transformers.__version__)"
echo "llm-compressor $LLMCOMPRESSOR_VERSION ready in $VENV"
