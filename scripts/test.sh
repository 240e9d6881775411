#!/usr/bin/env bash
# Install (scripts/bootstrap.sh; its pip install is skipped when pyproject.toml is unchanged), check lint, format and
# types (ruff + mypy: their own step, so `pytest -m unit` stays a seconds-long inner loop), then run every CPU test
# tier: unit, integration, distributed. The gpu tier is skipped without CUDA; run it on a GPU machine with
# `.venv/bin/python -m pytest -m gpu`. SKIP_LINT=1 skips the lint step (not in CI).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
BIN="${VENV:-.venv}/bin"
if [ "${SKIP_LINT:-0}" != 1 ]; then
  echo "lint: ruff check, ruff format --check, mypy"
  "$BIN/ruff" check .
  "$BIN/ruff" format --check .
  "$BIN/mypy"
fi
exec "$BIN/python" -m pytest -m "not gpu" -q "$@"
