"""Preemption on a GPU: SIGTERM -> committed checkpoint latency, checkpoint size and save time, resume drift.

Launch on the GPU machine, from the repository root (about 4-5 minutes on one H100; needs ~10 GB of disk)::

    python benchmarks/preemption_gpu.py [--work_dir /tmp/preemption_gpu] [--output_dir $OUT]

What it does, through the real code path (``scripts/prepare_data.py``, ``scripts/sft_qlora.py`` with
``recipes/medgemma-4b/sft_qlora.yaml``: NF4 base, bf16 compute, LoRA r=32 on every projection, gradient
checkpointing, the recipe's micro-batch of 4 x 2048-token budget; gradient accumulation 2 instead of the recipe's 8
to stay near 5 minutes — ``--gradient_accumulation_steps 0`` keeps the recipe's; a preemption between micro-batches
does not wait for the optimizer step, so the SIGTERM latency does not depend on it):

1. writes a random-initialised model of the exact Gemma-3-4B text architecture (hidden 2560, intermediate 10240,
   34 layers, 8 heads / 4 KV heads, head_dim 256, vocab 262,208, sliding window 1024 with 5 local : 1 global) with
   :func:`_common.build_random_gemma3_4b` — the FLOPs and bytes of MedGemma's language model
   without its weights — and synthetic notes prepared with its tokenizer;
2. trains ``--max_steps`` steps uninterrupted (the reference losses), then once more in a fresh process (how far
   two uninterrupted runs drift apart on this GPU: the noise floor a resume is judged against);
3. trains the same command in a second directory and sends SIGTERM to its process group (as a spot VM / SLURM
   / torchrun would) once step ``--signal_at_step`` is logged; measures the time until the checkpoint directory
   is committed (goal < 25 s: torchrun SIGKILLs 30 s after SIGTERM) and until the process exits (code 143), and
   reads the checkpoint's size and write/commit times from its manifest;
4. reruns the command (it resumes from that checkpoint) and compares its per-step losses with the reference
   (goal: within 1e-4 relative; the steps before the signal measure run-to-run noise on the same GPU).

``--deterministic`` trains with ``torch.use_deterministic_algorithms(True, warn_only=True)`` (through a
``sitecustomize`` in the work dir) and lists the ops torch reports as nondeterministic — to attribute a drift to
GPU kernels rather than to the resume. First H200 run (gradient accumulation 8, before the noise-floor run existed):
SIGTERM -> commit 5.5 s (mid-step stop), 716 MB checkpoint in 2.9 s, exit 143, resumed losses within 6.9e-5
relative, steps before the signal bit-identical run to run (benchmarks/results/preemption_gpu_h200.json).

The training runs ``python scripts/sft_qlora.py`` directly (one process, one GPU): the single-process launcher
of ``accelerate launch`` does not forward SIGTERM to its child nor report its exit code; the code path inside
the process is the same. Results: ``<output_dir>/preemption_gpu.json`` (device, versions, date, every number
above; a failure is recorded with the tail of the failing command's log). ``--tiny`` runs this harness on the CPU
with the tiny model and the demo recipe (to check the harness itself; its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402  (benchmarks/ is not a package)

SIGTERM_BUDGET_S = 25.0
REL_TOLERANCE = 1e-4


# Written into the work dir and put first on PYTHONPATH of the training runs with --deterministic: Python imports
# `sitecustomize` at start-up, so every training process runs with deterministic kernels where torch has them and
# logs a warning naming each op that has none (warn_only) — which tells where a remaining difference comes from.
SITECUSTOMIZE = """\
import os
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
import torch
torch.use_deterministic_algorithms(True, warn_only=True)
"""
DETERMINISM_DIR: Path | None = None


def _env(training: bool = False) -> dict[str, str]:
    env = _common.subprocess_env()
    if training and DETERMINISM_DIR is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(DETERMINISM_DIR), env["PYTHONPATH"]])
        env["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    return env


def _tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")[-chars:]
    except OSError:
        return ""


class StepFailed(RuntimeError):
    def __init__(self, what: str, log: Path, rc: int | None) -> None:
        super().__init__(f"{what} failed (exit code {rc}); log: {log}")
        self.what, self.log, self.rc = what, log, rc


def _run(cmd: list[str], log: Path, what: str, timeout: float, training: bool = True) -> float:
    t0 = time.perf_counter()
    with open(log, "w", encoding="utf-8") as fh:
        proc = subprocess.run(
            cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=_env(training), timeout=timeout
        )
    if proc.returncode != 0:
        raise StepFailed(what, log, proc.returncode)
    return time.perf_counter() - t0


def _losses(run_dir: Path) -> dict[int, float]:
    from dischargesum.training.metrics import train_loss_by_step

    return train_loss_by_step(run_dir)


def _wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"training exited (code {proc.returncode}) before step {step} was logged")
        if any(s >= step for s in _losses(run_dir)):
            return time.monotonic()
        time.sleep(0.05)
    raise TimeoutError(f"step {step} not logged within {timeout:.0f} s")


def _wait_for_commit(run_dir: Path, after_step: int, proc: subprocess.Popen, timeout: float) -> tuple[float, Path]:
    from dischargesum.training.checkpoint_store import list_checkpoint_dirs, validate_checkpoint

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for step, path in list_checkpoint_dirs(run_dir):
            if step >= after_step and validate_checkpoint(path, verify_checksums=False).valid:
                return time.monotonic(), path
        if proc.poll() is not None:
            # exited: one last look (the commit may have landed between the checks)
            for step, path in list_checkpoint_dirs(run_dir):
                if step >= after_step and validate_checkpoint(path, verify_checksums=False).valid:
                    return time.monotonic(), path
            raise RuntimeError(f"training exited (code {proc.returncode}) without committing a checkpoint")
        time.sleep(0.02)
    raise TimeoutError(f"no checkpoint committed within {timeout:.0f} s of SIGTERM")


def _versions() -> dict[str, str | None]:
    from dischargesum.manifest import library_versions

    return library_versions(("torch", "transformers", "trl", "peft", "accelerate", "bitsandbytes", "dischargesum"))


def _device() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
    return f"cpu ({platform.processor() or platform.machine()})"


def _rel_diffs(reference: dict[int, float], other: dict[int, float], steps: list[int]) -> dict[int, float]:
    return {s: abs(other[s] - reference[s]) / max(abs(reference[s]), 1e-12) for s in steps if s in other}


def benchmark(args: argparse.Namespace, result: dict[str, Any]) -> None:
    work = Path(args.work_dir)
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    model_dir, data_dir = work / "model", work / "data"
    py = sys.executable

    # 1. model + data -----------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    if not (model_dir / "config.json").is_file():
        if args.tiny:
            from dischargesum.tiny_models import build_tiny_gemma3

            build_tiny_gemma3(model_dir, seed=0)
        else:
            _common.build_random_gemma3_4b(model_dir, seed=0)
    result["timings_s"]["build_model"] = round(time.perf_counter() - t0, 1)
    if not (data_dir / "manifest.json").is_file():
        shutil.rmtree(data_dir, ignore_errors=True)
        flags = {
            "--output_dir": str(data_dir),
            "--source": "synthetic",
            "--synthetic_rows": str(args.rows),
            "--synthetic_profile": "tiny" if args.tiny else "kaggle",
            "--tokenizer_name_or_path": str(model_dir),
            "--max_seq_length": str(args.max_seq_length),
            "--validation_fraction": "0.1",
            "--test_fraction": "0.1",
        }
        cmd = [py, "scripts/prepare_data.py", *(x for kv in flags.items() for x in kv)]
        seconds = _run(cmd, logs / "prepare_data.log", "prepare_data", args.timeout, training=False)
        result["timings_s"]["prepare_data"] = round(seconds, 1)

    def train_cmd(out: Path) -> list[str]:
        flags = {
            "--config": args.recipe,
            "--model_name_or_path": str(model_dir),
            "--dataset_dir": str(data_dir),
            "--output_dir": str(out),
            "--max_steps": str(args.max_steps),
            "--save_steps": "100000",  # the only checkpoint is the one SIGTERM asks for
            "--logging_steps": "1",
            "--eval_steps": "0",
            "--resume_from_checkpoint": "auto",
            "--seed": "0",
        }
        cmd = [py, "scripts/sft_qlora.py", *(x for kv in flags.items() for x in kv)]
        if args.gradient_accumulation_steps:
            cmd += ["--gradient_accumulation_steps", str(args.gradient_accumulation_steps)]
        return cmd + list(args.extra)

    result["commands"] = {"train": " ".join(train_cmd(work / "<run>"))}

    # 2. uninterrupted reference ------------------------------------------------------------------------------
    ref_dir = work / "uninterrupted"
    shutil.rmtree(ref_dir, ignore_errors=True)
    result["timings_s"]["uninterrupted_run"] = round(
        _run(train_cmd(ref_dir), logs / "uninterrupted.log", "uninterrupted run", args.timeout), 1
    )
    reference = _losses(ref_dir)
    result["losses_uninterrupted"] = {str(k): v for k, v in sorted(reference.items())}
    repeat: dict[int, float] = {}
    if args.noise_floor:
        # The same command again in a fresh process: how far two uninterrupted runs drift apart on this GPU. A
        # resume that differs by no more than this adds nothing of its own.
        rep_dir = work / "uninterrupted_repeat"
        shutil.rmtree(rep_dir, ignore_errors=True)
        result["timings_s"]["uninterrupted_repeat_run"] = round(
            _run(train_cmd(rep_dir), logs / "uninterrupted_repeat.log", "repeated uninterrupted run", args.timeout), 1
        )
        repeat = _losses(rep_dir)
        result["losses_uninterrupted_repeat"] = {str(k): v for k, v in sorted(repeat.items())}

    # 3. SIGTERM mid-run -----------------------------------------------------------------------------------------
    run_dir = work / "preempted"
    shutil.rmtree(run_dir, ignore_errors=True)
    log = logs / "preempted.log"
    with open(log, "w", encoding="utf-8") as fh:
        proc = subprocess.Popen(
            train_cmd(run_dir),
            stdout=fh,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
            env=_env(training=True),
            start_new_session=True,
        )
        try:
            t_step = _wait_for_step(run_dir, args.signal_at_step, proc, args.timeout)
            t_signal = time.monotonic()
            os.killpg(proc.pid, signal.SIGTERM)
            t_commit, ckpt = _wait_for_commit(run_dir, args.signal_at_step, proc, 120.0)
            rc = proc.wait(timeout=120)
            t_exit = time.monotonic()
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    manifest = json.loads((ckpt / "checkpoint_manifest.json").read_text(encoding="utf-8"))
    # "committed <dir> (<MB> MB in <s> s)": the whole save (write + fsync + hashes + manifest + rename), logged by
    # the training process.
    saved = re.findall(r"committed \S*checkpoint-(\d+) \(([\d.]+) MB in ([\d.]+) s\)", _tail(log, 200000))
    mid_step = re.search(r"agreed across ranks at step (\d+), (during step \d+|at step end)", _tail(log, 200000))
    result["preemption"] = {
        "signal_sent_after_step_logged_s": round(t_signal - t_step, 3),
        "sigterm_to_commit_s": round(t_commit - t_signal, 2),
        "sigterm_to_exit_s": round(t_exit - t_signal, 2),
        "exit_code": rc,
        "checkpoint": ckpt.name,
        "checkpoint_step": manifest["step"],
        "checkpoint_bytes": manifest["total_bytes"],
        "checkpoint_mb": round(manifest["total_bytes"] / 1e6, 1),
        "checkpoint_write_s": manifest.get("write_seconds"),
        "checkpoint_save_total_s": float(saved[-1][2]) if saved else None,
        "stopped": mid_step.group(2) if mid_step else None,
        "checkpoint_files": {e["path"]: e["bytes"] for e in manifest["files"]},
        "log_lines": [ln for ln in _tail(log, 20000).splitlines() if "preempt" in ln or "committed" in ln][-6:],
    }
    interrupted = _losses(run_dir)

    # 4. resume ----------------------------------------------------------------------------------------------
    result["timings_s"]["resumed_run"] = round(
        _run(train_cmd(run_dir), logs / "resumed.log", "resume", args.timeout), 1
    )
    resumed = _losses(run_dir)
    resume_step = int(manifest["step"])
    before = [s for s in sorted(reference) if s <= resume_step]
    after = [s for s in sorted(reference) if s > resume_step]
    rel_before = _rel_diffs(reference, interrupted, before)
    rel_after = _rel_diffs(reference, resumed, after)
    result["losses_interrupted_then_resumed"] = {str(k): v for k, v in sorted(resumed.items())}
    result["resume"] = {
        "resumed_from_step": resume_step,
        "steps_compared_after_resume": after,
        "max_rel_diff_after_resume": max(rel_after.values()) if rel_after else None,
        "rel_diff_after_resume": {str(k): v for k, v in rel_after.items()},
        "max_rel_diff_before_signal_run_to_run": max(rel_before.values()) if rel_before else None,
        "bit_identical_after_resume": all(resumed.get(s) == reference[s] for s in after),
        "final_step_reached": max(resumed) if resumed else None,
    }
    if repeat:
        noise = _rel_diffs(reference, repeat, sorted(reference))
        noise_after = [noise[s] for s in after if s in noise]
        result["run_to_run"] = {
            "rel_diff_two_uninterrupted_runs": {str(k): v for k, v in noise.items()},
            "max_rel_diff_same_steps_as_resume": max(noise_after) if noise_after else None,
            "bit_identical": all(repeat.get(s) == reference[s] for s in reference),
        }
    if DETERMINISM_DIR is not None:
        texts = "\n".join(_tail(p, 400000) for p in sorted(logs.glob("*.log")) if p.name != "prepare_data.log")
        found = re.findall(r"UserWarning: (\S[^\n]*?) does not have a deterministic implementation", texts)
        result["nondeterministic_ops_reported"] = sorted(set(found))
    result["goals"] = {
        f"sigterm_to_commit_under_{SIGTERM_BUDGET_S:g}s": result["preemption"]["sigterm_to_commit_s"]
        < SIGTERM_BUDGET_S,
        "exit_code_143": rc == 143,
        f"resume_losses_within_{REL_TOLERANCE:g}_relative": bool(after)
        and all(v <= REL_TOLERANCE for v in rel_after.values())
        and len(rel_after) == len(after),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work_dir", default=None, help="scratch directory (default: $TMPDIR/preemption_gpu)")
    parser.add_argument(
        "--output_dir", default=os.environ.get("OUT") or str(REPO_ROOT / "benchmarks" / "results"),
        help="where preemption_gpu.json goes (default: $OUT, else benchmarks/results)",
    )  # fmt: skip
    parser.add_argument("--recipe", default="recipes/medgemma-4b/sft_qlora.yaml")
    parser.add_argument("--max_steps", type=int, default=4)
    parser.add_argument("--signal_at_step", type=int, default=2)
    parser.add_argument(
        "--gradient_accumulation_steps", type=int, default=2,
        help="0: the recipe's (8: ~60k tokens per step, ~3x the run time). A preemption between micro-batches does "
        "not wait for the step to end, so the SIGTERM latency does not depend on it.",
    )  # fmt: skip
    parser.add_argument("--rows", type=int, default=96, help="synthetic rows for prepare_data")
    parser.add_argument("--max_seq_length", type=int, default=2048)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds allowed per command")
    parser.add_argument(
        "--no_noise_floor", dest="noise_floor", action="store_false",
        help="skip the second uninterrupted run (it measures how far two fresh runs drift apart on this GPU)",
    )  # fmt: skip
    parser.add_argument(
        "--deterministic", action="store_true",
        help="train with torch.use_deterministic_algorithms(True, warn_only=True) and CUBLAS_WORKSPACE_CONFIG, and "
        "record which ops have no deterministic implementation (writes preemption_gpu_deterministic.json)",
    )  # fmt: skip
    parser.add_argument("--tiny", action="store_true", help="CPU dry run of the harness (tiny model, demo recipe)")
    parser.add_argument("extra", nargs="*", help="extra `--field value` overrides for sft_qlora (after --)")
    args = parser.parse_args(argv)
    if args.tiny:
        if args.recipe == "recipes/medgemma-4b/sft_qlora.yaml":
            args.recipe = "recipes/demo/sft_qlora.yaml"
        args.max_seq_length = min(args.max_seq_length, 384)
        args.extra = [*args.extra, "--max_seq_length", "none"]
    if args.work_dir is None:
        args.work_dir = str(
            Path(os.environ.get("TMPDIR", "/tmp")) / ("preemption_tiny" if args.tiny else "preemption_gpu")
        )
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = "preemption_tiny_cpu" if args.tiny else "preemption_gpu"
    out_file = out_dir / f"{name}{'_deterministic' if args.deterministic else ''}.json"
    if args.deterministic:
        global DETERMINISM_DIR
        DETERMINISM_DIR = Path(args.work_dir) / "determinism"
        DETERMINISM_DIR.mkdir(parents=True, exist_ok=True)
        (DETERMINISM_DIR / "sitecustomize.py").write_text(SITECUSTOMIZE, encoding="utf-8")

    result: dict[str, Any] = {
        "benchmark": "preemption_gpu",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "device": _device(),
        "versions": _versions(),
        "model": "tiny Gemma-3 (harness dry run)" if args.tiny else "random-init Gemma-3-4B text architecture",
        "settings": {k: v for k, v in vars(args).items() if k != "extra"} | {"extra": args.extra},
        "goals_defined": {
            "sigterm_to_commit_s": f"< {SIGTERM_BUDGET_S}",
            "resume_rel_loss_diff": f"<= {REL_TOLERANCE}",
        },
        "timings_s": {},
    }
    t0 = time.perf_counter()
    status = 0
    try:
        benchmark(args, result)
    except StepFailed as exc:
        result["error"] = str(exc)
        result["error_log_tail"] = _tail(exc.log)
        status = 1
    except Exception as exc:  # record any failure with context, then still write the JSON
        result["error"] = f"{type(exc).__name__}: {exc}"
        logs = Path(args.work_dir) / "logs"
        result["error_log_tails"] = (
            {p.name: _tail(p, 3000) for p in sorted(logs.glob("*.log"))} if logs.is_dir() else {}
        )
        status = 1
    result["timings_s"]["total"] = round(time.perf_counter() - t0, 1)
    out_file.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    keys = ("device", "preemption", "resume", "run_to_run", "nondeterministic_ops_reported", "goals", "error")
    print(json.dumps({k: result[k] for k in keys if k in result}, indent=2))
    print(f"wrote {out_file}")
    return status


if __name__ == "__main__":
    sys.exit(main())
