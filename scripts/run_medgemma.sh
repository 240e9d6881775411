#!/usr/bin/env bash
# One command for a real run: prepare_data -> sft_qlora -> generate -> compress -> eval (stage 1 and stage 2) with
# the recipes/medgemma-4b recipes, every stage through `accelerate launch`, every output under one directory.
#
#   bash scripts/run_medgemma.sh --source /data/mimic-iv-bhc.csv [--sample 0.01] [--output_dir outputs/medgemma-4b-run]
#
# Resumable as a whole: rerun the same command and it skips every stage whose output directory holds a completed
# run of exactly that stage command (its manifest.json: status complete, outputs intact, same config hash; checked
# by scripts/stage_status.py), and continues at the first one that does not — which resumes by itself (sft_qlora
# from its newest valid checkpoint, generate/compress from the notes already written). Every stage after one that
# ran is run again (generate and compress with --overwrite true), because its inputs may have changed.
#
# Options (paths are relative to the current directory):
#   --source PATH            prepare_data's input: PhysioNet MIMIC-IV-Ext-BHC CSV, the Kaggle mirror, any CSV/JSONL/
#                            Parquet (column mapping: --prepare_data.column_mapping), or `synthetic`   (required)
#   --sample F               keep a deterministic fraction F of the rows (prepare_data's sample_fraction); e.g. 0.01
#   --output_dir DIR         where everything goes (default outputs/medgemma-4b-run): data/ sft/ generate/ compress/
#                            eval/ eval_stage2/
#   --recipes DIR            the recipe set (default recipes/medgemma-4b; recipes/demo runs the CPU demo chain)
#   --base_model NAME|DIR    the model to fine-tune (sft_qlora.model_name_or_path, and the tokenizer of prepare_data
#                            and eval); default: the recipes' (google/medgemma-4b-it)
#   --accelerate_config F    topology of sft_qlora, generate and compress (default accelerate_configs/single_gpu.yaml;
#                            accelerate_configs/ddp.yaml for every GPU of the node)
#   --eval_accelerate_config F   eval's (one process; default accelerate_configs/single_gpu.yaml)
#   --<stage>.<field> VALUE  any field of one stage, e.g. --sft_qlora.max_steps 500 --compress.load_in_4bit true
#                            (stages: prepare_data, sft_qlora, generate, compress, eval — eval's apply to both evals)
# prepare_data always runs on the CPU (accelerate_configs/cpu.yaml). Interpreter: $PYTHON, else $VENV/bin/python
# (default .venv of this checkout), else python3. Exit code: the failing stage's (2: a user error it explains).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

SOURCE="" SAMPLE="" OUT="outputs/medgemma-4b-run" RECIPES="$ROOT/recipes/medgemma-4b" BASE_MODEL=""
ACCEL="$ROOT/accelerate_configs/single_gpu.yaml" EVAL_ACCEL="$ROOT/accelerate_configs/single_gpu.yaml"
declare -a PREPARE_ARGS=() SFT_ARGS=() GENERATE_ARGS=() COMPRESS_ARGS=() EVAL_ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --source|--sample|--output_dir|--recipes|--base_model|--accelerate_config|--eval_accelerate_config)
      [ $# -ge 2 ] || { echo "run_medgemma.sh: $1 needs a value" >&2; exit 2; }
      case "$1" in
        --source) SOURCE="$2" ;; --sample) SAMPLE="$2" ;; --output_dir) OUT="$2" ;; --recipes) RECIPES="$2" ;;
        --base_model) BASE_MODEL="$2" ;; --accelerate_config) ACCEL="$2" ;; --eval_accelerate_config) EVAL_ACCEL="$2" ;;
      esac
      shift 2 ;;
    --prepare_data.*|--sft_qlora.*|--generate.*|--compress.*|--eval.*)
      [ $# -ge 2 ] || { echo "run_medgemma.sh: $1 needs a value" >&2; exit 2; }
      stage="${1#--}"; field="--${stage#*.}"; stage="${stage%%.*}"
      case "$stage" in
        prepare_data) PREPARE_ARGS+=("$field" "$2") ;; sft_qlora) SFT_ARGS+=("$field" "$2") ;;
        generate) GENERATE_ARGS+=("$field" "$2") ;; compress) COMPRESS_ARGS+=("$field" "$2") ;;
        eval) EVAL_ARGS+=("$field" "$2") ;;
      esac
      shift 2 ;;
    *) echo "run_medgemma.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
[ -n "$SOURCE" ] || { echo "run_medgemma.sh: --source is required (a CSV/JSONL/Parquet path, or synthetic); see --help" >&2; exit 2; }
[ -d "$RECIPES" ] || RECIPES="$ROOT/$RECIPES"
for stage in prepare_data sft_qlora generate compress eval; do
  [ -f "$RECIPES/$stage.yaml" ] || { echo "run_medgemma.sh: --recipes: no $stage.yaml in $RECIPES" >&2; exit 2; }
