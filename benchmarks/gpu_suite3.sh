#!/usr/bin/env bash
# Single-GPU benchmarks + 2-GPU modes on a 4-GPU host in one device call (< 10 minutes), side by side:
#   GPU 0     generate_throughput --profile (static cache + CUDA graphs first; ms per decoding step, GPU busy fraction)
#   GPU 1     profile_train_step on the default recipe, then train_throughput's lever rows on top of the recipe
#   GPUs 2,3  multi_gpu.py on 2 GPUs: single (reference) + MULTI_MODES (losses, kill + resume, merge)
# Knobs: LIMIT (s, default 560), GEN_VARIANTS, PROFILE_S, TRAIN_VARIANTS, MULTI_MODES, GPU1=unsloth (Unsloth rows on
# GPU 1 instead of the profile + train rows; needs .uns/uns_site.tgz carried).
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
(CUDA_VISIBLE_DEVICES=0 timeout $((LIMIT-15)) python3 benchmarks/generate_throughput.py --profile ${GEN_VARIANTS:+--variants $GEN_VARIANTS} --out "$R/gen" --time_budget_s $((LIMIT-140)) > "$R/gen.log" 2>&1; echo "gen rc=$? t=$(( $(date +%s)-START ))" >> "$R/status") &
if [ "${GPU1:-train}" = unsloth ]; then
  # Unsloth in its own environment (needs .uns/uns_site.tgz carried), kaggle profile, beside the other jobs.
  (mkdir -p /tmp/uns && tar xzf .uns/uns_site.tgz -C /tmp/uns && CUDA_VISIBLE_DEVICES=1 PYTHONPATH=/tmp/uns:$PWD timeout $((LIMIT-20)) python3 benchmarks/train_throughput.py --unsloth --gpus 1 --profiles kaggle --variant_timeout_s $((LIMIT-80)) --budget_s $((LIMIT-30)) --out "$R/unsloth" > "$R/unsloth.log" 2>&1; echo "unsloth rc=$? t=$(( $(date +%s)-START ))" >> "$R/status") &
else
(
  timeout ${PROFILE_S:-330} python3 benchmarks/profile_train_step.py --gpus 1 --configs recipe --warmup_steps 1 --steps 1 --out "$R/profile" > "$R/profile.log" 2>&1; echo "profile rc=$? t=$(( $(date +%s)-START ))" >> "$R/status"
  left=$(( LIMIT - 10 - ($(date +%s)-START) ))
  [ $left -gt 90 ] && timeout $left python3 benchmarks/train_throughput.py --gpus 1 --profiles kaggle --variants ${TRAIN_VARIANTS:-recipe,recipe+mb8,recipe+selective_ckpt} --budget_s $((left-10)) --variant_timeout_s 200 --out "$R/train" > "$R/train.log" 2>&1; echo "train rc=$? t=$(( $(date +%s)-START ))" >> "$R/status"
) &
fi
(CUDA_VISIBLE_DEVICES=2,3 timeout $((LIMIT-5)) python3 benchmarks/multi_gpu.py --num_gpus 2 --modes ${MULTI_MODES:-single,fsdp,zero3} --out "$R/multi" --max-minutes $(awk "BEGIN{print ($LIMIT-25)/60}") > "$R/multi.log" 2>&1; echo "multi rc=$? t=$(( $(date +%s)-START ))" >> "$R/status") &
wait
cat "$R/status"
tar czf "$OUT/results3.tgz" -C "$OUT" r3
for f in "$R"/*.log; do echo "=== $f"; grep -v "Loading weights\|Writing model\|it/s]" "$f" | tail -n 16; done 2>/dev/null | tail -c 9000
