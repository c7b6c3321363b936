#!/usr/bin/env bash
# Bootstrap the project on a fresh machine: .venv from requirements.lock (hash-checked),
# the package itself (editable), and KenLM's lmplz/build_binary built from the kenlm sdist
# (scripts/build-kenlm.sh: the compiler's output goes to a log file, not to the terminal).
# Idempotent: each step is skipped when its result is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
VENV=${VENV:-.venv}

command -v "$PYTHON" >/dev/null || { echo "setup: $PYTHON not found (Python 3.11 is required)" >&2; exit 1; }

bash scripts/system-deps.sh || { code=$?; [ $code = 3 ] && echo "setup: continuing without KenLM binaries" >&2 || exit $code; }

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
lock_hash=$(sha256sum requirements.lock pyproject.toml | sha256sum | cut -c1-16)
if [ "$(cat "$VENV/.lock-installed" 2>/dev/null)" != "$lock_hash" ]; then
  echo "setup: installing the locked dependencies (torch's CUDA wheels run on CPU; ~3 GB the first time)"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q --require-hashes --no-deps -r requirements.lock
  "$VENV/bin/pip" install -q --no-deps --no-build-isolation -e .
  echo "$lock_hash" > "$VENV/.lock-installed"
fi

if [ ! -x "$VENV/bin/lmplz" ] || [ ! -x "$VENV/bin/build_binary" ]; then
  if command -v cmake >/dev/null && [ -e /usr/include/boost/program_options.hpp ]; then
    VENV="$VENV" bash scripts/build-kenlm.sh
  else
    echo "setup: KenLM lmplz/build_binary not built (cmake or Boost missing, see above)" >&2
  fi
fi
