#!/usr/bin/env bash
# The single-GPU benchmarks of issues 5-8 side by side on one 4-GPU host, in one device call (< 10 minutes):
#   GPUs 0,1  train_throughput (seed vs recipe vs ablations vs 8 GB recipe; through sft's trainer)
#   GPU 2     generate_throughput, then eval_throughput (2,000 pairs), then profile_train_step
#   GPU 3     preemption_gpu (SIGTERM -> committed checkpoint, resume), then Unsloth rows, then the gpu test tier
# Needs .gpu/site.tgz (trl, bitsandbytes, liger-kernel, datasets, deepspeed, bert-score, rouge-score, spaCy) and
# .uns/uns_site.tgz (Unsloth bundle) carried; results are tarred into $OUT/results.tgz.
#   bash benchmarks/gpu_suite.sh            (on the GPU machine, from the repository root)
set -u
mkdir -p /tmp/site /tmp/uns && tar xzf .gpu/site.tgz -C /tmp/site && tar xzf .uns/uns_site.tgz -C /tmp/uns || exit 1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
R="$OUT/r"; mkdir -p "$R"
P="/tmp/site:$PWD"
START=$(date +%s)
nvidia-smi --query-gpu=index,name,memory.total --format=csv > "$R/gpus.csv"
(PYTHONPATH=$P timeout 560 python3 benchmarks/train_throughput.py --gpus 0,1 --set all --budget_s 520 --out "$R/train" > "$R/train.log" 2>&1; echo "train rc=$? t=$(( $(date +%s)-START ))" >> "$R/status") &
(
  export CUDA_VISIBLE_DEVICES=2 PYTHONPATH=$P
  timeout 330 python3 benchmarks/generate_throughput.py --out "$R/gen" --time_budget_s 270 > "$R/gen.log" 2>&1; echo "gen rc=$? t=$(( $(date +%s)-START ))" >> "$R/status"
  timeout 120 python3 benchmarks/eval_throughput.py --pairs 2000 --encoder bert-base-random --device cuda --out "$R/eval/eval_throughput.json" > "$R/eval.log" 2>&1; echo "eval rc=$? t=$(( $(date +%s)-START ))" >> "$R/status"
  left=$(( 555 - ($(date +%s)-START) ))
  [ $left -gt 60 ] && timeout $left python3 benchmarks/profile_train_step.py --configs recipe,seed --out "$R/profile" > "$R/profile.log" 2>&1; echo "profile rc=$? t=$(( $(date +%s)-START ))" >> "$R/status"
) &
(
  export CUDA_VISIBLE_DEVICES=3
  PYTHONPATH=$P timeout 300 python3 benchmarks/preemption_gpu.py --output_dir "$R/preempt" > "$R/preempt.log" 2>&1; echo "preempt rc=$? t=$(( $(date +%s)-START ))" >> "$R/status"
  left=$(( 470 - ($(date +%s)-START) ))
  [ $left -gt 60 ] && PYTHONPATH=/tmp/uns:$PWD timeout $left python3 benchmarks/train_throughput.py --unsloth --gpus 3 --budget_s $((left-10)) --out "$R/unsloth" > "$R/unsloth.log" 2>&1; echo "unsloth rc=$? t=$(( $(date +%s)-START ))" >> "$R/status"
  left=$(( 560 - ($(date +%s)-START) ))
  [ $left -gt 30 ] && PYTHONPATH=$P timeout $left python3 -m pytest -m gpu -q -p no:cacheprovider tests/gpu > "$R/gputests.log" 2>&1; echo "gputests rc=$? t=$(( $(date +%s)-START ))" >> "$R/status"
) &
wait
cat "$R/status"
tar czf "$OUT/results.tgz" -C "$OUT" r
for f in "$R"/*.log; do echo "=== $f"; tail -n 12 "$f"; done 2>/dev/null | tail -c 9000
