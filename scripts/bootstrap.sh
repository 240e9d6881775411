#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install dischargesum with its test tools.
#
#   bash scripts/bootstrap.sh            # .venv in the repository root; VENV=/path overrides
#   BOOTSTRAP_FORCE=1 bash scripts/bootstrap.sh   # reinstall even when pyproject.toml did not change
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
# `pip install -e` re-resolves every dependency (~80 s) even when nothing changed: skip it when this checkout's
# pyproject.toml is the one last installed into this venv (the stamp holds its sha256 and the checkout's path).
# A fresh venv (CI deletes .venv first) has no stamp, so it always installs. BOOTSTRAP_FORCE=1 reinstalls anyway.
STAMP="$VENV/.dischargesum-installed"
want="$("$PY" -c "import hashlib; print(hashlib.sha256(open('pyproject.toml', 'rb').read()).hexdigest())") $PWD"
if [ "${BOOTSTRAP_FORCE:-0}" != "1" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  echo "bootstrap: pyproject.toml unchanged since the last install into $VENV; skipping pip install (BOOTSTRAP_FORCE=1 reinstalls)"
else
  rm -f "$STAMP"
  "$PY" -m pip install -q -e ".[dev]"
  echo "$want" >"$STAMP"
fi
"$PY" -c "import dischargesum, torch, transformers, trl, peft; print(f'dischargesum ready: torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}, peft {peft.__version__}')"
