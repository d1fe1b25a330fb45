#!/usr/bin/env bash
# One-command set-up and run. `./run.sh demo` trains DIFFormer on the built-in synthetic graph;
# `./run.sh test` runs the test suite. Both create .venv on first use (no CUDA download: when no
# torch is installed, the CPU wheel torch==2.13.0 is installed first). Extra arguments are passed on.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

setup() {
  if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
  fi
  if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    "$VENV/bin/pip" install --quiet "torch==2.13.0"
  fi
  # -I: without the current folder on the path, so the check sees the install, not the source tree
  if ! "$VENV/bin/python" -I -c "import difformer_lightning, datamodules, callbacks, pytest" 2>/dev/null \
     || [ pyproject.toml -nt "$VENV/.installed" ]; then
    "$VENV/bin/pip" install --quiet -e ".[test]"
    touch "$VENV/.installed"
  fi
}

command=${1:-}
shift || true
case "$command" in
  demo)
    setup
    exec "$VENV/bin/python" train.py fit --config configs/synthetic.yaml "$@"
    ;;
  test)
    setup
    exec "$VENV/bin/python" -m pytest -q "$@"
    ;;
  setup)
    setup
    ;;
  *)
    echo "usage: ./run.sh demo|test|setup [args...]" >&2
    exit 2
    ;;
esac
