#!/usr/bin/env bash
# One device command of the GPU benchmarks (run on the GPU machine from the repository root; carry .gpu and, for
# the Unsloth step, .uns — both built by benchmarks/device/build_sites.sh). Steps run in the order given; each
# step's results accumulate in $OUT/train (train_throughput merges the rows of earlier steps of the same comparison
# from --merge_with, so one comparison can span several device commands on ONE warm machine):
#
#   bash benchmarks/device/run_suite.sh gputests train:kaggle:seed,recipe_prev,recipe
#   bash benchmarks/device/run_suite.sh unsloth:kaggle,physionet
#
# Steps:
#   gputests                      pytest -m gpu on tests/gpu/ (training- and inference-path correctness)
#   train:<profiles>:<variants>   benchmarks/train_throughput.py rows (names or globs), merged into $OUT/train
#   unsloth:<profiles>            the Unsloth rows in their own environment, merged into $OUT/train
#   profile:<variant>             benchmarks/profile_train_step.py on one row (kaggle profile)
# Knobs: LIMIT (s, default 580: the whole command), PREV (an earlier train_throughput.json to merge with),
# GPUTESTS (pytest paths or node ids for gputests, default tests/gpu), ROW_TIMEOUT (s per train row, default 240),
# MEASURE (measured steps per row, default 3), WARMUP (default 2: flex_attention compiles in the first step, and
# recompiles once for dynamic shapes in the second).
set -u
START=$(date +%s)
LIMIT=${LIMIT:-580}
left() { echo $(( LIMIT - ($(date +%s) - START) )); }
mkdir -p /tmp/site && tar xzf .gpu/site.tgz -C /tmp/site || exit 1
[ -f .gpu/nlp_site.tgz ] && { tar xzf .gpu/nlp_site.tgz -C /tmp/site || exit 1; }
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
# torch's compile caches on the machine's disk: a later command on the same warm machine reuses them.
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor_cache TRITON_CACHE_DIR=/tmp/triton_cache
SITE="/tmp/site:$PWD"
T="$OUT/train"; mkdir -p "$T"
MERGE=${PREV:-}
[ -f /tmp/dischargesum_train.json ] && MERGE=${MERGE:-/tmp/dischargesum_train.json}
nvidia-smi --query-gpu=index,name,uuid,memory.total,driver_version --format=csv > "$OUT/gpu.csv" 2>&1
for step in "$@"; do
  kind=${step%%:*}; rest=${step#*:}
  t=$(left); [ "$t" -lt 60 ] && { echo "[suite] $step: skipped, ${t}s left" | tee -a "$OUT/status"; continue; }
  case $kind in
    gputests)
      timeout $((t - 10)) env PYTHONPATH=$SITE python3 -m pytest -m gpu ${GPUTESTS:-tests/gpu} -q -p no:cacheprovider -rs \
        > "$OUT/gputests.log" 2>&1; echo "[suite] gputests rc=$? t=$(( $(date +%s)-START ))" | tee -a "$OUT/status" ;;
    train)
      profiles=${rest%%:*}; variants=${rest#*:}
      timeout $((t - 5)) env PYTHONPATH=$SITE python3 benchmarks/train_throughput.py --gpus 0 --profiles "$profiles" \
        --variants "$variants" --warmup_steps "${WARMUP:-2}" --measure_steps "${MEASURE:-3}" --budget_s $((t - 15)) \
        --variant_timeout_s "${ROW_TIMEOUT:-240}" ${MERGE:+--merge_with $MERGE} --out "$T" > "$OUT/train_$profiles.log" 2>&1
      echo "[suite] train $profiles rc=$? t=$(( $(date +%s)-START ))" | tee -a "$OUT/status"
      [ -f "$T/train_throughput.json" ] && cp "$T/train_throughput.json" /tmp/dischargesum_train.json && MERGE=/tmp/dischargesum_train.json ;;
    unsloth)
      mkdir -p /tmp/uns && tar xzf .uns/uns_site.tgz -C /tmp/uns || { echo "[suite] no .uns bundle" >> "$OUT/status"; continue; }
      timeout $((t - 5)) env PYTHONPATH=/tmp/uns:$PWD python3 benchmarks/train_throughput.py --unsloth --gpus 0 \
        --profiles "$rest" --warmup_steps "${WARMUP:-2}" --measure_steps "${MEASURE:-3}" --budget_s $((t - 15)) \
        --variant_timeout_s $((t - 30)) ${MERGE:+--merge_with $MERGE} --out "$T" > "$OUT/unsloth.log" 2>&1
      echo "[suite] unsloth rc=$? t=$(( $(date +%s)-START ))" | tee -a "$OUT/status"
      [ -f "$T/train_throughput.json" ] && cp "$T/train_throughput.json" /tmp/dischargesum_train.json && MERGE=/tmp/dischargesum_train.json ;;
    profile)
      timeout $((t - 5)) env PYTHONPATH=$SITE python3 benchmarks/profile_train_step.py --gpus 0 --configs "$rest" \
        --warmup_steps 2 --steps 1 --out "$OUT/profile" > "$OUT/profile.log" 2>&1
      echo "[suite] profile rc=$? t=$(( $(date +%s)-START ))" | tee -a "$OUT/status" ;;
    *) echo "[suite] unknown step $step" | tee -a "$OUT/status" ;;
  esac
done
for f in "$OUT"/*.log; do echo "=== $f"; grep -v "Loading weights\|Writing model\|it/s]\|s/it]" "$f" | tail -n 25; done 2>/dev/null | tail -c 9000
cat "$OUT/status"
# At most 8 files come back from $OUT: everything goes into one archive, beside the status and the merged result.
tar czf /tmp/results.tgz -C "$OUT" . 2>/dev/null && find "$OUT" -mindepth 1 -delete && mv /tmp/results.tgz "$OUT/" \
  && cp /tmp/dischargesum_train.json "$OUT/train_throughput.json" 2>/dev/null; true
