"""Multi-GPU on one machine: single GPU vs DDP, DeepSpeed ZeRO-2/3 and FSDP-QLoRA; kill + resume; sharded generation.

One invocation per machine size, from the repository root (GPUs: all visible ones unless ``--num_gpus``)::

    python3 benchmarks/multi_gpu.py --out $OUT                       # everything, capped at --max-minutes 8.5
    python3 benchmarks/multi_gpu.py --out $OUT --modes single,ddp,generate --max-minutes 5
    python3 benchmarks/multi_gpu.py --smoke --out /tmp/multi_gpu     # the harness on CPU (tiny model, gloo)

Everything goes through the real entry points, each run in its own process group with a timeout:
``accelerate launch --config_file accelerate_configs/<topology>.yaml --num_processes N scripts/sft_qlora.py
--config recipes/medgemma-4b/sft_qlora.yaml`` and ``accelerate launch ... scripts/generate.py --config
recipes/medgemma-4b/generate.yaml``, on a random-initialised model of the Gemma-3-4B text architecture
(:func:`_common.build_random_gemma3_4b`, built once) and synthetic notes prepared with
``scripts/prepare_data.py``. What it measures:

* **Training modes** ``single`` (single_gpu.yaml, 1 GPU: the reference), ``ddp`` (ddp.yaml), ``zero2``
  (deepspeed_zero2.yaml), ``zero3`` (deepspeed_zero3.yaml), ``fsdp`` (fsdp_qlora.yaml) on N GPUs, all for the SAME
  global batch (per-device batch x gradient accumulation x world size; default: the recipe's per-device batch x N, i.e.
  accumulation N on one GPU and 1 on N GPUs), 7 steps with a checkpoint every 3. Run order: single, ddp, fsdp,
  generate, zero2, zero3 (FSDP cannot run on CPU; ZeRO-2/3 also run in the smoke mode, and ZeRO-3 is the slowest). Per
  mode: per-step losses and grad norms vs the single-GPU run (tolerance: :data:`LOSS_RTOL` / :data:`GRAD_NORM_RTOL`
  relative in bf16 on GPU, :data:`LOSS_RTOL_FP32` in fp32 on CPU), the note_ids of every optimizer step vs the
  single-GPU run (the same examples per step), tokens/s per GPU (median over steady steps: the first step of each
  process and steps right after a checkpoint save are left out), scaling efficiency vs one GPU (goal >= 90 % for DDP at
  4 GPUs) and peak ``torch.cuda.max_memory_allocated`` per rank (logged by the stage on every rank).
* **Kill and resume** (every multi-GPU mode; ``--kill-single`` adds the 1-GPU run): once step ``--kill_after_step`` is
  logged and checkpoint ``--save_steps`` is committed, SIGKILL goes to the process group of the highest rank (torchrun
  gives every rank its own), as when a GPU or its process dies. torchrun then tears the job down; ranks blocked in an
  NCCL collective do not notice a dead peer, so after ``--teardown_grace`` seconds every remaining process of the job
  is SIGKILLed (recorded as ``teardown_forced``). The identical command is then rerun with the same world size: it must
  resume from the last valid checkpoint and finish ``--max_steps``.
* **Checkpoints of ZeRO-3 / FSDP** (on CPU: ZeRO-3's, else DDP's) are checked in a background CPU process while the
  GPUs go on: checksums (:func:`validate_checkpoint`), the generate stage's adapter checks and loader (one short greedy
  completion on CPU), :func:`dischargesum.modeling.merge_adapter`, and that the merged weights equal base + scale x B @
  A of the adapter.
* **Generation** through ``scripts/generate.py`` on 1, 2, 4 ... N GPUs with the adapter of the zero3 run (else fsdp,
  ddp, zero2, single; else the base model): greedy outputs must be identical to one GPU's; new tokens/s is the total
  new tokens over the slowest rank's generation time (from each rank's part file), also without each rank's first batch
  (``steady_*``: CUDA warm-up), which the scaling efficiency uses.

Results: ``<out>/multi_gpu_<N>gpu.json`` (``multi_gpu_smoke_cpu.json`` with ``--smoke``): GPU name and count, date,
library versions, the command, every launch's command line, exit code, wall time and log tail on failure, and the
numbers above; rewritten after every mode, so a run stopped early keeps what it measured. Logs of every launch go to
``<out>/logs/``. A failing mode is recorded and the next one runs. ``--max-minutes`` bounds the whole run: a mode
that cannot start in the time left is recorded as skipped. A short table is printed last.

``--smoke`` runs the same harness on the CPU with the tiny Gemma-3, the demo recipes and 2 processes (gloo, fp32):
``single``, ``ddp``, ``zero2`` and ``zero3`` (DeepSpeed runs on the CPU; it compiles a small shared-memory op once,
~40 s, cached in ~/.cache/torch_extensions) and generation on 1 and 2 processes. ``fsdp`` cannot run on the CPU:
accelerate's FSDP refuses to start without a GPU-class device (measured), so it is recorded as skipped. The test
(tests/integration/test_multi_gpu_smoke.py) runs ``--modes ddp,generate`` to stay within the CI time budget.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402  (benchmarks/ is not a package)

ACCELERATE_CONFIGS = REPO_ROOT / "accelerate_configs"
TRAIN_MODES = ("single", "ddp", "zero2", "zero3", "fsdp")
ALL_MODES = (*TRAIN_MODES, "generate")
# Execution order: the reference, then what has the least coverage elsewhere, so a tight --max-minutes drops the
# best-covered and slowest: FSDP cannot run on CPU at all; ZeRO-2/3 run in the CPU smoke mode, and ZeRO-3-QLoRA is
# by far the slowest on GPUs (measured on 2 x H200: ~4 min for its two launches, 0.21 of one GPU's tokens/s per GPU).
RUN_ORDER = ("single", "ddp", "fsdp", "generate", "zero2", "zero3")
GPU_CONFIGS = {
    "single": "single_gpu.yaml",
    "ddp": "ddp.yaml",
    "zero2": "deepspeed_zero2.yaml",
    "zero3": "deepspeed_zero3.yaml",
    "fsdp": "fsdp_qlora.yaml",
}
SMOKE_CONFIGS = {
    "single": "cpu.yaml",
    "ddp": "ddp.yaml",  # torchrun; sft_qlora trains on gloo when there is no GPU
    "zero2": "deepspeed_zero2.yaml",
    "zero3": "deepspeed_zero3.yaml",
}
SMOKE_SKIPPED = {
    "fsdp": "cannot run on CPU: accelerate's FSDP stops with 'There are currently no available devices found, must "
    "be one of XPU, CUDA, ...' (measured)",
}
# Modes whose checkpoints get the background merge / generation-load check (the sharded ones; on CPU zero3, or ddp
# when zero3 is not run, so that the check's own code runs there too).
ADAPTER_CHECK_MODES = ("zero3", "fsdp")
GENERATION_ADAPTER_PREFERENCE = ("zero3", "fsdp", "ddp", "zero2", "single")

# Tolerances vs the single-GPU run. bf16 has an 8-bit mantissa (unit roundoff 2^-8 = 3.9e-3): a few roundings of
# difference in reduction order, bf16 LoRA weights under FSDP or bf16 gradient accumulation under DeepSpeed stay
# within 1e-2 of the loss; grad norms (sums of squares of bf16 gradients) within 5e-2. fp32 on CPU: 1e-4 / 1e-3.
LOSS_RTOL = 1e-2
GRAD_NORM_RTOL = 5e-2
LOSS_RTOL_FP32 = 1e-4
GRAD_NORM_RTOL_FP32 = 1e-3
DDP_EFFICIENCY_GOAL = 0.90
# Time a mode needs to finish on GPUs (measured on H200s: two launches of a multi-GPU mode ~100 s, ZeRO-3 ~225 s,
# generation on 1/2/4 GPUs ~120 s); a mode that cannot finish in the time left is skipped instead of cut off.
MIN_SECONDS_TO_START = {"single": 90.0, "ddp": 150.0, "zero2": 150.0, "fsdp": 150.0, "zero3": 240.0, "generate": 120.0}
MIN_SECONDS_TO_START_CPU = 20.0
VERSION_PACKAGES = (
    "dischargesum", "torch", "transformers", "trl", "peft", "accelerate", "bitsandbytes", "deepspeed", "datasets",
)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Settings:
    out: Path
    work_dir: Path
    smoke: bool
    num_gpus: int
    modes: list[str]
    max_seconds: float
    recipe: str
    generate_recipe: str
    max_steps: int
    save_steps: int
    kill_after_step: int
    kill_single: bool
    teardown_grace: float
    per_device: int
    global_batch: int
    rows: int
    max_seq_length: int
    gen_notes: int
    gen_max_new_tokens: int
    gen_max_batch_size: int
    launch_timeout: float
    log_note_ids: bool
    extra_train_args: list[str] = field(default_factory=list)

    @property
    def tag(self) -> str:
        return "smoke_cpu" if self.smoke else f"{self.num_gpus}gpu"

    def world(self, mode: str) -> int:
        return 1 if mode == "single" else self.num_gpus

    def grad_accum(self, world: int) -> int:
        return self.global_batch // (self.per_device * world)

    def accelerate_config(self, mode: str) -> str:
        return (SMOKE_CONFIGS if self.smoke else GPU_CONFIGS)[mode]


def _read_recipe(path: str) -> dict[str, Any]:
    import yaml

    data = yaml.safe_load((REPO_ROOT / path).read_text(encoding="utf-8")) or {}
    return data if isinstance(data, dict) else {}


def _gpu_count() -> int:
    """Visible GPUs, counted in a child process so that this one never holds a CUDA context (0 when none)."""
    code = "import torch; print(torch.cuda.device_count())"
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180).stdout
        return int(out.strip().splitlines()[-1])
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError):
        return 0


def parse_args(argv: list[str] | None) -> Settings:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--out", required=True, help="results directory (JSON + logs); e.g. $OUT")
    p.add_argument("--work_dir", "--work-dir", default=None, help="scratch (model, data, runs); default /tmp/...")
    p.add_argument("--smoke", action="store_true", help="CPU run of the harness: tiny model, gloo, 2 processes")
    p.add_argument(
        "--num_gpus", "--num-gpus", type=int, default=0, help="GPUs for the multi-GPU modes (0: all visible)"
    )
    p.add_argument("--modes", default=",".join(ALL_MODES), help=f"comma-separated subset of {','.join(ALL_MODES)}")
    p.add_argument("--max-minutes", "--max_minutes", type=float, default=8.5, help="budget for the whole run")
    p.add_argument("--recipe", default=None, help="sft_qlora recipe (default: medgemma-4b; demo with --smoke)")
    p.add_argument("--generate_recipe", default=None, help="generate recipe (default: medgemma-4b; demo)")
    p.add_argument("--max_steps", type=int, default=None, help="optimizer steps per run (7; smoke 6)")
    p.add_argument("--save_steps", type=int, default=None, help="checkpoint interval (3; smoke 2)")
    p.add_argument("--kill_after_step", type=int, default=None, help="SIGKILL once this step is logged (4; smoke 3)")
    p.add_argument("--kill-single", "--kill_single", action="store_true", help="also kill + resume the 1-GPU run")
    p.add_argument("--teardown_grace", type=float, default=None, help="s to let torchrun tear down (5; smoke 30)")
    p.add_argument("--per_device_train_batch_size", type=int, default=None, help="default: the recipe's (smoke 2)")
    p.add_argument(
        "--global_batch", type=int, default=None,
        help="sequences per optimizer step in every mode (default: per-device batch x GPUs, i.e. no accumulation on "
        "N GPUs and N micro-batches on one GPU: the cheapest batch all modes can share)",
    )  # fmt: skip
    p.add_argument("--rows", type=int, default=None, help="synthetic rows for prepare_data (320; smoke 64)")
    p.add_argument("--max_seq_length", type=int, default=None, help="prepare_data token budget (2048; smoke 512)")
    p.add_argument("--gen_notes", type=int, default=None, help="test notes generated (2 batches per rank at N)")
    p.add_argument("--gen_max_new_tokens", type=int, default=None, help="new tokens per note (32; smoke 8)")
    p.add_argument("--gen_max_batch_size", type=int, default=None, help="notes per batch (8; smoke 2)")
    p.add_argument("--launch_timeout", type=float, default=None, help="s per launch (180; smoke 240)")
    p.add_argument("--no_note_ids", action="store_true", help="do not log and compare note_ids per step")
    p.add_argument("extra", nargs="*", help="extra `--field value` pairs for sft_qlora, after `--`")
    a = p.parse_args(argv)

    smoke = bool(a.smoke)
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in ALL_MODES]
    if unknown:
        p.error(f"--modes: unknown {unknown}; choose from {','.join(ALL_MODES)}")
    num_gpus = 2 if smoke else (a.num_gpus or _gpu_count())
    if not smoke and num_gpus < 1:
        p.error("no GPU visible (torch.cuda.device_count() is 0); use --smoke for the CPU dry run")
    recipe = a.recipe or ("recipes/demo/sft_qlora.yaml" if smoke else "recipes/medgemma-4b/sft_qlora.yaml")
    gen_recipe = a.generate_recipe or ("recipes/demo/generate.yaml" if smoke else "recipes/medgemma-4b/generate.yaml")
    for path, what in ((recipe, "--recipe"), (gen_recipe, "--generate_recipe")):
        if not (REPO_ROOT / path).is_file():
            p.error(f"{what} {path}: no such file in {REPO_ROOT}")
    r = _read_recipe(recipe)
    per_device = a.per_device_train_batch_size or (2 if smoke else int(r.get("per_device_train_batch_size", 1)))
    unit = per_device * max(num_gpus, 1)
    global_batch = a.global_batch or unit
    if global_batch % unit:
        p.error(f"--global_batch {global_batch} is not a multiple of per-device batch x GPUs = {unit}")
    # Smoke: 6 steps so that the kill after step 3 lands before the tiny model's (sub-second) steps finish the run.
    max_steps = a.max_steps or (6 if smoke else 7)
    save_steps = a.save_steps or (2 if smoke else 3)
    kill_after = a.kill_after_step or (3 if smoke else 4)
    if not save_steps < kill_after < max_steps:
        p.error("need save_steps < kill_after_step < max_steps (a checkpoint exists to resume from, work remains)")
    sizes = generation_sizes(num_gpus)
    gen_batch = a.gen_max_batch_size or (2 if smoke else 8)
    log_note_ids = not a.no_note_ids and not bool(r.get("packing", False))
    work = (
        Path(a.work_dir) if a.work_dir else Path(os.environ.get("TMPDIR", "/tmp")) / f"multi_gpu_bench_{os.getuid()}"
    )
    return Settings(
        out=Path(a.out),
        work_dir=work / ("smoke" if smoke else "gpu"),
        smoke=smoke,
        num_gpus=num_gpus,
        modes=modes,
        max_seconds=a.max_minutes * 60.0,
        recipe=recipe,
        generate_recipe=gen_recipe,
        max_steps=max_steps,
        save_steps=save_steps,
        kill_after_step=kill_after,
        kill_single=bool(a.kill_single),
        teardown_grace=a.teardown_grace if a.teardown_grace is not None else (30.0 if smoke else 5.0),
        per_device=per_device,
        global_batch=global_batch,
        rows=a.rows or (64 if smoke else 320),
        max_seq_length=a.max_seq_length or (512 if smoke else 2048),
        gen_notes=a.gen_notes or gen_batch * 2 * max(sizes),
        gen_max_new_tokens=a.gen_max_new_tokens or (8 if smoke else 32),
        gen_max_batch_size=gen_batch,
        launch_timeout=a.launch_timeout or (240.0 if smoke else 180.0),
        log_note_ids=log_note_ids,
        extra_train_args=list(a.extra),
    )


def generation_sizes(num_gpus: int) -> list[int]:
    """1, 2, 4, ... up to and including ``num_gpus``."""
    sizes, n = [], 1
    while n < num_gpus:
        sizes.append(n)
        n *= 2
    return sorted({*sizes, max(num_gpus, 1)})


# ---------------------------------------------------------------------------------------------------------------
# Launching, killing, timing out
# ---------------------------------------------------------------------------------------------------------------


def child_env(cpu_only: bool = False) -> dict[str, str]:
    # NVLink SHARP (multicast) is disabled on the lent machines; NCCL must not try it.
    env = _common.subprocess_env(NCCL_NVLS_ENABLE="0")
    if cpu_only:
        env["CUDA_VISIBLE_DEVICES"] = ""
    if "OMP_NUM_THREADS" not in env and cpu_only:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 2) // 2))
    return env


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch_command(config: str, num_processes: int, script: str, args: list[str]) -> list[str]:
    return [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(ACCELERATE_CONFIGS / config),
        "--num_processes", str(num_processes),
        "--main_process_port", str(free_port()),
        str(REPO_ROOT / "scripts" / script), *args,
    ]  # fmt: skip


def tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")[-chars:]
    except OSError:
        return ""


@dataclass
class KillPlan:
    """SIGKILL rank ``rank``'s process group once ``after_step`` is logged and ``checkpoint_step`` is committed."""

    run_dir: Path
    after_step: int
    checkpoint_step: int
    rank: int
    world: int
    script: str
    teardown_grace: float


