#!/usr/bin/env bash
# Create (or refresh) .venv with densiray and its dependencies. Idempotent: it reinstalls only when
# pyproject.toml changed. torch is installed first so that pip never pulls a CUDA build on a CPU
# machine: with no NVIDIA GPU it installs the CPU build (TORCH_SPEC, default torch==2.13.0, which
# this project's CPU machines carry locally); with one (nvidia-smi works) it lets pip choose a CUDA
# build. Set TORCH_SPEC / TORCH_INDEX_URL to pick another build, e.g.
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
stamp="$VENV/.densiray-installed"
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "densiray setup: creating $VENV (first run takes a few minutes)" >&2
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
pip install --upgrade pip

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  TORCH_SPEC=${TORCH_SPEC:-"torch>=2.4,<3"}          # a GPU: pip's default (CUDA) build
else
  TORCH_SPEC=${TORCH_SPEC:-"torch==2.13.0"}          # no GPU: the CPU build
fi
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    pip install "$TORCH_SPEC" --index-url "$TORCH_INDEX_URL"
  else
    pip install "$TORCH_SPEC"
  fi
fi
pip install -e ".[test]"
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "densiray setup: building DeepSpeed's CPU op into $VENV/torch_extensions (~40 s, once)" >&2
  "$VENV/bin/python" -c "from densiray.train.engine import build_cpu_ops; build_cpu_ops()" >/dev/null 2>&1 \
    || echo "densiray setup: the build failed; DeepSpeed builds it on first use instead" >&2
fi
echo "$want" > "$stamp"
echo "densiray setup: done ($("$VENV/bin/python" -c 'from importlib.metadata import version as v; print(", ".join(f"{p} {v(p)}" for p in ("torch", "ray", "deepspeed")))'))" >&2