done
for f in ACCEL EVAL_ACCEL; do
  [ -f "${!f}" ] || printf -v "$f" '%s' "$ROOT/${!f}"
done
PYTHON="${PYTHON:-${VENV:-$ROOT/.venv}/bin/python}"
[ -x "$PYTHON" ] || PYTHON="$(command -v python3)"
export HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false

# Every stage's arguments, built once: the completion check and the launch get exactly the same command line.
PREPARE=(--config "$RECIPES/prepare_data.yaml" --output_dir "$OUT/data" --source "$SOURCE")
[ -z "$SAMPLE" ] || PREPARE+=(--sample_fraction "$SAMPLE")
SFT=(--config "$RECIPES/sft_qlora.yaml" --output_dir "$OUT/sft" --dataset_dir "$OUT/data")
GENERATE=(--config "$RECIPES/generate.yaml" --output_dir "$OUT/generate" --dataset_dir "$OUT/data" --adapter "$OUT/sft/final")
COMPRESS=(--config "$RECIPES/compress.yaml" --output_dir "$OUT/compress" --input "$OUT/generate/stage1.jsonl")
EVAL1=(--config "$RECIPES/eval.yaml" --output_dir "$OUT/eval" --dataset_dir "$OUT/data" --predictions "$OUT/generate/stage1.jsonl")
EVAL2=(--config "$RECIPES/eval.yaml" --output_dir "$OUT/eval_stage2" --dataset_dir "$OUT/data" --predictions "$OUT/compress/stage2.jsonl")
if [ -n "$BASE_MODEL" ]; then
  PREPARE+=(--tokenizer_name_or_path "$BASE_MODEL"); SFT+=(--model_name_or_path "$BASE_MODEL")
  EVAL1+=(--tokenizer_name_or_path "$BASE_MODEL"); EVAL2+=(--tokenizer_name_or_path "$BASE_MODEL")
fi
PREPARE+=(${PREPARE_ARGS[@]+"${PREPARE_ARGS[@]}"}); SFT+=(${SFT_ARGS[@]+"${SFT_ARGS[@]}"})
GENERATE+=(${GENERATE_ARGS[@]+"${GENERATE_ARGS[@]}"}); COMPRESS+=(${COMPRESS_ARGS[@]+"${COMPRESS_ARGS[@]}"})
EVAL1+=(${EVAL_ARGS[@]+"${EVAL_ARGS[@]}"}); EVAL2+=(${EVAL_ARGS[@]+"${EVAL_ARGS[@]}"})

RAN=0  # set once a stage has run: every later stage runs too (its inputs may have changed)
N=0
# run_stage NAME SCRIPT ACCELERATE_CONFIG ARGS...: skip a completed stage (until one has run), else launch it.
run_stage() {
  local name="$1" script="$2" accel="$3"; shift 3
  local stage="${script%.py}" status
  N=$((N + 1))
  if [ "$RAN" = 0 ] && status="$("$PYTHON" "$ROOT/scripts/stage_status.py" "$stage" "$@")"; then
    printf '\n=== %d/6 %s: complete, skipped ===\n' "$N" "$name"
    return 0
  fi
  if [ "$RAN" = 0 ]; then
    printf '\n=== %d/6 %s: running (%s) ===\n' "$N" "$name" "${status:-not started}"
  else
    printf '\n=== %d/6 %s: running (an earlier stage ran) ===\n' "$N" "$name"
    case "$stage" in generate|compress) set -- "$@" --overwrite true ;; esac
  fi
  RAN=1
  "$PYTHON" -m accelerate.commands.launch --config_file "$accel" "$ROOT/scripts/$script" "$@"
}

run_stage "prepare_data" prepare_data.py "$ROOT/accelerate_configs/cpu.yaml" "${PREPARE[@]}"
run_stage "sft_qlora" sft_qlora.py "$ACCEL" "${SFT[@]}"
run_stage "generate (stage 1)" generate.py "$ACCEL" "${GENERATE[@]}"
run_stage "compress (stage 2)" compress.py "$ACCEL" "${COMPRESS[@]}"
run_stage "eval stage 1" eval.py "$EVAL_ACCEL" "${EVAL1[@]}"
run_stage "eval stage 2" eval.py "$EVAL_ACCEL" "${EVAL2[@]}"

cat <<EOF

run finished: $OUT
  data (splits, rejects, data card)  $OUT/data/data_card.json
  LoRA adapter + model card          $OUT/sft/final
  TensorBoard                        $PYTHON -m tensorboard.main --logdir $OUT/sft/tensorboard
  stage-1 summaries                  $OUT/generate/stage1.jsonl
  stage-2 compressed summaries       $OUT/compress/stage2.jsonl
  eval reports                       $OUT/eval/report.md  $OUT/eval_stage2/report.md
  standalone merged model            $PYTHON $ROOT/scripts/export.py --adapter $OUT/sft/final --output_dir $OUT/merged --eval_dir '[$OUT/eval, $OUT/eval_stage2]'
EOF