def _rank_process(seen: dict[int, Any], root_pid: int, plan: KillPlan) -> Any | None:
    """The process running ``plan.script`` as rank ``plan.rank`` (torchrun sets RANK; a 1-process launch does not).

    A forked helper of that rank has the same command line and environment: the oldest match is the rank itself.
    """
    import psutil

    matches = []
    for pid, proc in seen.items():
        if pid == root_pid:
            continue
        try:
            if not any(plan.script in part for part in proc.cmdline()):
                continue
            rank = proc.environ().get("RANK")
            if (rank is None and plan.world == 1) or rank == str(plan.rank):
                matches.append((proc.create_time(), pid, proc))
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return min(matches)[2] if matches else None


def _ready_to_kill(plan: KillPlan) -> bool:
    from dischargesum.training.checkpoint_store import validate_checkpoint
    from dischargesum.training.metrics import train_loss_by_step

    steps = train_loss_by_step(plan.run_dir)
    if not steps or max(steps) < plan.after_step:
        return False
    return validate_checkpoint(plan.run_dir / f"checkpoint-{plan.checkpoint_step}", verify_checksums=False).valid


class _Job:
    """A launched command and every process it started (torchrun starts each rank in a session of its own, so a
    process-group kill of the launcher would miss them: they are tracked by pid and killed one by one)."""

    def __init__(self, cmd: list[str], log_fh: Any, env: dict[str, str]) -> None:
        import psutil

        self.proc = subprocess.Popen(
            cmd, stdout=log_fh, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=env, start_new_session=True
        )
        self.seen: dict[int, Any] = {}
        with contextlib.suppress(psutil.NoSuchProcess):
            self.seen[self.proc.pid] = psutil.Process(self.proc.pid)

    def track(self) -> None:
        import psutil

        root = self.seen.get(self.proc.pid)
        if root is None:
            return
        with contextlib.suppress(psutil.NoSuchProcess):
            for child in root.children(recursive=True):
                self.seen.setdefault(child.pid, child)

    def kill_all(self) -> None:
        import psutil

        self.track()
        for p in self.seen.values():
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()

    def survivors(self) -> list[Any]:
        import psutil

        alive = []
        for p in self.seen.values():
            with contextlib.suppress(psutil.NoSuchProcess):
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
        return alive


