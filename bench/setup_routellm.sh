#!/usr/bin/env bash
# Create an isolated virtualenv with RouteLLM 0.2.0 for checking our router metrics against its own code
# (tests/test_route_metrics.py runs when this venv exists). RouteLLM pins numpy < 2, hence its own venv.
# Only its metric code is used: routellm is installed without its dependencies (torch, transformers, openai,
# litellm serve its hosted routers), plus what `routellm/evals/evaluate.py: generate_results` needs.
set -euo pipefail
source "$(dirname "$0")/_venv.sh"
VENV="${ROUTELLM_VENV:-/work/routellm-venv}"
ROUTELLM_VERSION="${ROUTELLM_VERSION:-0.2.0}"

peer_venv "$VENV"
have routellm "$ROUTELLM_VERSION" || "$PIP" install --no-deps "routellm==$ROUTELLM_VERSION"
"$PIP" install -q "numpy<2" pandas matplotlib
"$PY" -c "import numpy, pandas, matplotlib, importlib.util; assert importlib.util.find_spec('routellm')"
echo "routellm $ROUTELLM_VERSION ready in $VENV"
