#!/usr/bin/env bash
# One-command set-up and run. `./run.sh demo` trains DIFFormer on the built-in synthetic graph;
# `./run.sh test` runs the test suite. Both create .venv on first use (no CUDA download on a machine without
# a GPU: the CPU wheel of torch==2.13.0, from PyTorch's CPU index where reachable). Extra arguments are
# passed on.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

TORCH="torch==2.13.0"
CPU_INDEX="https://download.pytorch.org/whl/cpu"

# Without an NVIDIA GPU: the CPU build, from PyTorch's CPU wheel index (the default index would give the
# CUDA build, several GB); where that index is unreachable, the configured one. Says which it used.
install_torch() {
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "run.sh: a GPU is present: installing $TORCH from the configured index (install your CUDA build of torch first to choose it)"
    "$VENV/bin/pip" install --quiet "$TORCH"
  elif "$VENV/bin/pip" install --quiet --timeout 15 --retries 1 --index-url "$CPU_INDEX" "$TORCH" 2>/dev/null; then
    echo "run.sh: installed the CPU build of $TORCH from $CPU_INDEX"
  else
    echo "run.sh: $CPU_INDEX unreachable: installing $TORCH from the configured index"
    "$VENV/bin/pip" install --quiet "$TORCH"
  fi
}

setup() {
  if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
  fi
  if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    install_torch
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