def run_launch(
    name: str, cmd: list[str], log: Path, *, timeout: float, env: dict[str, str], kill: KillPlan | None = None
) -> dict[str, Any]:
    """Run ``cmd`` (its own session, output to ``log``); kill a rank per ``kill``; SIGKILL everything on timeout.

    No process of the job survives the call. Returns a record: command, exit code, seconds, ``ok``, the kill's
    details and, for a failure that was not the planned kill, the log's tail.
    """
    import psutil

    log.parent.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {"name": name, "command": " ".join(cmd), "log": str(log)}
    t0 = time.monotonic()
    killed_at: float | None = None
    with open(log, "w", encoding="utf-8") as fh:
        job = _Job(cmd, fh, env)
        try:
            while job.proc.poll() is None:
                job.track()
                now = time.monotonic()
                if now - t0 > timeout:
                    record["timed_out"] = True
                    record["forced_kill"] = f"timeout after {timeout:.0f} s"
                    job.kill_all()
                    break
                if kill is not None and killed_at is None and _ready_to_kill(kill):
                    target = _rank_process(job.seen, job.proc.pid, kill)
                    if target is not None:
                        pgid = os.getpgid(target.pid)
                        os.killpg(pgid, signal.SIGKILL)
                        killed_at = time.monotonic()
                        record["kill"] = {
                            "signal": "SIGKILL",
                            "rank": kill.rank,
                            "process_group": pgid,
                            "after_step_logged": kill.after_step,
                            "last_valid_checkpoint": f"checkpoint-{kill.checkpoint_step}",
                            "seconds_into_launch": round(killed_at - t0, 2),
                            "teardown_forced": False,
                        }
                if kill is not None and killed_at is not None and now - killed_at > kill.teardown_grace:
                    # Ranks blocked in an NCCL collective never notice the dead peer; a scheduler would kill the job.
                    record["kill"]["teardown_forced"] = True
                    job.kill_all()
                    break
                time.sleep(0.2)
            try:
                job.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                record["forced_kill"] = "launcher did not exit"
                job.kill_all()
                job.proc.wait()
        except BaseException:  # Ctrl-C or SIGTERM of this harness: leave no training process behind
            job.kill_all()
            raise
    if killed_at is not None:
        record["kill"]["kill_to_job_exit_s"] = round(time.monotonic() - killed_at, 2)
    survivors = job.survivors()
    if survivors:
        record["survivors_killed"] = [p.pid for p in survivors]
        job.kill_all()
        psutil.wait_procs(survivors, timeout=15)
    record["returncode"] = job.proc.returncode
    record["seconds"] = round(time.monotonic() - t0, 2)
    record["ok"] = job.proc.returncode == 0 and not record.get("timed_out")
    if not record["ok"] and "kill" not in record:
        record["log_tail"] = tail(log)
    return record


class LaunchFailed(RuntimeError):
    def __init__(self, record: dict[str, Any]) -> None:
        super().__init__(f"{record['name']} failed (exit code {record.get('returncode')})")
        self.record = record


# ---------------------------------------------------------------------------------------------------------------
# Reading a training run
# ---------------------------------------------------------------------------------------------------------------


def training_rows(run_dir: Path) -> list[dict[str, Any]]:
    from dischargesum.training.metrics import read_metrics

    return [r for r in read_metrics(run_dir) if "loss" in r]


def throughput(segments: list[tuple[list[dict[str, Any]], int]], save_steps: int, world: int) -> dict[str, Any]:
    """Median tokens/s over steady steps: not the first step of a process (start-up, allocator warm-up) and not a
    step right after a save (its window includes the checkpoint write)."""
    samples, trained, steps = [], [], []
    for rows, first_step in segments:
        for r in rows:
            step = int(r["step"])
            if step <= first_step or (step - 1) % save_steps == 0 or "tokens_per_second" not in r:
                continue
            samples.append(float(r["tokens_per_second"]))
            trained.append(float(r.get("trained_tokens_per_second", 0.0)))
            steps.append(step)
    if not samples:
        return {"steps_used": []}
    total = statistics.median(samples)
    return {
        "steps_used": steps,
        "tokens_per_second": round(total, 1),
        "tokens_per_second_per_gpu": round(total / world, 1),
        "trained_tokens_per_second_per_gpu": round(statistics.median(trained) / world, 1),
    }


