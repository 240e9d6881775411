#!/usr/bin/env bash
# `accelerate launch` from the project's .venv without activating it, keeping the stage's exit code.
#
#   bash scripts/launch.sh [accelerate launch options] scripts/<stage>.py --config RECIPE.yaml [--field value ...]
#   bash scripts/launch.sh --config_file accelerate_configs/cpu.yaml scripts/eval.py --config recipes/demo/eval.yaml
#
# Takes exactly `accelerate launch`'s arguments (plus scripts/launch.py's --grace_seconds): it runs scripts/launch.py,
# the preemption-safe supervisor, which runs accelerate's own launcher through dischargesum/launch.py. Unlike
# `accelerate launch`, a failing stage's one-line message is the last thing printed and the shell sees the stage's
# exit code (2 a user error, 3 a non-finite loss; accelerate reports every failure as 1 after a traceback), and
# SIGTERM or Ctrl-C makes training commit a checkpoint and exit 143 ("rerun the same command to resume").
# PYTHON (or VENV) overrides the interpreter (default: .venv/bin/python of this checkout, made by bootstrap.sh).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-${VENV:-$root/.venv}/bin/python}"
if [ ! -x "$PYTHON" ]; then
  echo "scripts/launch.sh: $PYTHON not found; run \`bash scripts/bootstrap.sh\` first (or set PYTHON)" >&2
  exit 2
fi
exec "$PYTHON" "$root/scripts/launch.py" "$@"
