#!/usr/bin/env bash
# One command, offline, on CPU, in minutes: install (scripts/bootstrap.sh), then run every pipeline stage on the
# embedded demo — a tiny Gemma-3 built locally and synthetic BHC notes — through the same code paths and the same
# `accelerate launch` entry points a MedGemma run uses. Outputs land in outputs/demo/; a rerun resumes/skips
# finished work. SKIP_BOOTSTRAP=1 uses the already-installed environment (PYTHON overrides the interpreter).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${SKIP_BOOTSTRAP:-0}" != "1" ]; then
  bash scripts/bootstrap.sh
fi
PYTHON="${PYTHON:-${VENV:-.venv}/bin/python}"
# The demo never needs the network: no Hub, no telemetry.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
# The demo runs on the CPU by design: tell DeepSpeed (imported by accelerate/transformers) so, instead of letting it
# warn at every stage that it "was unable to detect" a GPU.
export DS_ACCELERATOR=cpu
# accelerate warns at every launch that it picked --num_cpu_threads_per_process for us: pass the value it would pick
# (physical cores; the demo runs one process).
THREADS="$("$PYTHON" -c 'import psutil; print(psutil.cpu_count(logical=False) or 1)')"
# dischargesum.launch = `accelerate launch` (same arguments) that exits with the stage's code (2: a user error) and
# prints nothing after the stage's own message (scripts/launch.sh runs it without activating .venv).
launch() {
  "$PYTHON" -m dischargesum.launch --config_file accelerate_configs/cpu.yaml --num_cpu_threads_per_process "$THREADS" "$@"
}

step() { printf '\n=== %s ===\n' "$1"; }
step "1/7 build the tiny Gemma-3 + tiny BERT encoder"
"$PYTHON" scripts/build_tiny_model.py --config recipes/demo/build_tiny_model.yaml
step "2/7 prepare_data: synthetic notes -> patient-level splits"
launch scripts/prepare_data.py --config recipes/demo/prepare_data.yaml
step "3/7 sft_qlora: QLoRA (NF4 on CPU) fine-tuning"
launch scripts/sft_qlora.py --config recipes/demo/sft_qlora.yaml
step "4/7 generate: stage-1 summaries of test notes"
launch scripts/generate.py --config recipes/demo/generate.yaml
step "5/7 compress: stage-2 entity-checked compression"
launch scripts/compress.py --config recipes/demo/compress.yaml
step "6/7 eval: stage 1 vs reference and source"
launch scripts/eval.py --config recipes/demo/eval.yaml
step "7/7 eval: stage 2 vs stage 1 and source"
launch scripts/eval.py --config recipes/demo/eval.yaml --predictions outputs/demo/compress/stage2.jsonl --output_dir outputs/demo/eval_stage2
printf '\ndemo finished: outputs/demo/ (eval reports: outputs/demo/eval/report.md, outputs/demo/eval_stage2/report.md;\n'
printf 'TensorBoard: %s -m tensorboard.main --logdir outputs/demo/sft/tensorboard)\n' "$PYTHON"