def peak_memory(rows: list[dict[str, Any]], world: int) -> dict[str, Any]:
    per_rank = [
        max((float(r[f"gpu_memory_peak_gib_rank{k}"]) for r in rows if f"gpu_memory_peak_gib_rank{k}" in r),
            default=None)
        for k in range(world)
    ]  # fmt: skip
    if world == 1 or any(v is None for v in per_rank):
        rank0 = max((float(r["gpu_memory_peak_gib"]) for r in rows if "gpu_memory_peak_gib" in r), default=None)
        per_rank = [rank0] if world == 1 else per_rank
    known = [v for v in per_rank if v is not None]
    return {"peak_gib_per_rank": per_rank, "peak_gib_max": max(known) if known else None}


def compare_to_reference(
    losses: dict[int, float], grads: dict[int, float], ref: dict[str, Any], loss_rtol: float, grad_norm_rtol: float
) -> dict[str, Any]:
    """Per-step relative differences of losses and grad norms against the reference (single-GPU) run."""

    def rel(a: float, b: float) -> float:
        return abs(a - b) / max(abs(b), 1e-12)

    ref_loss = {int(k): v for k, v in ref["losses"].items()}
    ref_grad = {int(k): v for k, v in ref["grad_norms"].items()}
    steps = sorted(set(losses) & set(ref_loss))
    loss_rel = {s: rel(losses[s], ref_loss[s]) for s in steps}
    grad_rel = {s: rel(grads[s], ref_grad[s]) for s in steps if s in grads and s in ref_grad}
    missing = sorted(set(ref_loss) - set(losses))
    out = {
        "steps_compared": steps,
        "steps_missing": missing,
        "loss_max_rel_diff": max(loss_rel.values()) if loss_rel else None,
        "grad_norm_max_rel_diff": max(grad_rel.values()) if grad_rel else None,
        "loss_rtol": loss_rtol,
        "grad_norm_rtol": grad_norm_rtol,
    }
    out["losses_match"] = bool(steps) and not missing and all(v <= loss_rtol for v in loss_rel.values())
    out["grad_norms_match"] = bool(grad_rel) and all(v <= grad_norm_rtol for v in grad_rel.values())
    return out


def compare_note_ids(run_dir: Path, ref: dict[str, Any]) -> dict[str, Any] | None:
    from dischargesum.training.metrics import note_ids_by_step

    if "note_ids" not in ref:
        return None
    mine = note_ids_by_step(run_dir)
    ref_ids = {int(k): v for k, v in ref["note_ids"].items()}
    mismatched = [s for s in sorted(ref_ids) if sorted(mine.get(s, [])) != sorted(ref_ids[s])]
    return {"same_examples_per_step": bool(mine) and not mismatched, "mismatched_steps": mismatched}


def finite(values: dict[int, float]) -> bool:
    return bool(values) and all(math.isfinite(v) for v in values.values())


def compare_generations(reference: list[dict[str, Any]], records: list[dict[str, Any]]) -> dict[str, Any]:
    """Whether ``records`` (stage1.jsonl of an N-process run) hold exactly the 1-process run's notes and summaries."""
    ref_by_id = {x["note_id"]: x for x in reference}
    differing = [
        x["note_id"] for x in records
        if x["note_id"] not in ref_by_id or x["summary"] != ref_by_id[x["note_id"]]["summary"]
    ]  # fmt: skip
    missing = sorted(set(ref_by_id) - {x["note_id"] for x in records})
    return {
        "identical_to_1": not differing and not missing and len(records) == len(reference),
        "differing_note_ids": differing[:10],
        "missing_note_ids": missing[:10],
    }


def rank_generation_stats(part: Path) -> dict[str, Any]:
    """One rank's generation from its part file (records in batch order; ``seconds`` = batch time / batch size).

    ``steady_*`` leave out the rank's first batch, which carries one-time costs (CUDA kernels and allocator warm-up).
    """
    from dischargesum.artifacts import read_jsonl

    recs = read_jsonl(part) if part.is_file() else []
    first = int(recs[0].get("batch_size", 1)) if recs else 0
    steady = recs[first:]
    return {
        "notes": len(recs),
        "batches_after_first": len(steady),
        "new_tokens": sum(int(x["new_tokens"]) for x in recs),
        "seconds": round(sum(float(x["seconds"]) for x in recs), 3),
        "steady_new_tokens": sum(int(x["new_tokens"]) for x in steady),
        "steady_seconds": round(sum(float(x["seconds"]) for x in steady), 3),
    }


def aggregate_generation(per_rank: list[dict[str, Any]]) -> dict[str, Any]:
    """New tokens/s of all ranks together: total new tokens over the slowest rank's generation time."""
    slowest = max((p["seconds"] for p in per_rank), default=0.0)
    steady_slowest = max((p["steady_seconds"] for p in per_rank), default=0.0)
    total = sum(p["new_tokens"] for p in per_rank)
    steady_total = sum(p["steady_new_tokens"] for p in per_rank)
    return {
        "new_tokens": total,
        "new_tokens_per_second": round(total / slowest, 1) if slowest > 0 else None,
        "steady_new_tokens_per_second": round(steady_total / steady_slowest, 1) if steady_slowest > 0 else None,
    }


# ---------------------------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------------------------


