# Shared by the bench/setup_<peer>.sh scripts: each peer that pins other versions (numpy < 2, an older
# transformers) gets its own virtualenv. Source this file, then call `peer_venv DIR`; it sets PY and PIP.
# `have PACKAGE VERSION` is true when that exact version (ignoring a local tag such as +cpu) is installed, so
# every setup script is idempotent: re-running it only installs what is missing.

peer_venv() {
    [ -x "$1/bin/python" ] || python3 -m venv "$1"
    PY="$1/bin/python"
    PIP="$1/bin/pip"
}

have() {
    "$PY" -c "import importlib.metadata as m, sys; sys.exit(0 if m.version('$1').split('+')[0] == '$2' else 1)" \
        2>/dev/null
}
