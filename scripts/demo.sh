#!/usr/bin/env bash
# One command, offline, on CPU, in minutes: install (scripts/bootstrap.sh), then run every pipeline stage on the
# embedded demo — a tiny Gemma-3 built locally and synthetic BHC notes — through the same code paths a MedGemma
# run uses. Outputs land in outputs/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export PATH="$PWD/${VENV:-.venv}/bin:$PATH"
# The demo never needs the network: no Hub, no telemetry.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false

python scripts/build_tiny_model.py --config recipes/demo/build_tiny_model.yaml
echo "demo finished: see outputs/demo/"
