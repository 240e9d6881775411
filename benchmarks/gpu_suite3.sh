#!/usr/bin/env bash
# Single-GPU benchmarks + 2-GPU modes on a 4-GPU host in one device call (< 10 minutes), side by side:
#   GPU 0     generate_throughput --profile (static cache + CUDA graphs first; ms per decoding step, GPU busy fraction)
#   GPU 1     profile_train_step on the default recipe, then train_throughput's lever rows on top of the recipe
#   GPUs 2,3  multi_gpu.py on 2 GPUs: single (reference) + MULTI_MODES (losses, kill + resume, merge)
# Knobs: LIMIT (s, default 560), PROFILE_S, TRAIN_VARIANTS, MULTI_MODES.
# Needs .gpu/site.tgz carried; results are tarred into $OUT/results3.tgz.
set -u
mkdir -p /tmp/site && tar xzf .gpu/site.tgz -C /tmp/site || exit 1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH="/tmp/site:$PWD"
R="$OUT/r3"; mkdir -p "$R"
START=$(date +%s)
LIMIT=${LIMIT:-560}
nvidia-smi --query-gpu=index,name,memory.total --format=csv > "$R/gpus.csv"
(CUDA_VISIBLE_DEVICES=0 timeout $((LIMIT-15)) python3 benchmarks/generate_throughput.py --profile --out "$R/gen" --time_budget_s $((LIMIT-140)) > "$R/gen.log" 2>&1; echo "gen rc=$? t=$(( $(date +%s)-START ))" >> "$R/status") &
(
  timeout ${PROFILE_S:-330} python3 benchmarks/profile_train_step.py --gpus 1 --configs recipe --warmup_steps 1 --steps 1 --out "$R/profile" > "$R/profile.log" 2>&1; echo "profile rc=$? t=$(( $(date +%s)-START ))" >> "$R/status"
  left=$(( LIMIT - 10 - ($(date +%s)-START) ))
  [ $left -gt 90 ] && timeout $left python3 benchmarks/train_throughput.py --gpus 1 --profiles kaggle --variants ${TRAIN_VARIANTS:-recipe,recipe+mb8,recipe+selective_ckpt} --budget_s $((left-10)) --variant_timeout_s 200 --out "$R/train" > "$R/train.log" 2>&1; echo "train rc=$? t=$(( $(date +%s)-START ))" >> "$R/status"
) &
(CUDA_VISIBLE_DEVICES=2,3 timeout $((LIMIT-5)) python3 benchmarks/multi_gpu.py --num_gpus 2 --modes ${MULTI_MODES:-single,fsdp,zero3} --out "$R/multi" --max-minutes $(awk "BEGIN{print ($LIMIT-25)/60}") > "$R/multi.log" 2>&1; echo "multi rc=$? t=$(( $(date +%s)-START ))" >> "$R/status") &
wait
cat "$R/status"
tar czf "$OUT/results3.tgz" -C "$OUT" r3
for f in "$R"/*.log; do echo "=== $f"; grep -v "Loading weights\|Writing model\|it/s]" "$f" | tail -n 16; done 2>/dev/null | tail -c 9000
