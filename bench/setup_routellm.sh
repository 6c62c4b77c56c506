#!/usr/bin/env bash
# Create an isolated virtualenv with RouteLLM 0.2.0 for checking our router metrics against its own code
# (tests/test_route_metrics.py runs when this venv exists). RouteLLM pins numpy < 2, hence its own venv.
# Only its metric code is used: routellm is installed without its dependencies (torch, transformers, openai,
# litellm serve its hosted routers), plus what `routellm/evals/evaluate.py: generate_results` needs.
# Idempotent: re-running only installs what is missing.
set -euo pipefail
VENV="${ROUTELLM_VENV:-/work/routellm-venv}"
ROUTELLM_VERSION="${ROUTELLM_VERSION:-0.2.0}"

if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
have() { "$PY" -c "import importlib.metadata as m, sys; sys.exit(0 if m.version('$1') == '$2' else 1)" 2>/dev/null; }

if ! have routellm "$ROUTELLM_VERSION"; then
    "$VENV/bin/pip" install --no-deps "routellm==$ROUTELLM_VERSION"
fi
"$VENV/bin/pip" install "numpy<2" pandas matplotlib
"$PY" -c "import numpy, pandas, matplotlib, importlib.util; assert importlib.util.find_spec('routellm')"
echo "routellm $ROUTELLM_VERSION ready in $VENV"