class Bench:
    def __init__(self, s: Settings, argv: list[str]) -> None:
        self.s = s
        self.t0 = time.monotonic()
        self.logs = s.out / "logs"
        self.model = s.work_dir / "model"
        self.data = s.work_dir / "data"
        self.result: dict[str, Any] = {
            "benchmark": "multi_gpu",
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "host": platform.node(),
            "command": " ".join(["python3", "benchmarks/multi_gpu.py", *argv]),
            "smoke": s.smoke,
            "settings": {
                k: (str(v) if isinstance(v, Path) else v) for k, v in vars(s).items() if k not in ("out", "work_dir")
            },
            "tolerances": {
                "loss_rtol": LOSS_RTOL_FP32 if s.smoke else LOSS_RTOL,
                "grad_norm_rtol": GRAD_NORM_RTOL_FP32 if s.smoke else GRAD_NORM_RTOL,
                "why": "bf16 unit roundoff 2^-8 = 3.9e-3; a few roundings of difference between topologies "
                "(reduction order, bf16 LoRA weights under FSDP, bf16 gradient accumulation under DeepSpeed). "
                "CPU smoke runs fp32.",
            },
            "goals": {"ddp_scaling_efficiency_at_4_gpus": f">= {DDP_EFFICIENCY_GOAL}"},
            "timings_s": {},
            "modes": {},
            "adapter_checks": {},
        }
        self.background = ThreadPoolExecutor(max_workers=1)
        self.background_jobs: dict[str, Future] = {}
        self._background_procs: dict[str, subprocess.Popen] = {}
        self._lock = threading.Lock()
        self.partial: dict[str, Any] = {}

    # -- time ----------------------------------------------------------------------------------------------------
    def remaining(self) -> float:
        return self.s.max_seconds - (time.monotonic() - self.t0)

    def min_seconds(self, mode: str) -> float:
        return MIN_SECONDS_TO_START_CPU if self.s.smoke else MIN_SECONDS_TO_START[mode]

    def launch_timeout(self) -> float:
        return max(1.0, min(self.s.launch_timeout, self.remaining() - 5.0))

    def out_file(self) -> Path:
        return self.s.out / f"multi_gpu_{self.s.tag}.json"

    def save(self) -> None:
        self.result["timings_s"]["total"] = round(time.monotonic() - self.t0, 1)
        self.s.out.mkdir(parents=True, exist_ok=True)
        tmp = self.out_file().with_suffix(".json.tmp")
        with self._lock:
            tmp.write_text(json.dumps(self.result, indent=2, default=str) + "\n", encoding="utf-8")
            os.replace(tmp, self.out_file())

    def say(self, msg: str) -> None:
        print(f"[multi_gpu {time.monotonic() - self.t0:6.1f}s] {msg}", flush=True)

    # -- setup ---------------------------------------------------------------------------------------------------
    def environment(self) -> None:
        from dischargesum.manifest import git_revision, library_versions

        info: dict[str, Any] = {"cuda": False, "cpu_count": os.cpu_count(), "machine": platform.machine()}
        if not self.s.smoke:  # asked in a child process: this one never holds a CUDA context
            code = (
                "import json, torch\n"
                "d = {'cuda': torch.cuda.is_available(), 'torch_cuda': torch.version.cuda}\n"
                "if d['cuda']:\n"
                "    d['gpu_count'] = torch.cuda.device_count()\n"
                "    d['gpu_name'] = torch.cuda.get_device_name(0)\n"
                "    d['gpu_memory_gib'] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)\n"
                "    d['bf16'] = torch.cuda.is_bf16_supported()\n"
                "    d['nccl'] = '.'.join(map(str, torch.cuda.nccl.version()))\n"
                "print(json.dumps(d))\n"
            )
            proc = subprocess.run(
                [sys.executable, "-c", code],
                capture_output=True,
                text=True,
                env=child_env(),
                timeout=180,
                cwd=REPO_ROOT,
            )
            try:
                info.update(json.loads(proc.stdout.strip().splitlines()[-1]))
            except (IndexError, json.JSONDecodeError):
                info["error"] = proc.stderr[-2000:]
        self.result["device"] = info
        self.result["gpus_used"] = 0 if self.s.smoke else self.s.num_gpus
        self.result["versions"] = library_versions(VERSION_PACKAGES)
        self.result["git_revision"] = git_revision()
        self.save()

    def prepare(self) -> None:
        """Model (built once, in a subprocess so that this process never holds a CUDA context) and data."""
        t0 = time.monotonic()
        if not (self.model / "config.json").is_file():
            shutil.rmtree(self.model, ignore_errors=True)
            if self.s.smoke:
                builder = "from dischargesum.tiny_models import build_tiny_gemma3 as build"
            else:
                bench_dir = str(Path(__file__).resolve().parent)
                builder = f"import sys; sys.path.insert(0, {bench_dir!r}); from _common import build_random_gemma3_4b"
                builder += " as build"
            code = f"{builder}; build({str(self.model)!r}, seed=0)"
            rec = run_launch(
                "build_model", [sys.executable, "-c", code], self.logs / "build_model.log",
                timeout=600, env=child_env(cpu_only=self.s.smoke),
            )  # fmt: skip
            self.result["timings_s"]["build_model"] = rec["seconds"]
            if not rec["ok"]:
                raise LaunchFailed(rec)
        from dischargesum.manifest import read_manifest

        manifest = read_manifest(self.data)
        if not (manifest and manifest.get("status") == "complete"):
            shutil.rmtree(self.data, ignore_errors=True)
            args = [
                "--output_dir", str(self.data), "--source", "synthetic", "--synthetic_rows", str(self.s.rows),
                "--synthetic_profile", "tiny" if self.s.smoke else "kaggle", "--synthetic_schema", "kaggle",
                "--tokenizer_name_or_path", str(self.model), "--max_seq_length", str(self.s.max_seq_length),
                "--validation_fraction", "0.05", "--test_fraction", "0.3", "--max_reject_fraction", "0.5",
                "--plots", "false", "--seed", "0",
            ]  # fmt: skip
            cmd = [sys.executable, str(REPO_ROOT / "scripts" / "prepare_data.py"), *args]
            rec = run_launch("prepare_data", cmd, self.logs / "prepare_data.log", timeout=600, env=child_env(True))
            self.result["timings_s"]["prepare_data"] = rec["seconds"]
            if not rec["ok"]:
                raise LaunchFailed(rec)
        card = json.loads((self.data / "data_card.json").read_text(encoding="utf-8"))
        self.result["data"] = {
            "rows": self.s.rows,
            "splits": {k: v.get("rows") for k, v in card.get("splits", {}).items() if isinstance(v, dict)},
            "max_seq_length": card.get("max_seq_length"),
        }
        self.result["timings_s"]["setup"] = round(time.monotonic() - t0, 1)
        self.save()

    # -- training ------------------------------------------------------------------------------------------------
    def train_args(self, run_dir: Path, world: int) -> list[str]:
        s = self.s
        args = [
            "--config", s.recipe,
            "--model_name_or_path", str(self.model),
            "--dataset_dir", str(self.data),
            "--output_dir", str(run_dir),
            "--max_steps", str(s.max_steps),
            "--save_steps", str(s.save_steps),
            "--logging_steps", "1",
            "--eval_steps", "0",
            "--seed", "0",
            "--per_device_train_batch_size", str(s.per_device),
            "--gradient_accumulation_steps", str(s.grad_accum(world)),
            "--resume_from_checkpoint", "auto",
            "--dataset_num_proc", "1",  # a few hundred rows: worker processes would cost more than they save
        ]  # fmt: skip
        if s.log_note_ids:
            args += ["--log_note_ids", "true"]
        return args + s.extra_train_args

    def run_training_mode(self, mode: str) -> dict[str, Any]:
        s = self.s
        world = s.world(mode)
        run_dir = s.work_dir / "runs" / mode
        shutil.rmtree(run_dir, ignore_errors=True)
        config = s.accelerate_config(mode)
        cmd = launch_command(config, world, "sft_qlora.py", self.train_args(run_dir, world))
        res: dict[str, Any] = {
            "run_dir": str(run_dir),
            "accelerate_config": config,
            "world_size": world,
            "per_device_batch": s.per_device,
            "gradient_accumulation_steps": s.grad_accum(world),
            "global_batch": s.global_batch,
            "launches": [],
        }
        self.partial = res  # what a failure record keeps
        kill_this = mode != "single" or s.kill_single
        segments: list[tuple[list[dict[str, Any]], int]] = []
        resume_step = 0
        if kill_this:
            plan = KillPlan(
                run_dir, s.kill_after_step, s.save_steps, rank=world - 1, world=world, script="sft_qlora.py",
                teardown_grace=s.teardown_grace,
            )  # fmt: skip
            rec = run_launch(
                f"{mode}_killed", cmd, self.logs / f"{mode}_1_killed.log", timeout=self.launch_timeout(),
                env=child_env(), kill=plan,
            )  # fmt: skip
            res["launches"].append(rec)
            if "kill" not in rec:
                rec.setdefault("log_tail", tail(Path(rec["log"])))
                raise LaunchFailed(rec)
            from dischargesum.training.checkpoint_store import find_latest_valid_checkpoint

            killed_rows = training_rows(run_dir)
            # The SIGKILL lands when the process group gets it, not when it was planned: on a fast run more steps
            # (and another checkpoint) may be committed in between. The resume must start from the last valid
            # checkpoint at the time of death, whichever that is.
            survivor = find_latest_valid_checkpoint(run_dir)
            res["kill"] = {
                **rec["kill"],
                "planned_after_checkpoint": rec["kill"]["last_valid_checkpoint"],
                "last_valid_checkpoint": survivor.name if survivor else None,
                "steps_logged_before_kill": max((int(r["step"]) for r in killed_rows), default=0),
                "left_in_output_dir": sorted(p.name for p in run_dir.iterdir()) if run_dir.is_dir() else [],
                "job_exit_code": rec["returncode"],
            }
            resume_step = int(survivor.name.rsplit("-", 1)[1]) if survivor else 0
            segments.append(([r for r in killed_rows if int(r["step"]) <= max(resume_step, 1)], 1))
            if self.remaining() < self.min_seconds(mode) / 2:
                raise TimeoutError("no time left to resume after the kill (--max-minutes)")
        rec = run_launch(
            f"{mode}_resumed" if kill_this else mode, cmd,
            self.logs / (f"{mode}_2_resumed.log" if kill_this else f"{mode}.log"),
            timeout=self.launch_timeout(), env=child_env(),
        )  # fmt: skip
        res["launches"].append(rec)
        if not rec["ok"]:
            raise LaunchFailed(rec)

        from dischargesum.manifest import read_manifest
        from dischargesum.training.checkpoint_store import find_latest_valid_checkpoint
        from dischargesum.training.metrics import note_ids_by_step

        rows = training_rows(run_dir)
        manifest = read_manifest(run_dir) or {}
        resumed_from = (manifest.get("inputs") or {}).get("resume_from")
        losses = {int(r["step"]): float(r["loss"]) for r in rows}
        grads = {int(r["step"]): float(r["grad_norm"]) for r in rows if r.get("grad_norm") is not None}
        first = resume_step + 1 if kill_this else 1
        segments.append(([r for r in rows if int(r["step"]) >= first], first))
        latest = find_latest_valid_checkpoint(run_dir)
        res.update(
            {
                "losses": {str(k): v for k, v in sorted(losses.items())},
                "grad_norms": {str(k): v for k, v in sorted(grads.items())},
                "losses_finite": finite(losses),
                "final_step": max(losses, default=0),
                "run_status": manifest.get("status"),
                "latest_checkpoint": str(latest) if latest else None,
                "throughput": throughput(segments, s.save_steps, world),
                "memory": peak_memory([r for seg, _f in segments for r in seg] + rows, world),
            }
        )
        if s.log_note_ids:
            res["note_ids"] = {str(k): v for k, v in sorted(note_ids_by_step(run_dir).items())}
        if kill_this:
            expected = res["kill"]["last_valid_checkpoint"]
            res["resume"] = {
                "resumed_from": resumed_from,
                "resumed_from_expected_checkpoint": bool(resumed_from) and Path(resumed_from).name == expected,
                "reached_max_steps": res["final_step"] == s.max_steps,
            }
        ref = self.result["modes"].get("single")
        if mode != "single" and ref and ref.get("status") == "ok":
            tol = self.result["tolerances"]
            res["vs_single"] = compare_to_reference(losses, grads, ref, tol["loss_rtol"], tol["grad_norm_rtol"])
            ids = compare_note_ids(run_dir, ref)
            if ids is not None:
                res["vs_single"]["note_ids"] = ids
            ref_tps = (ref.get("throughput") or {}).get("tokens_per_second_per_gpu")
            tps = res["throughput"].get("tokens_per_second_per_gpu")
            if ref_tps and tps:
                res["scaling_efficiency"] = round(tps / ref_tps, 3)
        res["passed"] = self._passed(mode, res)
        return res

    def _passed(self, mode: str, res: dict[str, Any]) -> bool:
        ok = res["losses_finite"] and res["final_step"] == self.s.max_steps and res["run_status"] == "complete"
        if "resume" in res:
            ok = ok and res["resume"]["resumed_from_expected_checkpoint"]
        if "vs_single" in res:
            v = res["vs_single"]
            ok = ok and v["losses_match"] and v["grad_norms_match"]
            if "note_ids" in v:
                ok = ok and v["note_ids"]["same_examples_per_step"]
        return bool(ok)

    # -- adapter checks (background, CPU) -------------------------------------------------------------------------
    def queue_adapter_check(self, mode: str, checkpoint: str) -> None:
        out_json = self.s.work_dir / "checks" / f"{mode}.json"
        out_json.parent.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable, str(Path(__file__).resolve()), "_adapter_check", checkpoint, str(self.data),
            str(out_json), str(self.s.work_dir / "checks" / f"{mode}-merged"),
        ]  # fmt: skip
        log = self.logs / f"adapter_check_{mode}.log"
        self.say(f"queued CPU check of {checkpoint} (merge + generate loader) in the background")

        def job() -> dict[str, Any]:
            t0 = time.monotonic()
            with open(log, "w", encoding="utf-8") as fh:
                proc = subprocess.Popen(
                    cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=child_env(cpu_only=True),
                    start_new_session=True,
                )  # fmt: skip
                self._background_procs[mode] = proc
                rc = proc.wait()
            out: dict[str, Any] = {
                "checkpoint": checkpoint,
                "returncode": rc,
                "seconds": round(time.monotonic() - t0, 1),
            }
            if out_json.is_file():
                out.update(json.loads(out_json.read_text(encoding="utf-8")))
            if rc != 0:
                out["log_tail"] = tail(log)
            out["ok"] = rc == 0 and bool(out.get("merge_ok")) and bool(out.get("generate_load_ok"))
            if rc is not None and rc < 0:  # killed (kill_background at the end of the run): no verdict
                out["ok"] = None
                out["error"] = f"not finished: killed by signal {-rc} when the run's --max-minutes ran out"
            self.result["adapter_checks"][mode] = out
            self.save()
            return out

        self.background_jobs[mode] = self.background.submit(job)

    def kill_background(self) -> None:
        self.background.shutdown(wait=False, cancel_futures=True)  # nothing queued starts after this
        for proc in list(self._background_procs.values()):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def wait_for_background(self) -> None:
        for mode, fut in self.background_jobs.items():
            left = max(20.0, self.remaining())
            try:
                fut.result(timeout=left)
            except Exception as exc:  # a timeout or a crash of the job itself: record it, kill the process
                self.kill_background()
                self.result["adapter_checks"].setdefault(mode, {})["error"] = (
                    f"not finished within --max-minutes ({type(exc).__name__})"
                )
        self.background.shutdown(wait=False, cancel_futures=True)

    # -- generation ---------------------------------------------------------------------------------------------
    def run_generation(self) -> dict[str, Any]:
        from dischargesum.artifacts import read_jsonl

        s = self.s
        adapter, source = None, None
        for mode in GENERATION_ADAPTER_PREFERENCE:
            m = self.result["modes"].get(mode) or {}
            if m.get("latest_checkpoint"):
                adapter, source = m["latest_checkpoint"], mode
                break
        res: dict[str, Any] = {
            "adapter": adapter,
            "adapter_from_mode": source,
            "notes": s.gen_notes,
            "max_new_tokens": s.gen_max_new_tokens,
            "max_batch_size": s.gen_max_batch_size,
            "runs": {},
        }
        self.partial = res
        reference: list[dict[str, Any]] | None = None
        base_rate = None
        for n in generation_sizes(s.num_gpus):
            if self.remaining() < self.min_seconds("generate") / 3:  # one of the ~3 launches
                res["runs"][str(n)] = {"status": "skipped", "reason": "--max-minutes budget"}
                continue
            out = s.work_dir / "generate" / f"n{n}"
            shutil.rmtree(out, ignore_errors=True)
            args = [
                "--config", s.generate_recipe, "--dataset_dir", str(self.data), "--split", "test",
                "--output_dir", str(out), "--limit", str(s.gen_notes), "--max_new_tokens", str(s.gen_max_new_tokens),
                "--max_batch_size", str(s.gen_max_batch_size), "--seed", "0",
            ]  # fmt: skip
            args += (
                ["--adapter", adapter] if adapter else ["--adapter", "none", "--model_name_or_path", str(self.model)]
            )
            config = ("cpu.yaml" if s.smoke else "single_gpu.yaml") if n == 1 else "ddp.yaml"
            rec = run_launch(
                f"generate_{n}", launch_command(config, n, "generate.py", args), self.logs / f"generate_{n}.log",
                timeout=self.launch_timeout(), env=child_env(),
            )  # fmt: skip
            run: dict[str, Any] = {"launch": rec, "processes": n}
            res["runs"][str(n)] = run
            if not rec["ok"]:
                run["status"] = "failed"
                continue
            records = read_jsonl(out / "stage1.jsonl")
            per_rank = [rank_generation_stats(out / "parts" / f"stage1.rank{r:03d}.jsonl") for r in range(n)]
            run.update({"status": "ok", "notes": len(records), "per_rank": per_rank, **aggregate_generation(per_rank)})
            if n == 1:
                reference = records
                base_rate = run["steady_new_tokens_per_second"]
            elif reference is None:
                run["identical_to_1"] = None  # the 1-GPU run failed or was skipped: nothing to compare with
            else:
                run.update(compare_generations(reference, records))
                if base_rate and run["steady_new_tokens_per_second"]:
                    run["speedup_vs_1"] = round(run["steady_new_tokens_per_second"] / base_rate, 2)
                    run["scaling_efficiency"] = round(run["speedup_vs_1"] / n, 3)
        ran = {n: r for n, r in res["runs"].items() if r.get("status") == "ok"}
        res["passed"] = "1" in ran and len(ran) >= 2 and all(r.get("identical_to_1", True) for r in ran.values())
        return res

    # -- driver --------------------------------------------------------------------------------------------------
    def run(self) -> int:
        s = self.s
        self.say(f"{s.tag}: modes {','.join(m for m in RUN_ORDER if m in s.modes)}; work dir {s.work_dir}")
        self.environment()
        try:
            self.prepare()
        except Exception as exc:
            self.result["error"] = f"setup failed: {exc}"
            if isinstance(exc, LaunchFailed):
                self.result["error_log_tail"] = exc.record.get("log_tail") or tail(Path(exc.record["log"]))
            self.save()
            self.say(self.result["error"])
            return 1
        # Imported now: the kill watcher polls with these and must not pay the transformers import mid-run.
        import dischargesum.training.checkpoint_store
        import dischargesum.training.metrics  # noqa: F401

        for mode in RUN_ORDER:
            if mode not in s.modes:
                continue
            if s.smoke and mode in SMOKE_SKIPPED:
                self.result["modes"][mode] = {"status": "skipped", "reason": SMOKE_SKIPPED[mode]}
                continue
            if mode != "single" and mode != "generate" and s.num_gpus < 2:
                self.result["modes"][mode] = {"status": "skipped", "reason": "needs >= 2 GPUs"}
                continue
            if self.remaining() < self.min_seconds(mode):
                self.result["modes"][mode] = {"status": "skipped", "reason": "--max-minutes budget"}
                self.save()
                continue
            self.say(f"{mode}: start")
            t0 = time.monotonic()
            self.partial = {}
            try:
                res = self.run_generation() if mode == "generate" else self.run_training_mode(mode)
                res["status"] = "ok"
            except Exception as exc:  # recorded with what was measured so far; the next mode runs
                res = {**self.partial, "status": "failed", "error": f"{type(exc).__name__}: {exc}"}
                if isinstance(exc, LaunchFailed) and exc.record not in res.get("launches", []):
                    res["failed_launch"] = exc.record
                res["error_line"] = error_line(res)
                if res.get("run_dir"):
                    res["losses_so_far"] = {str(r["step"]): r["loss"] for r in training_rows(Path(res["run_dir"]))}
            res["seconds"] = round(time.monotonic() - t0, 1)
            self.result["modes"][mode] = res
            self.save()
            self.say(
                f"{mode}: {res['status']} in {res['seconds']} s"
                + (f" ({res.get('error')})" if res.get("error") else "")
            )
            # On CPU there is no FSDP: check the ZeRO-3 checkpoint, or DDP's when ZeRO-3 is not run.
            wants_check = ADAPTER_CHECK_MODES if not s.smoke else ("zero3",) if "zero3" in s.modes else ("ddp",)
            if mode in wants_check and res.get("status") == "ok" and res.get("latest_checkpoint"):
                self.queue_adapter_check(mode, res["latest_checkpoint"])
        self.wait_for_background()
        self.result["summary"] = summarize(self.result, s)
        self.save()
        print(f"wrote {self.out_file()}")
        print(format_table(self.result, s))
        return 0 if self.result["summary"]["all_passed"] else 1


