"""Where the time of a QLoRA training step goes: torch.profiler over steady-state optimizer steps of sft_qlora's
real trainer on the random-initialised Gemma-3-4B text model -> top CUDA kernels and time by category.

On the GPU machine, from the repository root (reuses train_throughput's model and data when run after it with the
same --work_dir; about 2-3 minutes for the default recipe and the seed configuration on one H100)::

    python benchmarks/profile_train_step.py --out $OUT [--configs recipe,seed] [--data_profile kaggle]

``--configs`` takes any row name of benchmarks/train_throughput.py (``recipe``, ``seed``, ``recipe_8gb``,
``seed+liger``, ...); with ``--gpus 0,1`` they run side by side. CPU check of the harness (tiny model, CPU op
times instead of kernels; exercised by tests/integration)::

    python benchmarks/profile_train_step.py --smoke --out /tmp/pts_smoke

Each config runs in its own subprocess through ``dischargesum.training.sft.build_trainer`` (as train_throughput
does); after ``--warmup_steps`` optimizer steps, ``torch.profiler`` (CPU + CUDA activity, input shapes) records
``--steps`` steps. Reported (``_common.summarize_profile``):

* ``by_category_kernel_names``: kernel time by kernel-name pattern — attention (flash/fmha/efficient/flex/cudnn),
  NF4 dequant / 4-bit matmul (bitsandbytes), LM head + loss (TRL's chunked log-prob kernels), optimizer (foreach /
  fused Adam), copies/casts, matmul (cuBLAS/CUTLASS GEMMs: base and LoRA together), norm/activation/elementwise
  (incl. Liger's Triton kernels), other;
* ``by_category_ops``: the same time attributed through the CPU op that launched each kernel, which separates LoRA
  matmuls (a GEMM with a dimension equal to the LoRA rank) from the base matmuls on dequantized weights and the LM
  head (a dimension >= 100k); Triton kernels launched from Python (Liger, TRL's head) have no aten op and are
  grouped as such;
* ``top_kernels`` / ``top_ops`` (with input shapes) and ``gpu_busy_fraction`` = kernel time / wall time of the
  profiled steps (the rest is the GPU waiting for the host: Python overhead, syncs such as ``.item()``; the
  profiler's own CPU overhead makes this a lower bound).

Results: ``<out>/profile_train_step.json`` and ``<out>/profile_train_step.txt`` (the tables, also printed last).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common
import train_throughput as tt

RESULT_NAME = "profile_train_step.json"
TABLE_NAME = "profile_train_step.txt"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(tt.REPO_ROOT / "benchmarks" / "results"))
    p.add_argument("--work_dir", default=None, help="shared with train_throughput (default /tmp/dischargesum_bench)")
    p.add_argument("--configs", default="recipe,seed", help="train_throughput row names, comma-separated")
    p.add_argument("--data_profile", default="kaggle", choices=("kaggle", "physionet"))
    p.add_argument("--gpus", default=None, help="comma-separated GPU indices: configs run side by side")
    p.add_argument("--warmup_steps", type=int, default=2)
    p.add_argument("--steps", type=int, default=2, help="optimizer steps recorded by the profiler")
    p.add_argument("--rows", type=int, default=256, help="synthetic rows (same as train_throughput to reuse data)")
    p.add_argument("--recipe", default=str(tt.DEFAULT_RECIPE))
    p.add_argument("--timeout_s", type=float, default=420.0, help="per config")
    p.add_argument("--trace", action="store_true", help="also write a Chrome trace per config into the work dir")
    p.add_argument("--smoke", action="store_true", help="CPU harness check on the tiny model")
    p.add_argument("--model_dir", default=None, help="smoke only: an existing tiny model directory")
    args = p.parse_args(argv)
    if args.smoke:
        args.warmup_steps, args.steps, args.rows = 1, 1, min(args.rows, 16)
    return args


def _tt_args(args: argparse.Namespace) -> argparse.Namespace:
    """The fields train_throughput's helpers read, for the profiled configs."""
    return argparse.Namespace(
        smoke=args.smoke,
        model_dir=args.model_dir,
        rows=args.rows,
        recipe=args.recipe,
        warmup_steps=args.warmup_steps,
        measure_steps=args.steps,
        check_examples=0,
        unsloth=False,
        unsloth_lora_r=32,
        unsloth_lora_alpha=64,
        unsloth_batch=8,
        unsloth_grad_accum=1,
    )


