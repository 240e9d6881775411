#!/usr/bin/env bash
# `accelerate launch` from the project's .venv without activating it, keeping the stage's exit code.
#
#   bash scripts/launch.sh [accelerate launch options] scripts/<stage>.py --config RECIPE.yaml [--field value ...]
#   bash scripts/launch.sh --config_file accelerate_configs/cpu.yaml scripts/eval.py --config recipes/demo/eval.yaml
#
# Takes exactly `accelerate launch`'s arguments (dischargesum/launch.py runs accelerate's own launcher). Unlike
# `accelerate launch`, a failing stage's one-line message is the last thing printed and the shell sees the stage's
# exit code: 2 a user error, 130 Ctrl-C, 143 preempted (accelerate reports all of them as 1, after a traceback).
# PYTHON (or VENV) overrides the interpreter (default: .venv/bin/python of this checkout, made by bootstrap.sh).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-${VENV:-$root/.venv}/bin/python}"
if [ ! -x "$PYTHON" ]; then
  echo "scripts/launch.sh: $PYTHON not found; run \`bash scripts/bootstrap.sh\` first (or set PYTHON)" >&2
  exit 2
fi
exec "$PYTHON" -m dischargesum.launch "$@"