# ---------------------------------------------------------------------------------------------------------------
# Summary and table
# ---------------------------------------------------------------------------------------------------------------


def summarize(result: dict[str, Any], s: Settings) -> dict[str, Any]:
    modes = result["modes"]
    ran = {m: r for m, r in modes.items() if r.get("status") != "skipped"}
    passed = {m: bool(r.get("status") == "ok" and r.get("passed")) for m, r in ran.items()}
    checks = {m: bool(c.get("ok")) for m, c in result["adapter_checks"].items()}
    summary: dict[str, Any] = {
        "modes_passed": passed,
        "modes_skipped": {m: r.get("reason") for m, r in modes.items() if r.get("status") == "skipped"},
        "adapter_checks_passed": checks,
        "all_passed": bool(ran) and all(passed.values()) and all(checks.values()),
    }
    ddp = modes.get("ddp") or {}
    if ddp.get("scaling_efficiency") is not None and s.num_gpus >= 4 and not s.smoke:
        summary["ddp_scaling_goal_met"] = ddp["scaling_efficiency"] >= DDP_EFFICIENCY_GOAL
    return summary


# Lines the launchers add on top of the real error (torchrun / accelerate re-raising a child's failure).
_LAUNCHER_NOISE = (
    "CalledProcessError",
    "ChildFailedError",
    "torch.distributed.elastic",
    "raise ",
    "accelerate/commands",
)


