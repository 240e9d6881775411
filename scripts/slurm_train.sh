#!/usr/bin/env bash
# sft_qlora on a SLURM cluster: one `accelerate launch` per node, preemption-safe, requeued on preemption.
#
#   sbatch --nodes 2 --gpus-per-node 8 scripts/slurm_train.sh --config recipes/medgemma-4b/sft_qlora.yaml [--field value ...]
#
# Two roles in one file:
#   batch  (what sbatch runs, on the first node): finds node 0's address, starts one task per node with srun, and
#          forwards SIGUSR1 / SIGTERM to that step (srun passes them on to every task). When the run was preempted
#          (exit code 143) it requeues the job, which resumes from the newest valid checkpoint.
#   node   (each srun task): runs `accelerate launch --machine_rank $SLURM_NODEID ... scripts/sft_qlora.py ARGS` in
#          its own process group and forwards SIGUSR1 / SIGTERM to that whole group (the launcher AND its training
#          processes: accelerate's single-process launcher does not pass signals on, torchrun passes SIGTERM only).
#          Each training process then commits a checkpoint at the next optimizer step and exits 143.
# `trap` + `wait`: bash runs a trap only between commands, so the launch runs in the background and the script waits
# on it (a `wait` is interrupted by a trapped signal, then waits again until the group has exited).
#
# SLURM sends SIGUSR1 to this batch shell 120 s before the time limit (--signal=B:USR1@120) and SIGTERM on
# preemption (then SIGKILL after KillWait, 30 s by default; torchrun also gives workers 30 s after SIGTERM).
#
# Environment (all optional): ACCELERATE_CONFIG (default accelerate_configs/multi_node.yaml), GPUS_PER_NODE (default:
# count from nvidia-smi), MASTER_PORT (29500), DISCHARGESUM_LAUNCH (the launcher command, default `accelerate launch`;
# tests replace it), DISCHARGESUM_SRUN (default `srun`), DISCHARGESUM_REQUEUE (1: requeue after preemption).
#
#SBATCH --job-name=dischargesum-sft
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -uo pipefail

PREEMPTED=143
role="batch"
if [[ "${1:-}" == "node" || "${1:-}" == "batch" ]]; then
  role="$1"
  shift
fi
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"

log() { echo "[slurm_train.sh ${role} $(hostname -s 2>/dev/null || hostname)] $*" >&2; }

signalled=""
child=""
forward() {
  local sig="$1"
  signalled="$sig"
  if [[ -n "$child" ]]; then
    log "received SIG${sig}: forwarding to ${role_target} (pid ${child})"
    if [[ "$role" == "node" ]]; then
      kill -s "$sig" -- "-${child}" 2>/dev/null || kill -s "$sig" "$child" 2>/dev/null || true
    else
      kill -s "$sig" "$child" 2>/dev/null || true
    fi
  fi
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

# Wait for the child; a trapped signal interrupts `wait` (status > 128), so wait again until it has really exited.
wait_child() {
  local status
  while true; do
    wait "$child"
    status=$?
    if ! kill -0 "$child" 2>/dev/null; then
      break
    fi
  done
  if [[ "$role" == "node" && -n "$signalled" ]]; then
    # The launcher may exit before its training processes (accelerate's simple launcher dies on the signal):
    # wait for the whole process group to finish committing its checkpoint.
    while kill -0 -- "-${child}" 2>/dev/null; do
      sleep 1
    done
  fi
  return "$status"
}

if [[ "$role" == "node" ]]; then
  role_target="the launcher's process group"
  nnodes="${SLURM_NNODES:-1}"
  node_rank="${SLURM_NODEID:-0}"
  if [[ -z "${GPUS_PER_NODE:-}" ]]; then
    GPUS_PER_NODE="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
    GPUS_PER_NODE="${GPUS_PER_NODE:-1}"
    [[ "$GPUS_PER_NODE" -ge 1 ]] || GPUS_PER_NODE=1
  fi
  read -r -a launch <<<"${DISCHARGESUM_LAUNCH:-accelerate launch}"
  cmd=(
    "${launch[@]}"
    --config_file "${ACCELERATE_CONFIG:-accelerate_configs/multi_node.yaml}"
    --num_machines "$nnodes"
    --num_processes "$((nnodes * GPUS_PER_NODE))"
    --machine_rank "$node_rank"
    --main_process_ip "${MASTER_ADDR:-127.0.0.1}"
    --main_process_port "${MASTER_PORT:-29500}"
    scripts/sft_qlora.py "$@"
  )
  log "node ${node_rank}/${nnodes}: ${cmd[*]}"
  # Job control gives the background launch its own process group (pgid = its pid), so a signal reaches the
  # launcher and every training process it started.
  set -m
  "${cmd[@]}" &
  child=$!
  set +m
  wait_child
  status=$?
  if [[ -n "$signalled" ]]; then
    log "stopped after SIG${signalled} (launcher status ${status}): exiting ${PREEMPTED} so the job is requeued"
    exit "$PREEMPTED"
  fi
  exit "$status"
fi

# batch role
role_target="the srun step"
if [[ -z "${MASTER_ADDR:-}" ]]; then
  if [[ -n "${SLURM_JOB_NODELIST:-}" ]] && command -v scontrol >/dev/null; then
    MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
  else
    MASTER_ADDR="127.0.0.1"
  fi
fi
export MASTER_ADDR MASTER_PORT="${MASTER_PORT:-29500}"
read -r -a srun <<<"${DISCHARGESUM_SRUN:-srun}"
log "job ${SLURM_JOB_ID:-none} on ${SLURM_NNODES:-1} node(s), main process at ${MASTER_ADDR}:${MASTER_PORT}"
"${srun[@]}" --ntasks-per-node=1 --kill-on-bad-exit=0 bash "$0" node "$@" &
child=$!
wait_child
status=$?
if [[ "$status" -eq "$PREEMPTED" || -n "$signalled" ]]; then
  if [[ "${DISCHARGESUM_REQUEUE:-1}" == "1" && -n "${SLURM_JOB_ID:-}" ]] && command -v scontrol >/dev/null; then
    log "preempted: requeueing job ${SLURM_JOB_ID} (the rerun resumes from the newest valid checkpoint)"
    scontrol requeue "$SLURM_JOB_ID" || log "scontrol requeue failed: resubmit the same sbatch command"
  fi
  exit "$PREEMPTED"
fi
exit "$status"
