#!/usr/bin/env bash
# Create (or refresh) the project's Python 3.12 virtual environment in .venv and install the
# project with its test tools and the rl extra (TRL, for the RL probe and its tests). Safe to run
# again: it reinstalls only when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."

find_python() {
    local candidates=("${PYTHON:-}" python3.12)
    for c in "${candidates[@]}"; do
        [ -n "$c" ] || continue
        if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
            echo "$c"; return 0
        fi
    done
    # pyenv installs expose python3.12 only as a shim unless 3.12 is selected: look for it directly.
    for c in "$HOME"/.pyenv/versions/3.12*/bin/python3.12 /usr/bin/python3.12 /usr/local/bin/python3.12; do
        if [ -x "$c" ]; then echo "$c"; return 0; fi
    done
    return 1
}

PY=$(find_python) || { echo "error: Python 3.12 not found (megatron-core 0.19 needs it); set PYTHON=/path/to/python3.12" >&2; exit 1; }
if [ ! -x .venv/bin/python ]; then
    echo "[bootstrap] creating .venv with $PY"
    "$PY" -m venv .venv
fi
stamp=.bootstrap-stamp
want=$(cat pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "[bootstrap] installing megatron_ext and its dependencies (first run downloads torch, a few GB)"
    .venv/bin/python -m pip install -q --upgrade pip
    # pip byte-compiles what it installs one file at a time; compileall does it on every core
    # (torch and the rest: 66 s + 36 s instead of 148 s on 2 cores). Some of megatron-core's
    # docstrings have invalid escapes, a SyntaxWarning at compile time only. A file that does not
    # compile is skipped, as pip skips it (it is never imported).
    .venv/bin/python -m pip install -q --no-compile -e ".[test,rl]"
    echo "[bootstrap] byte-compiling the installed packages"
    .venv/bin/python -W ignore::SyntaxWarning -m compileall -q -j 0 \
        "$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" ||
        echo "[bootstrap] (the files above did not byte-compile; the rest did)"
    echo "$want" > "$stamp"
fi
# The project's own packages are installed in place (editable), so nothing byte-compiles them, and
# where PYTHONDONTWRITEBYTECODE is set no process keeps what it compiled: every process that
# imports the trainer compiled its modules again (0.21 s of its imports instead of 0.03 s on 2
# cores). compileall rewrites only what changed since its last run (about a second).
.venv/bin/python -m compileall -q -j 0 megatron_ext run_configs tools tests >/dev/null ||
    echo "[bootstrap] (some of the project's files did not byte-compile)"