def error_line(res: dict[str, Any]) -> str | None:
    """The root error of the failed launch, from its log: the last ``...Error: ...`` / ``: error:`` line that is
    not a launcher re-raising a child's failure (for the table; the JSON keeps the log tail)."""
    launches = [*res.get("launches", []), res.get("failed_launch") or {}]
    for rec in reversed(launches):
        if rec.get("ok") or "kill" in rec or not rec.get("log"):
            continue
        text = tail(Path(rec["log"]), 200_000) or str(rec.get("log_tail") or "")
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        hits = [
            ln for ln in lines
            if ("Error" in ln or "error:" in ln or "Exception" in ln) and not any(n in ln for n in _LAUNCHER_NOISE)
        ]  # fmt: skip
        if hits or lines:
            return (hits or lines)[-1][:200]
    return None


def _fmt(v: Any, spec: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and spec:
        return format(v, spec)
    return str(v)


def format_table(result: dict[str, Any], s: Settings) -> str:
    dev = result.get("device") or {}
    where = "CPU smoke (tiny model, gloo)" if s.smoke else f"{s.num_gpus} x {dev.get('gpu_name', 'GPU')}"
    lines = [
        f"== multi_gpu: {where}; global batch {s.global_batch}, {s.max_steps} steps; tolerances "
        f"loss {result['tolerances']['loss_rtol']:g} / grad norm {result['tolerances']['grad_norm_rtol']:g} rel ==",
        f"{'mode':<8} {'gpus':>4} {'status':<8} {'loss Δ':>9} {'gnorm Δ':>9} {'ids':>4} {'tok/s/gpu':>10} "
        f"{'eff':>6} {'peak GiB':>9} {'kill->resume':>14}",
    ]
    for mode in TRAIN_MODES:
        r = result["modes"].get(mode)
        if r is None:
            continue
        if r.get("status") != "ok":
            reason = r.get("reason") or r.get("error") or ""
            lines.append(f"{mode:<8} {'':>4} {r.get('status', '?'):<8} {reason[:100]}")
            if r.get("error_line"):
                lines.append(f"{'':<8} {'':>4} {'':<8} {r['error_line'][:100]}")
            continue
        v = r.get("vs_single") or {}
        ids = v.get("note_ids")
        kill = r.get("resume")
        kr = "-" if not kill else (
            f"ok from {Path(kill['resumed_from']).name.split('-')[-1]}"
            if kill["resumed_from_expected_checkpoint"] and kill["reached_max_steps"] else "FAILED"
        )  # fmt: skip
        status = "PASS" if r.get("passed") else "FAIL"
        lines.append(
            f"{mode:<8} {r['world_size']:>4} {status:<8} {_fmt(v.get('loss_max_rel_diff'), '.1e'):>9} "
            f"{_fmt(v.get('grad_norm_max_rel_diff'), '.1e'):>9} "
            f"{('-' if ids is None else ('yes' if ids['same_examples_per_step'] else 'NO')):>4} "
            f"{_fmt(r['throughput'].get('tokens_per_second_per_gpu'), '.0f'):>10} "
            f"{_fmt(r.get('scaling_efficiency'), '.2f'):>6} {_fmt(r['memory'].get('peak_gib_max'), '.2f'):>9} {kr:>14}"
        )
    gen = result["modes"].get("generate")
    if gen is not None:
        if gen.get("status") != "ok":
            lines.append(f"generate: {gen.get('status')} {gen.get('reason') or gen.get('error') or ''}"[:120])
        else:
            parts = []
            for n, run in gen["runs"].items():
                if run.get("status") != "ok":
                    parts.append(f"{n}: {run.get('status')}")
                    continue
                same = "" if n == "1" else (" same" if run.get("identical_to_1") else " DIFFERENT")
                eff = f" eff {run['scaling_efficiency']:.2f}" if run.get("scaling_efficiency") is not None else ""
                rate = _fmt(run.get("steady_new_tokens_per_second"), ".0f")
                parts.append(f"{n}: {rate} new tok/s{same}{eff}")
            lines.append(f"generate ({gen.get('adapter_from_mode') or 'base'} adapter): " + "; ".join(parts))
    for mode, c in result["adapter_checks"].items():
        if c.get("ok") is None and c.get("error"):
            lines.append(f"{mode} checkpoint: check {c['error']}")
            continue
        lines.append(
            f"{mode} checkpoint: merge {'ok' if c.get('merge_ok') else 'FAILED'}, generate loader "
            f"{'ok' if c.get('generate_load_ok') else 'FAILED'}" + (f" ({c['error']})" if c.get("error") else "")
        )
    summary = result.get("summary") or {}
    lines.append(f"all passed: {summary.get('all_passed')}  ({result['timings_s'].get('total')} s)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Background check of one checkpoint (CPU process)
# ---------------------------------------------------------------------------------------------------------------


def _model_tensor(model_dir: Path, name: str) -> Any:
    from safetensors import safe_open

    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        file = json.loads(index.read_text(encoding="utf-8"))["weight_map"][name]
    else:
        file = "model.safetensors"
    with safe_open(str(model_dir / file), framework="pt") as fh:
        return fh.get_tensor(name)


def adapter_check(checkpoint: str, dataset_dir: str, out_json: str, merged_dir: str) -> int:
    """Validate ``checkpoint``, load it through the generate stage's loader (one short greedy completion on CPU),
    merge it with ``merge_adapter`` and check merged = base + scale x B @ A on one LoRA'd projection."""
    import torch
    from safetensors import safe_open

    from dischargesum.data.formatting import prompt_messages
    from dischargesum.inference.engine import EngineSettings, GenerationRequest, encode_chats
    from dischargesum.inference.loading import load_engine, resolve_model_source
    from dischargesum.modeling import merge_adapter, resolve_adapter_base
    from dischargesum.training.checkpoint_store import validate_checkpoint

    out: dict[str, Any] = {}

    def save() -> None:
        Path(out_json).write_text(json.dumps(out, indent=2, default=str), encoding="utf-8")

    ckpt = Path(checkpoint)
    status = validate_checkpoint(ckpt)
    out["checkpoint_valid"] = status.valid
    out["checkpoint_reason"] = status.reason
    cfg = json.loads((ckpt / "adapter_config.json").read_text(encoding="utf-8"))
    scale = float(cfg["lora_alpha"]) / float(cfg["r"])
    with safe_open(str(ckpt / "adapter_model.safetensors"), framework="pt") as fh:
        keys = list(fh.keys())
        a_keys = sorted(k for k in keys if k.endswith("lora_A.weight"))
        b_all_zero = [k for k in keys if "lora_B" in k and not bool(fh.get_tensor(k).abs().sum() > 0)]
        empty = [k for k in keys if fh.get_tensor(k).numel() == 0]
        probe = next((k for k in a_keys if ".layers.0." in k and "q_proj" in k), a_keys[0] if a_keys else None)
        a = fh.get_tensor(probe).float() if probe else None
        b = fh.get_tensor(probe.replace("lora_A", "lora_B")).float() if probe else None
    out.update({"lora_tensors": len(keys), "empty_tensors": empty[:5], "lora_B_all_zero": len(b_all_zero)})
    save()

    t0 = time.monotonic()
    base = Path(resolve_adapter_base(ckpt))
    merged = merge_adapter(ckpt, merged_dir)
    out["merge_seconds"] = round(time.monotonic() - t0, 1)
    if probe is not None and a is not None and b is not None:
        # "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" -> "model.layers.0.self_attn.q_proj.weight"
        name = probe.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
        w_base = _model_tensor(base, name).to(torch.bfloat16).float()
        w_merged = _model_tensor(Path(merged), name).float()
        delta = scale * (b @ a)
        # Replay the merge's arithmetic: the bf16 weight plus the LoRA delta (PEFT keeps adapter weights in fp32 on a
        # bf16 base, some versions round the delta to bf16 first), rounded to bf16. A few steps' delta is often
        # below half an ulp of a weight, so rounding swallows it there: compare only the weights the merge must
        # change. A correct merge reproduces them (up to the last bit of a few sums); one that ignored the
        # adapter, used another adapter or a wrong scale does not (measured on synthetic 2048x2560 weights:
        # 1.0 vs 0.0 ignored, 0.28 at twice the scale).
        agreement = {}
        for convention, d in (("fp32_delta", delta), ("bf16_delta", delta.to(torch.bfloat16).float())):
            predicted = (w_base + d).to(torch.bfloat16).float()
            changed = predicted != w_base
            n_changed = int(changed.sum())
            agreement[convention] = {
                "weights_changed": n_changed,
                "agree_on_changed": float((w_merged == predicted)[changed].float().mean()) if n_changed else None,
            }
        best = max((v["agree_on_changed"] or 0.0) for v in agreement.values())
        got = w_merged - w_base
        out["merge_probe"] = {
            "tensor": name,
            "weights": w_base.numel(),
            "replayed_merge": agreement,
            "agree_on_changed": best,
            "cosine_with_delta": float(torch.nn.functional.cosine_similarity(got.flatten(), delta.flatten(), dim=0)),
            "delta_norm": float(delta.norm()),
        }
        enough = min(v["weights_changed"] for v in agreement.values()) >= 100
        out["merge_ok"] = status.valid and not empty and enough and best >= 0.98
    else:
        out["merge_ok"] = False
    shutil.rmtree(merged_dir, ignore_errors=True)
    save()

    import pyarrow.parquet as pq

    t0 = time.monotonic()
    source = resolve_model_source(None, str(ckpt))  # the generate stage's adapter checks
    card = json.loads((Path(dataset_dir) / "data_card.json").read_text(encoding="utf-8"))
    note = str(pq.read_table(Path(dataset_dir) / "test.parquet", columns=["note"]).column("note")[0])
    engine = load_engine(
        source, EngineSettings(batch_token_budget=8192, max_batch_size=1), precision="auto", load_in_4bit=False,
        merge_adapter=True, attn_implementation="auto", device="cpu",
    )  # fmt: skip
    prompt = encode_chats(engine.tokenizer, [prompt_messages(note[:400], card.get("instruction", ""))])[0]
    result = engine.generate_all([GenerationRequest(key="probe", prompt_ids=tuple(prompt), max_new_tokens=4)])[0]
    engine.close()
    out["generate_load_seconds"] = round(time.monotonic() - t0, 1)
    out["generate_probe"] = {"prompt_tokens": result.prompt_tokens, "new_tokens": result.new_tokens}
    out["generate_load_ok"] = result.new_tokens > 0
    save()
    return 0


# ---------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_adapter_check":
        return adapter_check(*argv[1:5])
    # SIGTERM (e.g. the machine's time limit) unwinds through run_launch, which kills the job it is running.
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    bench = Bench(parse_args(argv), list(argv))
    try:
        return bench.run()
    finally:
        bench.kill_background()


if __name__ == "__main__":
    sys.exit(main())
