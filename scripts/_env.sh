# Shared by scripts/*: make .venv and install the project with its test extras.
# Re-installs only when pyproject.toml changed since the last install.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON_BIN=${PYTHON_BIN:-python3.11}
command -v "$PYTHON_BIN" >/dev/null 2>&1 || PYTHON_BIN=python3
if [ ! -x .venv/bin/python ]; then
    "$PYTHON_BIN" -m venv .venv
fi
STAMP=.venv/.credo-installed
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
    echo "installing Credo and its test tools into .venv (first run, or pyproject.toml changed)..." >&2
    LOG=.venv/install.log
    if ! { .venv/bin/python -m pip install --disable-pip-version-check --upgrade pip \
           && .venv/bin/python -m pip install --disable-pip-version-check -e ".[test,dev]"; } \
           >"$LOG" 2>&1; then
        tail -n 30 "$LOG" >&2
        echo "scripts: installing into .venv failed; the full log is $LOG" >&2
        exit 1
    fi
    touch "$STAMP"
fi
export PATH="$ROOT/.venv/bin:$PATH"