def format_tables(results: list[dict[str, Any]]) -> str:
    parts = []
    for r in results:
        head = f"== {r['name']} / {r['profile']}: {r.get('status')}"
        prof = r.get("profile_summary")
        if not prof:
            parts.append(f"{head} ({r.get('error') or r.get('reason') or 'no profile'})")
            continue
        head += (
            f" | {prof['profiled_steps']} steps, wall {prof['wall_ms']:.0f} ms, kernels {prof['kernel_ms']:.0f} ms "
            f"({prof['time_basis']}), GPU busy {100 * prof['gpu_busy_fraction']:.0f}%"
        )
        if r.get("tokens_per_s"):
            head += f" | {r['tokens_per_s']:.0f} tok/s while profiled"
        parts.append(head)
        parts.append("by op category (kernels attributed through the op that launched them):")
        parts.append(
            _common.format_table(prof["by_category_ops"], (("category", "category"), ("ms", "ms"), ("share", "share")))
        )
        parts.append("by kernel-name category:")
        parts.append(
            _common.format_table(
                prof["by_category_kernel_names"], (("category", "category"), ("ms", "ms"), ("share", "share"))
            )
        )
        parts.append("top kernels:")
        parts.append(
            _common.format_table(
                prof["top_kernels"][:15],
                (("kernel", "kernel"), ("category", "category"), ("ms", "ms"), ("share", "share")),
            )
        )
        parts.append("top ops (self device time):")
        parts.append(
            _common.format_table(
                prof["top_ops"][:15],
                (("op", "op"), ("input_shapes", "input shapes"), ("ms", "ms"), ("share", "share")),
            )
        )
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.monotonic()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(args.work_dir or ("/tmp/dischargesum_bench_smoke" if args.smoke else "/tmp/dischargesum_bench"))
    cuda = False if args.smoke else tt.visible_gpus() > 0
    slots: list[str | None] = [s.strip() for s in args.gpus.split(",")] if args.gpus else (["0"] if cuda else [None])
    profile = "tiny" if args.smoke else args.data_profile
    targs = _tt_args(args)
    by_name = {v.name: v for v in tt.VARIANTS}
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in by_name or by_name[n].base == "unsloth"]
    if unknown:
        print(f"unknown --configs {unknown}; choose from {[v.name for v in tt.VARIANTS if v.base != 'unsloth']}")
        return 2
    print(f"[profile_train_step] preparing model and data in {work} ...", flush=True)
    # both GPU profiles, like train_throughput: a later run in the same work dir (e.g. --unsloth) reuses them
    wanted = [profile] if args.smoke else sorted({profile, "kaggle", "physionet"})
    prep, prep_log = tt.run_prepare(targs, work, wanted, slots[0], time.monotonic() + 3600)
    payload: dict[str, Any] = {
        "benchmark": "profile_train_step",
        **_common.environment_facts(gpus=(prep or {}).get("gpus")),
    }
    payload["settings"] = {
        "configs": names,
        "data_profile": profile,
        "warmup_steps": args.warmup_steps,
        "steps": args.steps,
        "smoke": args.smoke,
    }
    if prep is None:
        payload["error"] = "prepare failed: " + prep_log[-3000:]
        _common.write_json(out_dir / RESULT_NAME, payload)
        print(prep_log)
        return 1
    jobs, results = [], []
    for name in names:
        v = by_name[name]
        row: dict[str, Any] = {"name": name, "profile": profile}
        results.append(row)
        if v.needs_cuda and not cuda:
            row.update(status="skipped", reason="needs a CUDA GPU")
            continue
        spec = tt.variant_spec(v, profile, targs, prep, work, cuda)
        key = Path(spec["result_path"]).stem
        spec["result_path"] = str(work / "profile_results" / f"{key}.json")
        spec["overrides"]["output_dir"] = str(work / "profile_runs" / key)
        spec["check_examples"] = 0
        spec["profiler"] = {
            "start_after_step": args.warmup_steps,
            "steps": args.steps,
            "trace_path": str(work / "profile_traces" / f"{key}.json") if args.trace else None,
        }
        if args.trace:
            (work / "profile_traces").mkdir(parents=True, exist_ok=True)
        Path(spec["result_path"]).unlink(missing_ok=True)
        spec_path = work / "specs" / f"profile_{key}.json"
        _common.write_json(spec_path, spec)
        job = _common.Job(
            key,
            [sys.executable, str(Path(tt.__file__).resolve()), "--_worker", str(spec_path)],
            timeout_s=args.timeout_s,
            log_path=work / "logs" / f"profile_{key}.log",
        )
        jobs.append((job, row, Path(spec["result_path"])))
    _common.run_jobs([j for j, _r, _p in jobs], slots)
    for job, row, path in jobs:
        result = _common._read_json(path)
        if result is None:
            row.update(status="timeout" if job.timed_out else "failed", log_tail=_common.tail(job.log_path, 4000))
            continue
        row.update(status=result.get("status"), error=result.get("error"))
        row["profile_summary"] = result.get("profile")
        row["tokens_per_s"] = result.get("tokens_per_s")
        row["peak_allocated_gib"] = result.get("peak_allocated_gib")
        row["attn_implementation"] = (result.get("facts") or {}).get("attn_implementation")
        row["config"] = result.get("config")
        if result.get("status") != "ok":
            row["log_tail"] = _common.tail(job.log_path, 4000)
    payload["results"] = results
    payload["wall_seconds"] = round(time.monotonic() - began, 1)
    _common.write_json(out_dir / RESULT_NAME, payload)
    text = format_tables(results)
    (out_dir / TABLE_NAME).write_text(text + "\n", encoding="utf-8")
    print(f"[profile_train_step] wrote {out_dir / RESULT_NAME} and {out_dir / TABLE_NAME}")
    for row in results:
        if row.get("log_tail") and row.get("status") != "ok":
            print(f"--- {row['name']} log tail ---\n{row['log_tail'][-1500:]}")
    print(text)
    return 0 if any(r.get("status") == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
