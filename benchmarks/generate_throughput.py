"""Generation throughput: the seed prototype's way vs our inference engine, on the same prompts and the same model.

    python benchmarks/generate_throughput.py --out benchmarks/results            # GPU (H100/H200), < 8 minutes
    python benchmarks/generate_throughput.py --smoke --out /tmp/gen-smoke       # CPU, tiny model, seconds

Model: a random-initialised Gemma-3-4B text model (hidden 2560, 34 layers, 8/4 heads, head_dim 256, vocab 262,208,
sliding window 1024 with 5 local : 1 global) — the FLOPs and bytes of MedGemma's language model — with a random
LoRA adapter (r 16 on all 7 projections, B != 0). Prompts: synthetic Kaggle-profile notes rendered with the
training chat template and tokenized with the benchmarks' length-calibrated tokenizer (``benchmarks/_common.py``:
≈ 1,000 tokens per example, ≈ 750 per prompt, like Gemma's tokenizer on the Kaggle data). Random weights never
emit an end-of-turn token at a realistic point, so every variant generates exactly ``--max_new_tokens`` tokens per
note (``min_new_tokens = max_new_tokens``): tokens/s compares like with like.

Variants (``--variants``; the defaults run in this order, and the run stops starting new variants after
``--time_budget_s``):

* ``seed`` — what the seed did: NF4 4-bit base (bitsandbytes, double quant, bf16 compute) with the LoRA adapter
  unmerged, one note at a time, ``model.generate(do_sample=True)`` with transformers' default sampling (top-k 50).
  Slow (~6.6 new tokens/s on an H100), so only ``--seed_notes`` notes are timed.
* ``engine_greedy`` — :class:`dischargesum.inference.InferenceEngine` as ``recipes/medgemma-4b/generate.yaml``
  runs it: adapter merged into bf16 weights, notes sorted by length and batched under ``--batch_token_budget`` /
  ``--max_batch_size``, left padding, greedy.
* ``engine_greedy_b2x`` — ``engine_greedy`` with twice the batch size and budget (does a bigger batch pay?).
* ``engine_sample`` — the same with per-note seeded sampling (top-k 50, temperature 1: the seed's sampling).
* ``engine_static_compile`` — static KV cache reused across batches + ``torch.compile`` (mode reduce-overhead:
  CUDA graphs) of the decoding step; the compilation is timed separately (``warmup_seconds``).
* ``engine_static`` — static cache without compilation (isolates the cache's effect).
* ``engine_static_compile_b2x`` / ``engine_static_compile_sample`` — the compiled engine with twice the batch size
  and budget / with per-note seeded sampling (the sampler runs outside the compiled step).
* ``engine_static_compile_sdpa`` — the compiled engine on transformers' own ``sdpa`` instead of our decoding attention
  (``sdpa_gqa_fold``, dischargesum/attention.py, which every other engine row uses): the KV copy's cost.
* ``engine_static_compile_matmul`` — our decoding attention with its ``matmul`` kernel (two batched matmuls) instead
  of PyTorch's SDPA choice (cuDNN on H100).

Every engine row also reports ``ms_per_decode_step`` (wall time over decoding steps, prefill included). With
``--profile``, each engine variant additionally runs ``--profile_tokens`` decoding steps of its first batch under
``torch.profiler`` after its timed run: ``profile.gpu_busy_fraction`` (kernel time / wall time — the rest is the GPU
waiting for the host) and the top kernels and ops say where a decoding step's time goes.

Writes ``generate_throughput_<device>.json`` into ``--out`` (device, date, versions, command, per-variant new
tokens/s, summaries/s, peak memory, and ``speedup`` = best engine variant's new tokens/s over the seed's) and prints
a short table last.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _common

GOAL_TOKENS_PER_SECOND = 3300  # issue 8: >= 500x the seed's ~6.6 new tokens/s on one GPU
# Most informative first: a run stopped by --time_budget_s keeps the rows that matter.
DEFAULT_VARIANTS = (
    "engine_static_compile",
    "seed",
    "engine_static_compile_b2x",
    "engine_static_compile_sdpa",
    "engine_static_compile_matmul",
    "engine_greedy",
    "engine_static_compile_sample",
    "engine_static",
    "engine_sample",
    "engine_greedy_b2x",
)
SMOKE_VARIANTS = ("seed", "engine_greedy", "engine_sample", "engine_static")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU smoke run with the tiny model (tests use it).")
    p.add_argument("--out", default="benchmarks/results", help="Directory for the result JSON.")
    p.add_argument("--work_dir", default="/tmp/dischargesum-bench", help="Cache for the model, tokenizer and data.")
    p.add_argument("--variants", default=None, help=f"Comma-separated subset of {','.join(DEFAULT_VARIANTS)}.")
    p.add_argument("--notes", type=int, default=None, help="Notes per engine variant (default 256; smoke 6).")
    p.add_argument("--seed_notes", type=int, default=None, help="Notes timed the seed's way (default 1; smoke 2).")
    p.add_argument("--max_new_tokens", type=int, default=None, help="New tokens per note (default 512; smoke 8).")
    p.add_argument("--batch_token_budget", type=int, default=None, help="Engine budget (default 196608; smoke 4096).")
    p.add_argument("--max_batch_size", type=int, default=None, help="Engine batch cap (default 128; smoke 4).")
    p.add_argument("--time_budget_s", type=float, default=380.0, help="Start no new variant after this many seconds.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true", help="Profile a few decoding steps of each engine variant.")
    p.add_argument("--profile_tokens", type=int, default=16, help="Decoding steps profiled per engine variant.")
    args = p.parse_args(argv)
    smoke = args.smoke
    defaults = {
        "notes": 6 if smoke else 256,
        "seed_notes": 2 if smoke else 1,
        "max_new_tokens": 8 if smoke else 512,
        "batch_token_budget": 4096 if smoke else 196_608,
        "max_batch_size": 4 if smoke else 128,
    }
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    chosen = args.variants.split(",") if args.variants else list(SMOKE_VARIANTS if smoke else DEFAULT_VARIANTS)
    unknown = sorted(set(chosen) - set(DEFAULT_VARIANTS))
    if unknown:
        p.error(f"unknown variant(s) {unknown}; choose from {', '.join(DEFAULT_VARIANTS)}")
    args.variants = chosen
    return args


# ---------------------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------------------


def build_inputs(args: argparse.Namespace) -> dict[str, Any]:
    """Model (+ random LoRA adapter), tokenizer and the prompts' token ids, built once into ``--work_dir``."""
    import pyarrow.parquet as pq

    from dischargesum.data import schema
    from dischargesum.data.formatting import prompt_messages
    from dischargesum.inference import encode_chats
    from dischargesum.modeling import load_tokenizer

    work = Path(args.work_dir) / ("smoke" if args.smoke else "full")
    began = time.perf_counter()
    if args.smoke:
        model_dir = _common.build_model(work, kind="tiny", seed=args.seed)
        tokenizer_dir = model_dir
        profile = "tiny"
    else:
        tokenizer_dir = _common.build_bench_tokenizer(work / "tokenizer")
        model_dir = _common.build_model(work, kind="gemma3-4b", tokenizer_dir=tokenizer_dir, seed=args.seed)
        profile = "kaggle"
    model_seconds = time.perf_counter() - began
    # prepare_data puts ~2% of patients in validation; ask for enough rows that the train split has `notes` notes
    data_dir = _common.build_dataset(
        work, profile=profile, tokenizer_dir=tokenizer_dir, rows=int(args.notes * 1.1) + 8
    )
    card = json.loads((data_dir / schema.DATA_CARD_FILE).read_text(encoding="utf-8"))
    notes = [
        str(x) for x in pq.read_table(data_dir / schema.SPLIT_FILES["train"], columns=["note"])["note"].to_pylist()
    ]
    if len(notes) < args.notes:
        raise SystemExit(f"only {len(notes)} notes were prepared; lower --notes")
    notes = notes[: args.notes]
    tokenizer = load_tokenizer(str(tokenizer_dir), padding_side="left")
    prompts = encode_chats(tokenizer, [prompt_messages(n, str(card["instruction"])) for n in notes])
    adapter_dir = build_adapter(work, model_dir, seed=args.seed)
    lengths = sorted(len(p) for p in prompts)
    return {
        "model_dir": model_dir,
        "adapter_dir": adapter_dir,
        "prompts": prompts,
        "setup_seconds": round(time.perf_counter() - began, 1),
        "model_build_seconds": round(model_seconds, 1),
        "prompt_tokens": {
            "notes": len(lengths),
            "mean": round(sum(lengths) / len(lengths), 1),
            "p50": lengths[len(lengths) // 2],
            "max": lengths[-1],
            "min": lengths[0],
        },
    }


def build_adapter(work: Path, model_dir: Path, *, seed: int) -> Path:
    """A random LoRA adapter (r 16, all 7 projections, B != 0 so merging changes the weights); cached."""
    import torch
    from peft import LoraConfig, get_peft_model

    from dischargesum.modeling import load_base_model

    out = work / "adapter"
    if (out / "adapter_model.safetensors").is_file():
        return out
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = load_base_model(
        str(model_dir), dtype="bfloat16" if device == "cuda" else "float32", device_map={"": device}
    )
    config = LoraConfig(
        r=16, lora_alpha=32, target_modules=LORA_TARGETS, init_lora_weights=False, task_type="CAUSAL_LM"
    )
    model = get_peft_model(base, config)
    with torch.no_grad():  # small B keeps the merged random model's activations in range
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(0.01)
    model.save_pretrained(out)
    del model, base
    release()
    return out


# ---------------------------------------------------------------------------------------------------------------
# Measurement helpers
# ---------------------------------------------------------------------------------------------------------------


def release() -> None:
    from dischargesum.inference import release_memory

    gc.collect()
    release_memory()


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reset_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def result_row(name: str, notes: int, new_tokens: int, seconds: float, **extra: Any) -> dict[str, Any]:
    return {
        "variant": name,
        "notes": notes,
        "new_tokens": new_tokens,
        "seconds": round(seconds, 3),
        "new_tokens_per_s": round(new_tokens / seconds, 2) if seconds > 0 else None,
        "summaries_per_s": round(notes / seconds, 4) if seconds > 0 else None,
        **extra,
    }


# ---------------------------------------------------------------------------------------------------------------
# Variants
# ---------------------------------------------------------------------------------------------------------------


def run_seed(args: argparse.Namespace, inputs: dict[str, Any]) -> dict[str, Any]:
    """The seed's loop: NF4 base + unmerged LoRA, one note at a time, transformers' default sampling."""
    import torch
    from peft import PeftModel

    from dischargesum.modeling import load_base_model

    began = time.perf_counter()
    compute = "bfloat16" if device() == "cuda" else "float32"
    base = load_base_model(str(inputs["model_dir"]), dtype=compute, load_in_4bit=True, device_map={"": device()})
    model = PeftModel.from_pretrained(base, str(inputs["adapter_dir"]))
    model.eval()
    load_seconds = time.perf_counter() - began
    prompts = inputs["prompts"][: args.seed_notes]
    n = args.max_new_tokens
    kwargs = {"do_sample": True, "top_k": 50, "temperature": 1.0, "max_new_tokens": n, "min_new_tokens": n}
    with torch.inference_mode():  # warm-up: CUDA context, bitsandbytes kernels
        model.generate(input_ids=torch.tensor([prompts[0]], device=device()), max_new_tokens=4, do_sample=True)
    sync()
    reset_peak()
    start = time.perf_counter()
    new_tokens = 0
    for ids in prompts:
        with torch.inference_mode():
            out = model.generate(input_ids=torch.tensor([ids], device=device()), **kwargs)
        new_tokens += out.shape[1] - len(ids)
    sync()
    seconds = time.perf_counter() - start
    row = result_row(
        "seed", len(prompts), new_tokens, seconds, load_seconds=round(load_seconds, 1), peak_gib=peak_gib(),
        batch_size=1, weights="nf4 + unmerged LoRA", decoding="sample (top-k 50)",
    )  # fmt: skip
    del model, base
    release()
    return row


ENGINE_VARIANTS: dict[str, dict[str, Any]] = {
    "engine_greedy": {},
    "engine_sample": {"do_sample": True, "top_k": 50, "temperature": 1.0},
    "engine_static": {"cache_implementation": "static"},
    "engine_static_compile": {"cache_implementation": "static", "compile": True},
    "engine_static_compile_b2x": {"cache_implementation": "static", "compile": True, "scale": 2},
    "engine_static_compile_sample": {
        "cache_implementation": "static", "compile": True, "do_sample": True, "top_k": 50, "temperature": 1.0,
    },
    "engine_static_compile_sdpa": {"cache_implementation": "static", "compile": True, "attn": "sdpa"},
    "engine_static_compile_matmul": {"cache_implementation": "static", "compile": True, "decode_kernel": "matmul"},
    "engine_greedy_b2x": {"scale": 2},
}  # fmt: skip


def load_engine_model(inputs: dict[str, Any]) -> tuple[Any, float]:
    """bf16 base with the adapter merged (the generate recipe's default), through the stage's own loader."""
    from dischargesum.inference import EngineSettings, load_engine, resolve_model_source

    began = time.perf_counter()
    source = resolve_model_source(str(inputs["model_dir"]), str(inputs["adapter_dir"]))
    engine = load_engine(
        source, EngineSettings(), precision="auto", load_in_4bit=False, merge_adapter=True,
        attn_implementation="auto", device=device(),
    )  # fmt: skip
    return engine, time.perf_counter() - began


def run_engine_variant(
    name: str, base_engine: Any, args: argparse.Namespace, inputs: dict[str, Any]
) -> dict[str, Any]:
    spec = dict(ENGINE_VARIANTS[name])
    scale = spec.pop("scale", 1)
    attn = spec.pop("attn", None)
    kernel = spec.pop("decode_kernel", None)
    if kernel is not None:  # our decoding attention's other kernel (dischargesum.attention.decode_kernel)
        from dischargesum import attention

        previous_kernel = attention.decode_kernel
        attention.decode_kernel = kernel
        try:
            return run_engine_variant_inner(name, base_engine, args, inputs, spec, scale, None)
        finally:
            attention.decode_kernel = previous_kernel
    if attn is not None:  # the ablation of our decoding attention: transformers' own sdpa (repeat_kv copies)
        previous = base_engine.model.config._attn_implementation
        base_engine.model.set_attn_implementation(attn)
        try:
            return run_engine_variant_inner(name, base_engine, args, inputs, spec, scale, attn)
        finally:
            base_engine.model.set_attn_implementation(previous)
    return run_engine_variant_inner(name, base_engine, args, inputs, spec, scale, None)


def run_engine_variant_inner(
    name: str,
    base_engine: Any,
    args: argparse.Namespace,
    inputs: dict[str, Any],
    spec: dict[str, Any],
    scale: int,
    attn: str | None,
) -> dict[str, Any]:
    from dischargesum.inference import EngineSettings, GenerationRequest, InferenceEngine, note_seed

    settings = EngineSettings(
        batch_token_budget=args.batch_token_budget * scale,
        max_batch_size=args.max_batch_size * scale,
        min_new_tokens=args.max_new_tokens,
        **spec,
    )
    engine = InferenceEngine(base_engine.model, base_engine.tokenizer, settings)
    requests = [
        GenerationRequest(f"n{i}", tuple(p), args.max_new_tokens, seed=note_seed(args.seed, f"n{i}"), index=i)
        for i, p in enumerate(inputs["prompts"])
    ]
    batches = engine.plan(requests)
    # Warm-up on the first planned batch with a few tokens: CUDA kernels, cuBLAS heuristics and — for the
    # compiled variant — the compilation and CUDA-graph capture of the decoding step (same shapes as the run).
    warm = [GenerationRequest(r.key, r.prompt_ids, min(8, args.max_new_tokens), r.seed, r.index) for r in batches[0]]
    began = time.perf_counter()
    engine.run_batch(warm)
    sync()
    warmup_seconds = time.perf_counter() - began
    reset_peak()
    start = time.perf_counter()
    new_tokens = 0
    finish: dict[str, int] = {}
    for _batch, results in engine.generate(requests, batches=batches):
        new_tokens += sum(r.new_tokens for r in results)
        for r in results:
            finish[r.finish_reason] = finish.get(r.finish_reason, 0) + 1
    sync()
    seconds = time.perf_counter() - start
    decode_steps = sum(max(r.max_new_tokens for r in b) for b in batches)
    profile = profile_decoding(engine, batches[0], args) if args.profile else None
    row = result_row(
        name, len(requests), new_tokens, seconds, warmup_seconds=round(warmup_seconds, 1), peak_gib=peak_gib(),
        ms_per_decode_step=round(1e3 * seconds / decode_steps, 2),
        batches=len(batches), batch_size=max(len(b) for b in batches), finish_reasons=finish,
        weights="bf16, LoRA merged", decoding="sample (top-k 50, per-note seed)" if settings.do_sample else "greedy",
        cache=settings.cache_implementation, compile=settings.compile,
        attention=base_engine.model.config._attn_implementation,
        decode_kernel=__import__("dischargesum.attention").attention.decode_kernel,
        batch_token_budget=settings.batch_token_budget, max_batch_size=settings.max_batch_size,
        **({"profile": profile} if profile is not None else {}),
    )  # fmt: skip
    del engine  # its static cache, if any, goes with it
    release()
    return row


def _kernel_ms(prof: Any) -> dict[str, float]:
    """Device time per CUDA kernel name (ms); CPU self time per op without a GPU (smoke runs)."""
    from torch.autograd import DeviceType

    averages = list(prof.key_averages())
    has_cuda = any(getattr(e, "device_type", None) == DeviceType.CUDA for e in averages)
    out: dict[str, float] = {}
    for evt in averages:
        if has_cuda and getattr(evt, "device_type", None) == DeviceType.CUDA and evt.self_device_time_total > 0:
            out[evt.key] = out.get(evt.key, 0.0) + evt.self_device_time_total / 1e3
        elif not has_cuda and evt.self_cpu_time_total > 0:
            out[evt.key] = out.get(evt.key, 0.0) + evt.self_cpu_time_total / 1e3
    return out


def profile_decoding(engine: Any, batch: list[Any], args: argparse.Namespace) -> dict[str, Any]:
    """Where one decoding step's time goes: ``batch`` (same shapes as the timed run, so compiled graphs replay) is
    profiled twice — 1 new token (prefill + 1 step) and 1 + ``--profile_tokens`` — and the difference, divided by
    ``--profile_tokens``, is a decoding step without the prefill: wall ms, kernel ms, GPU busy fraction (kernel / wall;
    the rest is the GPU waiting for the host), and the top kernels."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from dischargesum.inference import GenerationRequest

    cap = max(r.max_new_tokens for r in batch)  # a static cache holds no more
    steps = max(1, min(args.profile_tokens, cap - 1))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    runs = []
    for n in (1, 1 + steps):
        short = [GenerationRequest(r.key, r.prompt_ids, n, r.seed, r.index) for r in batch]
        sync()
        with profile(activities=activities) as prof:
            began = time.perf_counter()
            engine.run_batch(short)
            sync()
            wall = time.perf_counter() - began
        runs.append((wall, _kernel_ms(prof)))
    (wall1, k1), (wall2, k2) = runs
    per_kernel = {name: (k2.get(name, 0.0) - k1.get(name, 0.0)) / steps for name in set(k1) | set(k2)}
    kernel_ms = sum(per_kernel.values())
    wall_ms = 1e3 * (wall2 - wall1) / steps
    by_category: dict[str, float] = {}
    for name, ms in per_kernel.items():
        cat = _common.kernel_category(name)
        by_category[cat] = by_category.get(cat, 0.0) + ms
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:12]
    return {
        "basis": "difference of two profiled runs (1 and 1 + steps new tokens) over steps: decoding only",
        "steps": steps,
        "batch_size": len(batch),
        "wall_ms_per_step": round(wall_ms, 2),
        "kernel_ms_per_step": round(kernel_ms, 2),
        "gpu_busy_fraction": round(kernel_ms / wall_ms, 3) if wall_ms > 0 else None,
        "by_category_ms_per_step": {k: round(v, 3) for k, v in sorted(by_category.items(), key=lambda kv: -kv[1])},
        "top_kernels_ms_per_step": [{"kernel": name[:160], "ms": round(ms, 3)} for name, ms in top],
    }


# ---------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    t0 = time.perf_counter()
    import torch

    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU: run with --smoke on CPU")
    gpus = _common.gpu_facts()
    env = _common.environment_facts(
        [sys.executable, *(sys.argv if argv is None else ["generate_throughput.py", *argv])], gpus
    )
    inputs = build_inputs(args)
    rows: list[dict[str, Any]] = []
    engine = None
    engine_load_seconds = None
    for name in args.variants:
        elapsed = time.perf_counter() - t0
        if elapsed > args.time_budget_s:
            rows.append({"variant": name, "skipped": f"time budget ({elapsed:.0f}s > {args.time_budget_s:.0f}s)"})
            continue
        try:
            if name == "seed":
                rows.append(run_seed(args, inputs))
                continue
            if engine is None:
                engine, engine_load_seconds = load_engine_model(inputs)
            rows.append(run_engine_variant(name, engine, args, inputs))
        except Exception as exc:  # a variant that fails is recorded, the others still run
            rows.append({"variant": name, "error": f"{type(exc).__name__}: {exc}"[:600]})
            release()
        # Write after every variant: a run stopped by an outer time limit keeps what it measured.
        summarise(args, env, inputs, rows, engine_load_seconds, t0, final=False)
    if engine is not None:
        engine.close()
    return summarise(args, env, inputs, rows, engine_load_seconds, t0, final=True)


def summarise(
    args: argparse.Namespace,
    env: dict[str, Any],
    inputs: dict[str, Any],
    rows: list[dict[str, Any]],
    engine_load_seconds: float | None,
    t0: float,
    *,
    final: bool,
) -> dict[str, Any]:
    """Compute speedups, write the result JSON and (when ``final``) print the table."""
    seed_rate = next((r.get("new_tokens_per_s") for r in rows if r["variant"] == "seed"), None)
    engine_rows = [r for r in rows if r["variant"].startswith("engine") and r.get("new_tokens_per_s")]
    for r in rows:
        if r.get("new_tokens_per_s") and seed_rate:
            r["speedup"] = round(r["new_tokens_per_s"] / seed_rate, 1)
    best = max(engine_rows, key=lambda r: r["new_tokens_per_s"], default=None)
    result = {
        "benchmark": "generate_throughput",
        "mode": "smoke" if args.smoke else "full",
        **env,
        "model": "tiny Gemma-3 (smoke)" if args.smoke else "random-initialised Gemma-3-4B text architecture",
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "work_dir")},
        "prompt_tokens": inputs["prompt_tokens"],
        "setup_seconds": inputs["setup_seconds"],
        "engine_load_seconds": None if engine_load_seconds is None else round(engine_load_seconds, 1),
        "variants": rows,
        "best_variant": None if best is None else best["variant"],
        "best_new_tokens_per_s": None if best is None else best["new_tokens_per_s"],
        "speedup": None if best is None or not seed_rate else round(best["new_tokens_per_s"] / seed_rate, 1),
        "goal_new_tokens_per_s": GOAL_TOKENS_PER_SECOND,
        "meets_goal": None if best is None or args.smoke else best["new_tokens_per_s"] >= GOAL_TOKENS_PER_SECOND,
        "total_seconds": round(time.perf_counter() - t0, 1),
        "complete": final,
    }
    slug = "smoke" if args.smoke else re.sub(r"[^a-z0-9]+", "-", env["device"].lower()).strip("-")
    path = _common.write_json(Path(args.out) / f"generate_throughput_{slug}.json", result)
    if not final:
        return result
    columns = [
        ("variant", "variant"), ("batch_size", "batch"), ("new_tokens_per_s", "new tok/s"),
        ("summaries_per_s", "summaries/s"), ("speedup", "vs seed"), ("peak_gib", "peak GiB"),
        ("warmup_seconds", "warm-up s"), ("ms_per_decode_step", "ms/step"), ("gpu_busy", "GPU busy"),
    ]  # fmt: skip
    table_rows = [
        {
            **r,
            "gpu_busy": (r.get("profile") or {}).get("gpu_busy_fraction"),
            "variant": r["variant"] + (" (skipped)" if "skipped" in r else " (error)" if "error" in r else ""),
        }
        for r in rows
    ]
    print(f"\ngenerate throughput on {env['device']} ({result['mode']}; {args.max_new_tokens} new tokens per note; "
          f"prompts mean {inputs['prompt_tokens']['mean']} tokens) -> {path}")  # fmt: skip
    for r in rows:
        if "error" in r:
            print(f"  {r['variant']}: {r['error']}")
    print(_common.format_table(table_rows, columns))
    print(f"speedup (best engine variant vs seed): {result['speedup']}x; goal {GOAL_TOKENS_PER_SECOND} new tok/s")
    return result


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        main()
