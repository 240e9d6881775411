#!/usr/bin/env bash
# Second device call on a 4-GPU host (< 10 minutes), side by side:
#   GPUs 0,1  multi_gpu.py on 2 GPUs (single vs DDP / ZeRO-2 / ZeRO-3 / FSDP-QLoRA, kill + resume, sharded generation)
#   GPU 2     generate_throughput (seed's way vs our engine)
#   GPU 3     eval_throughput (2,000 pairs), the gpu test tier, then the Unsloth rows of train_throughput
# Needs .gpu/site.tgz and .uns/uns_site.tgz carried; results are tarred into $OUT/results2.tgz.
set -u
mkdir -p /tmp/site /tmp/uns && tar xzf .gpu/site.tgz -C /tmp/site && tar xzf .uns/uns_site.tgz -C /tmp/uns || exit 1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
R="$OUT/r2"; mkdir -p "$R"
P="/tmp/site:$PWD"
START=$(date +%s)
nvidia-smi --query-gpu=index,name,memory.total --format=csv > "$R/gpus.csv"
(CUDA_VISIBLE_DEVICES=0,1 PYTHONPATH=$P timeout 555 python3 benchmarks/multi_gpu.py --out "$R/multi" --max-minutes 8.8 > "$R/multi.log" 2>&1; echo "multi rc=$? t=$(( $(date +%s)-START ))" >> "$R/status") &
(CUDA_VISIBLE_DEVICES=2 PYTHONPATH=$P timeout 540 python3 benchmarks/generate_throughput.py --out "$R/gen" --time_budget_s 420 > "$R/gen.log" 2>&1; echo "gen rc=$? t=$(( $(date +%s)-START ))" >> "$R/status") &
(
  export CUDA_VISIBLE_DEVICES=3
  PYTHONPATH=$P timeout 150 python3 benchmarks/eval_throughput.py --pairs 2000 --encoder bert-base-random --device cuda --num_workers 12 --out "$R/eval/eval_throughput.json" > "$R/eval.log" 2>&1; echo "eval rc=$? t=$(( $(date +%s)-START ))" >> "$R/status"
  PYTHONPATH=$P timeout 120 python3 -m pytest -m gpu -q -p no:cacheprovider tests/gpu > "$R/gputests.log" 2>&1; echo "gputests rc=$? t=$(( $(date +%s)-START ))" >> "$R/status"
  left=$(( 550 - ($(date +%s)-START) ))
  [ $left -gt 90 ] && PYTHONPATH=/tmp/uns:$PWD timeout $left python3 benchmarks/train_throughput.py --unsloth --gpus 3 --profiles kaggle --variant_timeout_s $((left-60)) --budget_s $((left-15)) --out "$R/unsloth" > "$R/unsloth.log" 2>&1; echo "unsloth rc=$? t=$(( $(date +%s)-START ))" >> "$R/status"
) &
wait
cat "$R/status"
tar czf "$OUT/results2.tgz" -C "$OUT" r2
for f in "$R"/*.log; do echo "=== $f"; grep -v "Loading weights\|Writing model" "$f" | tail -n 14; done 2>/dev/null | tail -c 10000
