#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install dischargesum with its test tools.
#
#   bash scripts/bootstrap.sh            # .venv in the repository root; VENV=/path overrides
#
# torch is installed FIRST and on its own: installing a package that needs torch before torch is present makes
# pip pick the newest CUDA build (several GB). TORCH_SPEC overrides the default (the 2.13.0 CPU wheel on the
# project's CPU machines; on a GPU machine keep the CUDA torch you already have: it is left alone when importable).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi
PY="$VENV/bin/python"
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
"$PY" -m pip install -q -e ".[dev]"
"$PY" -c "import dischargesum, torch, transformers, trl, peft; print(f'dischargesum ready: torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}, peft {peft.__version__}')"
