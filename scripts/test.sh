#!/usr/bin/env bash
# Install (scripts/bootstrap.sh; its pip install is skipped when pyproject.toml is unchanged) and run every CPU test
# tier: unit, integration, distributed. The gpu tier is skipped without CUDA; run it on a GPU machine with
# `.venv/bin/python -m pytest -m gpu`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec "${VENV:-.venv}/bin/python" -m pytest -m "not gpu" -q "$@"
