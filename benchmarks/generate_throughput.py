"""Generation throughput: the seed prototype's way vs our inference engine, on the same prompts and the same model.

    python benchmarks/generate_throughput.py --out benchmarks/results --notes 128   # one H100 (est. 6-7 min)
    python benchmarks/generate_throughput.py --smoke --out /tmp/gen-smoke          # CPU, tiny model, minutes

Model: a random-initialised Gemma-3-4B text model (hidden 2560, 34 layers, 8/4 heads, head_dim 256, vocab 262,208,
sliding window 1024 with 5 local : 1 global) — the FLOPs and bytes of MedGemma's language model — with a random
LoRA adapter (r 16 on all 7 projections, B != 0). Prompts: synthetic Kaggle-profile notes rendered with the
training chat template and tokenized with the benchmarks' length-calibrated tokenizer (``benchmarks/_common.py``:
≈ 1,000 tokens per example, ≈ 750 per prompt, like Gemma's tokenizer on the Kaggle data). Random weights never
emit an end-of-turn token at a realistic point, so every variant generates exactly ``--max_new_tokens`` tokens per
note (``min_new_tokens = max_new_tokens``): tokens/s compares like with like.

Default variants (issue 14's levers one at a time; they run in this order, and the run starts no new variant after
``--time_budget_s``):

* ``seed`` — what the seed did: NF4 4-bit base (bitsandbytes, double quant, bf16 compute) with the LoRA adapter
  unmerged, one note at a time, ``model.generate(do_sample=True)`` with transformers' default sampling (top-k 50).
  ``--seed_notes`` (8) notes spread over the prompt lengths, ``--seed_new_tokens`` (32) each, timed one by one: the
  row's ``new_tokens_per_s`` is the MEDIAN note's rate, with ``spread`` (min, quartiles, max, relative IQR) and every
  note's rate; ``speedup`` divides by that median. (One note timed alone swung 2x between runs.)
* ``engine_static_compile`` — the engine as issue 8 left it: bf16 weights with the adapter merged, static KV cache
  reused across batches (sliding-window layers at full length), ``torch.compile`` (mode reduce-overhead: CUDA graphs)
  of the decoding step, our decoding attention ``sdpa_gqa_fold``; batch 64 under the default budget.
* ``engine_ring_b2x_chunked`` — plus ring-buffer sliding-window layers (dischargesum/inference/kv_cache.py: 1,024 slots
  instead of the cache length), at twice the budget and batch cap (batch 128) with the prefill in chunks of
  ``--prefill_chunk_rows`` (32) notes: the candidate for the medgemma recipe (not its default until measured).
* ``compile_rerun`` — ``--rerun_variant`` (the row above) loaded and warmed up again in a second process on the same
  torch.compile cache directory: ``first_run_warmup_seconds`` (that row, compiled into this run's fresh, empty
  ``--compile_cache_dir``) vs ``rerun_warmup_seconds``.
* ``engine_ring`` — the ring buffer alone, at batch 64 (its effect without the bigger batch).

Every greedy engine row is checked against the dynamic-cache path: ``--check_notes`` (8) notes spread over the
prompt lengths are generated once with the dynamic cache (eager, same model), and each row's ``equality`` says how
many of them came out identical; for one that differs, the first differing step, the reference's top-2 logit margin
there, the bf16 spacing at the top logit and the rank of the row's token (a near-tie flipped by bf16 kernel order
has rank 2 and a margin of a few ulps; ``all_explained`` says whether every divergence is one). Every engine row
also reports ``ms_per_decode_step`` (wall time over decoding steps, prefill included), ``decode_limit`` (batch x
peak HBM bandwidth / (weight bytes + KV bytes a step reads)) and ``fraction_of_decode_limit``.

More variants (``--variants``): ``engine_greedy`` (dynamic cache, eager), ``engine_greedy_b2x``, ``engine_sample``
(per-note seeded sampling), ``engine_static`` (static cache, no compilation), ``engine_static_compile_b2x``,
``engine_static_compile_sample``, ``engine_static_compile_sdpa`` (transformers' own sdpa: the KV copy's cost),
``engine_static_compile_matmul`` (our decoding attention's matmul kernel), and the uncompiled ``engine_static_ring``
/ ``engine_static_ring_b2x_chunked`` (the CPU smoke run uses those). With ``--profile``, each engine variant also runs
``--profile_tokens`` decoding steps of its first batch under ``torch.profiler``: ``profile.gpu_busy_fraction`` (kernel
time / wall time) and the top kernels say where a decoding step's time goes.

Writes ``generate_throughput_<device>.json`` into ``--out`` after every variant (device, date, versions, command,
per-variant rows, ``speedup``, ``seed_spread``, ``compile_warmup``, ``best_fraction_of_decode_limit``) and prints a
short table last.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _common

GOAL_TOKENS_PER_SECOND = 3300  # issue 14 (issue 8's >= 500x the seed's way)
STRETCH_TOKENS_PER_SECOND = 5000
# Issue 14's levers one by one, most informative first: a run stopped by --time_budget_s keeps the rows that matter.
# engine_ring_b2x_chunked runs before engine_ring so that its compilation (the one compile_rerun repeats in a second
# process) is this process's first of that cache layout.
DEFAULT_VARIANTS = ("seed", "engine_static_compile", "engine_ring_b2x_chunked", "compile_rerun", "engine_ring")
ALL_VARIANTS = (
    *DEFAULT_VARIANTS,
    "engine_static_compile_b2x",
    "engine_static_compile_sdpa",
    "engine_static_compile_matmul",
    "engine_greedy",
    "engine_static_compile_sample",
    "engine_static",
    "engine_sample",
    "engine_greedy_b2x",
    "engine_static_ring",
    "engine_static_ring_b2x_chunked",
)
# CPU smoke: the same code paths without compilation (compiling on a shared 2-core CPU takes minutes).
SMOKE_VARIANTS = (
    "seed", "engine_greedy", "engine_sample", "engine_static", "engine_static_ring", "engine_static_ring_b2x_chunked",
    "compile_rerun",
)  # fmt: skip
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU smoke run with the tiny model (tests use it).")
    p.add_argument("--out", default="benchmarks/results", help="Directory for the result JSON.")
    p.add_argument("--work_dir", default="/tmp/dischargesum-bench", help="Cache for the model, tokenizer and data.")
    p.add_argument("--variants", default=None, help=f"Comma-separated subset of {','.join(ALL_VARIANTS)}.")
    p.add_argument("--notes", type=int, default=None, help="Notes per engine variant (default 256; smoke 6).")
    p.add_argument(
        "--seed_notes",
        type=int,
        default=None,
        help="Notes timed the seed's way, one by one: median and spread (default 8; smoke 4).",
    )
    p.add_argument(
        "--seed_new_tokens",
        type=int,
        default=None,
        help="New tokens per seed note (default 32: the seed decodes ~5 tokens/s, so 8 x 512 would take ~15 min; "
        "its per-token time is flat at batch 1; smoke: --max_new_tokens).",
    )
    p.add_argument(
        "--check_notes",
        type=int,
        default=None,
        help="Notes whose greedy outputs every greedy engine row compares with the dynamic-cache path (default 8, "
        "spread over the prompt lengths; smoke 3).",
    )
    p.add_argument(
        "--prefill_chunk_rows", type=int, default=None, help="Rows per prefill chunk in *_chunked rows (32; smoke 2)."
    )
    p.add_argument(
        "--compile_cache_dir",
        default=None,
        help="torch.compile caches of this run (default: a fresh <work_dir>/compile_cache/<time> directory, so "
        "every warm-up here is a first run; compile_rerun repeats one in a second process on the same directory).",
    )
    p.add_argument(
        "--rerun_variant",
        default=None,
        help="The row compile_rerun repeats in a second process (default engine_ring_b2x_chunked; smoke: its "
        "uncompiled twin engine_static_ring_b2x_chunked, which checks the two-process plumbing only).",
    )
    p.add_argument("--warmup_child", default=None, help=argparse.SUPPRESS)  # internal: compile_rerun's child
    p.add_argument("--child_out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--max_new_tokens", type=int, default=None, help="New tokens per note (default 512; smoke 8).")
    p.add_argument("--batch_token_budget", type=int, default=None, help="Engine budget (default 196608; smoke 4096).")
    p.add_argument("--max_batch_size", type=int, default=None, help="Engine batch cap (default 128; smoke 4).")
    p.add_argument("--time_budget_s", type=float, default=360.0, help="Start no new variant after this many seconds.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true", help="Profile a few decoding steps of each engine variant.")
    p.add_argument("--profile_tokens", type=int, default=16, help="Decoding steps profiled per engine variant.")
    args = p.parse_args(argv)
    smoke = args.smoke
    defaults = {
        "notes": 6 if smoke else 256,
        "seed_notes": 4 if smoke else 8,
        "max_new_tokens": 8 if smoke else 512,
        "check_notes": 3 if smoke else 8,
        "prefill_chunk_rows": 2 if smoke else 32,
        "rerun_variant": "engine_static_ring_b2x_chunked" if smoke else "engine_ring_b2x_chunked",
        "batch_token_budget": 4096 if smoke else 196_608,
        "max_batch_size": 4 if smoke else 128,
    }
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.seed_new_tokens is None:
        args.seed_new_tokens = args.max_new_tokens if smoke else min(32, args.max_new_tokens)
    chosen = args.variants.split(",") if args.variants else list(SMOKE_VARIANTS if smoke else DEFAULT_VARIANTS)
    unknown = sorted(set(chosen) - set(ALL_VARIANTS))
    if unknown:
        p.error(f"unknown variant(s) {unknown}; choose from {', '.join(ALL_VARIANTS)}")
    if args.rerun_variant not in ENGINE_VARIANTS:
        p.error(f"--rerun_variant {args.rerun_variant}: choose an engine variant ({', '.join(ENGINE_VARIANTS)})")
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
    from dischargesum.inference.engine import encode_chats
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
    from dischargesum.inference.engine import release_memory

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


def rate_spread(rates: list[float]) -> dict[str, Any]:
    """Median and spread of per-note rates; ``new_tokens_per_s`` (and so ``speedup``) is the median."""
    import statistics

    ordered = sorted(rates)
    median = statistics.median(ordered)
    quartiles = statistics.quantiles(ordered, n=4) if len(ordered) >= 2 else [median, median, median]
    return {
        "rate_basis": "median over notes of (new tokens / wall seconds of that note, prefill included)",
        "new_tokens_per_s_median": round(median, 3),
        "spread": {
            "min": round(ordered[0], 3),
            "p25": round(quartiles[0], 3),
            "p75": round(quartiles[2], 3),
            "max": round(ordered[-1], 3),
            "relative_iqr": round((quartiles[2] - quartiles[0]) / median, 4) if median else None,
        },
        "per_note_new_tokens_per_s": [round(r, 3) for r in rates],
    }


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
    # Notes spread over the prompt lengths (the engine rows run all of them).
    order = sorted(range(len(inputs["prompts"])), key=lambda i: len(inputs["prompts"][i]))
    picks = [order[(2 * k + 1) * len(order) // (2 * args.seed_notes)] for k in range(args.seed_notes)]
    prompts = [inputs["prompts"][i] for i in picks]
    n = args.seed_new_tokens
    kwargs = {"do_sample": True, "top_k": 50, "temperature": 1.0, "max_new_tokens": n, "min_new_tokens": n}
    with torch.inference_mode():  # warm-up: CUDA context, bitsandbytes kernels
        model.generate(input_ids=torch.tensor([prompts[0]], device=device()), max_new_tokens=4, do_sample=True)
    sync()
    reset_peak()
    new_tokens = 0
    per_note: list[float] = []
    seconds = 0.0
    for ids in prompts:
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=torch.tensor([ids], device=device()), **kwargs)
        sync()
        took = time.perf_counter() - start
        seconds += took
        new_tokens += out.shape[1] - len(ids)
        per_note.append((out.shape[1] - len(ids)) / took)
    row = result_row(
        "seed", len(prompts), new_tokens, seconds, load_seconds=round(load_seconds, 1), peak_gib=peak_gib(),
        batch_size=1, weights="nf4 + unmerged LoRA", decoding="sample (top-k 50)", new_tokens_per_note=n,
        **rate_spread(per_note),
    )  # fmt: skip
    # The seed's rate (and so every speedup) is the median note, not the total: one slow or fast note cannot move it.
    row["new_tokens_per_s_total"] = row["new_tokens_per_s"]
    row["new_tokens_per_s"] = row["new_tokens_per_s_median"]
    del model, base
    release()
    return row


_FULL = {"cache_implementation": "static", "sliding_window_cache": "full"}  # issue 8's static cache
_RING = {"cache_implementation": "static", "sliding_window_cache": "ring"}
ENGINE_VARIANTS: dict[str, dict[str, Any]] = {
    "engine_greedy": {},
    "engine_sample": {"do_sample": True, "top_k": 50, "temperature": 1.0},
    "engine_static": {**_FULL},
    "engine_static_compile": {**_FULL, "compile": True},
    "engine_static_compile_b2x": {**_FULL, "compile": True, "scale": 2},
    "engine_static_compile_sample": {
        **_FULL, "compile": True, "do_sample": True, "top_k": 50, "temperature": 1.0,
    },
    "engine_static_compile_sdpa": {**_FULL, "compile": True, "attn": "sdpa"},
    "engine_static_compile_matmul": {**_FULL, "compile": True, "decode_kernel": "matmul"},
    "engine_greedy_b2x": {"scale": 2},
    "engine_ring": {**_RING, "compile": True},
    "engine_ring_b2x_chunked": {**_RING, "compile": True, "scale": 2, "chunked": True},
    "engine_static_ring": {**_RING},
    "engine_static_ring_b2x_chunked": {**_RING, "scale": 2, "chunked": True},
}  # fmt: skip


def load_engine_model(inputs: dict[str, Any]) -> tuple[Any, float]:
    """bf16 base with the adapter merged (the generate recipe's default), through the stage's own loader."""
    from dischargesum.inference.engine import EngineSettings
    from dischargesum.inference.loading import load_engine, resolve_model_source

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
    if spec.pop("chunked", False):
        spec["prefill_chunk_rows"] = args.prefill_chunk_rows
    scale = spec.pop("scale", 1)
    attn = spec.pop("attn", None)
    kernel = spec.pop("decode_kernel", None)
    if kernel == "matmul":  # our decoding attention with its other kernel (benchmarks/_engine_ablations.py)
        from _engine_ablations import use_matmul_fold

        previous = use_matmul_fold(base_engine.model)
        try:
            return run_engine_variant_inner(name, base_engine, args, inputs, spec, scale, None, decode_kernel=kernel)
        finally:
            base_engine.model.set_attn_implementation(previous)
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
    *,
    decode_kernel: str = "sdpa",
) -> dict[str, Any]:
    from _engine_ablations import FixedLengthEngine

    from dischargesum.inference.engine import EngineSettings, GenerationRequest
    from dischargesum.inference.kv_cache import ring_layers

    settings = EngineSettings(
        batch_token_budget=args.batch_token_budget * scale, max_batch_size=args.max_batch_size * scale, **spec
    )
    engine = FixedLengthEngine(base_engine.model, base_engine.tokenizer, settings, min_new_tokens=args.max_new_tokens)
    requests = all_requests(args, inputs)
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
    checked = set(inputs.get("reference", {}))
    outputs: dict[str, tuple[int, ...]] = {}
    for _batch, results in engine.generate(requests, batches=batches):
        new_tokens += sum(r.new_tokens for r in results)
        for r in results:
            finish[r.finish_reason] = finish.get(r.finish_reason, 0) + 1
            if r.key in checked:
                outputs[r.key] = r.token_ids
    sync()
    seconds = time.perf_counter() - start
    decode_steps = sum(max(r.max_new_tokens for r in b) for b in batches)
    equality = None if settings.do_sample else compare_with_reference(base_engine, inputs, outputs)
    shape = engine._static_shape
    limit = decode_limit(base_engine, settings, shape, batches, inputs, args.max_new_tokens)
    plan = None if engine.memory_plan is None else {k: round(v, 2) for k, v in engine.memory_plan.items()}
    profile = profile_decoding(engine, batches[0], args) if args.profile else None
    row = result_row(
        name, len(requests), new_tokens, seconds, warmup_seconds=round(warmup_seconds, 1), peak_gib=peak_gib(),
        ms_per_decode_step=round(1e3 * seconds / decode_steps, 2),
        batches=len(batches), batch_size=max(len(b) for b in batches), finish_reasons=finish,
        weights="bf16, LoRA merged", decoding="sample (top-k 50, per-note seed)" if settings.do_sample else "greedy",
        cache=settings.cache_implementation, compile=settings.compile,
        # the matmul kernel is registered under its own name; the row keeps naming the attention and its kernel
        attention="sdpa_gqa_fold" if decode_kernel == "matmul" else base_engine.model.config._attn_implementation,
        decode_kernel=decode_kernel,
        batch_token_budget=settings.batch_token_budget, max_batch_size=settings.max_batch_size,
        sliding_window_cache=settings.sliding_window_cache if settings.cache_implementation == "static" else None,
        ring_layers=len(ring_layers(engine._static_cache)), prefill_chunk_rows=settings.prefill_chunk_rows,
        compile_cache_dir=os.environ.get("TORCHINDUCTOR_CACHE_DIR") if settings.compile else None,
        equality=equality, decode_limit=limit, memory_plan_gib=plan,
        **({"profile": profile} if profile is not None else {}),
    )  # fmt: skip
    if limit and limit.get("new_tokens_per_s"):
        row["fraction_of_decode_limit"] = round(row["new_tokens_per_s"] / limit["new_tokens_per_s"], 3)
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

    from dischargesum.inference.engine import GenerationRequest

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
# Equality with the dynamic-cache path, the decode limit, the compile-cache rerun
# ---------------------------------------------------------------------------------------------------------------


def all_requests(args: argparse.Namespace, inputs: dict[str, Any]) -> list[Any]:
    from dischargesum.inference.engine import GenerationRequest
    from dischargesum.inference.sampling import note_seed

    return [
        GenerationRequest(f"n{i}", tuple(p), args.max_new_tokens, seed=note_seed(args.seed, f"n{i}"), index=i)
        for i, p in enumerate(inputs["prompts"])
    ]


def check_keys(args: argparse.Namespace, inputs: dict[str, Any]) -> list[str]:
    """``--check_notes`` notes spread over the prompt lengths (shortest to longest: some prompts are longer than the
    sliding window, so the ring buffer wraps during the prefill and during decoding)."""
    prompts = inputs["prompts"]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    n = min(args.check_notes, len(order))
    if n <= 1:
        return [f"n{order[-1]}"] if n == 1 else []
    return [f"n{order[round(k * (len(order) - 1) / (n - 1))]}" for k in range(n)]


def compute_reference(base_engine: Any, args: argparse.Namespace, inputs: dict[str, Any]) -> dict[str, Any]:
    """Greedy outputs of the check notes through the dynamic-cache path (no static cache, no compilation), in one
    batch: what every greedy engine row is compared with."""
    from _engine_ablations import FixedLengthEngine

    from dischargesum.inference.engine import EngineSettings

    keys = set(check_keys(args, inputs))
    requests = [r for r in all_requests(args, inputs) if r.key in keys]
    settings = EngineSettings(batch_token_budget=10**9, max_batch_size=len(requests) or 1)
    engine = FixedLengthEngine(base_engine.model, base_engine.tokenizer, settings, min_new_tokens=args.max_new_tokens)
    began = time.perf_counter()
    results = engine.generate_all(requests)
    sync()
    inputs["reference"] = {r.key: r.token_ids for r in results}
    inputs["reference_prompts"] = {r.key: tuple(r.prompt_ids) for r in requests}
    return {"notes": len(requests), "seconds": round(time.perf_counter() - began, 1), "path": "dynamic cache, eager"}


def compare_with_reference(
    base_engine: Any, inputs: dict[str, Any], outputs: dict[str, tuple[int, ...]]
) -> dict[str, Any] | None:
    """Per check note: identical, or the first differing step and why. The explanation is the reference model's own
    view of that step (one forward over prompt + the common prefix, in the engine's dtype): the top-2 logit margin,
    the bf16 spacing (ulp) at the top logit, and the rank of the token the variant chose. A divergence where the
    variant took the runner-up within a few ulps is a near-tie flipped by kernel order (bf16 sums in another order
    round differently); anything else is a bug."""
    reference = inputs.get("reference") or {}
    if not reference:
        return None
    notes = []
    for key, ref in reference.items():
        got = outputs.get(key)
        if got is None:
            notes.append({"note": key, "missing": True})
            continue
        if got == ref:
            notes.append({"note": key, "identical": True, "tokens": len(ref)})
            continue
        step = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), min(len(ref), len(got)))
        entry: dict[str, Any] = {"note": key, "identical": False, "first_divergence_step": step, "tokens": len(ref)}
        if step < min(len(ref), len(got)):
            entry.update(explain_step(base_engine, inputs["reference_prompts"][key], ref[:step], ref[step], got[step]))
        notes.append(entry)
    identical = sum(1 for n in notes if n.get("identical"))
    divergent = [n for n in notes if not n.get("identical")]
    near_ties = [n for n in divergent if n.get("near_tie")]
    return {
        "reference": "dynamic cache, eager, same model and prompts (greedy)",
        "notes": len(notes),
        "identical": identical,
        "divergent": len(divergent),
        "divergences_at_near_ties": len(near_ties),
        "all_explained": len(near_ties) == len(divergent),
        "near_tie_rule": "the variant's token is the reference's runner-up and the top-2 margin <= 4 bf16 ulps",
        "per_note": notes,
    }


def explain_step(base_engine: Any, prompt: tuple[int, ...], prefix: tuple[int, ...], ref_token: int, got_token: int):
    import math

    import torch

    model = base_engine.model
    ids = torch.tensor([[*prompt, *prefix]], device=model.device)
    with torch.inference_mode():
        logits = model(input_ids=ids, logits_to_keep=1).logits[0, -1].float()
    logits[list(base_engine.stop_ids)] = float("-inf")  # masked while decoding too (min_new_tokens = max_new_tokens)
    top = torch.topk(logits, 2)
    top1 = float(top.values[0])
    margin = float(top.values[0] - top.values[1])
    ulp = 2.0 ** (math.floor(math.log2(abs(top1))) - 7) if top1 else 0.0  # bf16: 8 significant bits
    rank = int((logits > logits[got_token]).sum()) + 1
    return {
        "reference_token": ref_token,
        "variant_token": got_token,
        "reference_top2_margin": round(margin, 5),
        "bf16_ulp_at_top1": ulp,
        "variant_token_rank": rank,
        "near_tie": rank == 2 and margin <= 4 * ulp,
    }


# Peak HBM bandwidth (GB/s) by device name, for the decode limit (a decoding step reads every weight and the KV
# cache it attends to once).
PEAK_HBM_GBPS = {"H100 80GB HBM3": 3350, "H100 SXM": 3350, "H100 NVL": 3900, "H100 PCIe": 2000, "H200": 4800}


def decode_limit(
    base_engine: Any,
    settings: Any,
    shape: tuple[int, int] | None,
    batches: list[Any],
    inputs: dict[str, Any],
    max_new_tokens: int,
) -> dict[str, Any] | None:
    """New tokens/s if a decoding step only had to read the weights and the KV cache it attends to at the peak HBM
    bandwidth: batch / ((weight bytes + KV bytes read) / bandwidth). KV bytes per row per step: full-length static
    layers read the whole cache length (masked slots are read too), ring layers their window, dynamic-cache layers
    the current length (taken at the middle of the generation). GPU only."""
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    gbps = next((v for k, v in PEAK_HBM_GBPS.items() if k in name), None)
    if gbps is None:
        return None
    model = base_engine.model
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    cfg = model.config.get_text_config(decoder=True)
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    per_pos = 2 * kv_heads * head_dim * next(model.parameters()).element_size()  # K and V, one layer, one position
    types = list(getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers)
    window = getattr(cfg, "sliding_window", None) or 0
    batch = max(len(b) for b in batches)
    mean_new = max_new_tokens / 2
    if shape is not None:
        batch, cache_len = shape
        ring = settings.sliding_window_cache == "ring" and window and window < cache_len
        positions = sum(window if (t == "sliding_attention" and ring) else cache_len for t in types)
    else:
        mid = inputs["prompt_tokens"]["mean"] + mean_new
        positions = sum(min(mid, window) if t == "sliding_attention" and window else mid for t in types)
    step_bytes = weight_bytes + batch * positions * per_pos
    return {
        "new_tokens_per_s": round(batch * gbps * 1e9 / step_bytes, 1),
        "basis": "batch x peak HBM bandwidth / (weight bytes + KV bytes read per step)",
        "hbm_gbps": gbps,
        "batch": batch,
        "weight_gib": round(weight_bytes / 2**30, 2),
        "kv_gib_read_per_step": round(batch * positions * per_pos / 2**30, 2),
    }


def compile_rerun(args: argparse.Namespace, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Repeat the compiled warm-up of ``--rerun_variant`` (``engine_ring_b2x_chunked``) in a second process that
    shares this run's torch.compile cache directory: its ``warmup_seconds`` is what a rerun (or a resumed generate)
    pays, to compare with the first run's (the same variant's row in this process, compiled into an empty
    directory)."""
    variant = args.rerun_variant
    child_out = Path(args.work_dir) / f"compile_rerun_{os.getpid()}.json"
    argv = [
        sys.executable, str(Path(__file__).resolve()), "--warmup_child", variant, "--child_out", str(child_out),
        "--work_dir", args.work_dir, "--compile_cache_dir", args.compile_cache_dir,
        "--notes", str(args.notes), "--max_new_tokens", str(args.max_new_tokens),
        "--batch_token_budget", str(args.batch_token_budget), "--max_batch_size", str(args.max_batch_size),
        "--prefill_chunk_rows", str(args.prefill_chunk_rows), "--seed", str(args.seed),
        "--rerun_variant", variant, "--variants", variant,
    ] + (["--smoke"] if args.smoke else [])  # fmt: skip
    env = _common.subprocess_env(
        TORCHINDUCTOR_CACHE_DIR=args.compile_cache_dir, TRITON_CACHE_DIR=str(Path(args.compile_cache_dir) / "triton")
    )
    began = time.perf_counter()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    wall = time.perf_counter() - began
    if proc.returncode != 0 or not child_out.is_file():
        raise RuntimeError(f"compile_rerun child failed (exit {proc.returncode}): {proc.stderr[-1500:]}")
    child = json.loads(child_out.read_text())
    first = next((r for r in rows if r["variant"] == variant and "warmup_seconds" in r), None)
    return {
        "variant": "compile_rerun",
        "of_variant": variant,
        "compile_cache_dir": args.compile_cache_dir,
        "first_run_warmup_seconds": None if first is None else first["warmup_seconds"],
        "rerun_warmup_seconds": child["warmup_seconds"],
        "warmup_seconds": child["warmup_seconds"],  # the table's warm-up column: the rerun's
        "rerun_process_seconds": round(wall, 1),
        "rerun_engine_load_seconds": child["engine_load_seconds"],
        "rerun_setup_seconds": child["setup_seconds"],
        "basis": "warm-up = the first planned batch with 8 new tokens (compilation + CUDA-graph capture); first run "
        "in this process into an empty cache directory, rerun in a new process on the same directory",
    }


def warmup_child(args: argparse.Namespace) -> None:
    """compile_rerun's second process: load, plan and run the warm-up batch of one variant; write its timings."""
    from dischargesum.inference.engine import GenerationRequest
    from dischargesum.inference.loading import configure_compile_cache

    configure_compile_cache(args.compile_cache_dir)
    inputs = build_inputs(args)
    engine, load_seconds = load_engine_model(inputs)
    spec = dict(ENGINE_VARIANTS[args.warmup_child])
    if spec.pop("chunked", False):
        spec["prefill_chunk_rows"] = args.prefill_chunk_rows
    scale = spec.pop("scale", 1)
    from _engine_ablations import FixedLengthEngine

    from dischargesum.inference.engine import EngineSettings

    settings = EngineSettings(
        batch_token_budget=args.batch_token_budget * scale, max_batch_size=args.max_batch_size * scale, **spec
    )
    runner = FixedLengthEngine(engine.model, engine.tokenizer, settings, min_new_tokens=args.max_new_tokens)
    batches = runner.plan(all_requests(args, inputs))
    warm = [GenerationRequest(r.key, r.prompt_ids, min(8, args.max_new_tokens), r.seed, r.index) for r in batches[0]]
    began = time.perf_counter()
    runner.run_batch(warm)
    sync()
    payload = {
        "warmup_seconds": round(time.perf_counter() - began, 1),
        "engine_load_seconds": round(load_seconds, 1),
        "setup_seconds": inputs["setup_seconds"],
    }
    Path(args.child_out).write_text(json.dumps(payload))


# ---------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    t0 = time.perf_counter()
    if args.warmup_child:
        warmup_child(args)
        return {}
    import torch

    from dischargesum.inference.loading import configure_compile_cache

    if args.compile_cache_dir is None:  # fresh per run: every compiled row's warm-up here is a first run
        args.compile_cache_dir = str(Path(args.work_dir) / "compile_cache" / time.strftime("%Y%m%dT%H%M%S"))
    # Triton's kernel cache inside it too (a global TRITON_CACHE_DIR would make the "first run" partly warm).
    os.environ["TRITON_CACHE_DIR"] = str(Path(args.compile_cache_dir) / "triton")
    configure_compile_cache(args.compile_cache_dir)

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
    reference: dict[str, Any] | None = None
    for name in args.variants:
        elapsed = time.perf_counter() - t0
        if elapsed > args.time_budget_s:
            rows.append({"variant": name, "skipped": f"time budget ({elapsed:.0f}s > {args.time_budget_s:.0f}s)"})
            continue
        try:
            if name == "seed":
                rows.append(run_seed(args, inputs))
                continue
            if name == "compile_rerun":
                rows.append(compile_rerun(args, rows))
                continue
            if engine is None:
                engine, engine_load_seconds = load_engine_model(inputs)
            if reference is None and args.check_notes:
                reference = compute_reference(engine, args, inputs)
            rows.append(run_engine_variant(name, engine, args, inputs))
        except Exception as exc:  # a variant that fails is recorded, the others still run
            rows.append({"variant": name, "error": f"{type(exc).__name__}: {exc}"[:600]})
            release()
        # Write after every variant: a run stopped by an outer time limit keeps what it measured.
        summarise(args, env, inputs, rows, engine_load_seconds, t0, final=False, reference=reference)
    if engine is not None:
        engine.close()
    return summarise(args, env, inputs, rows, engine_load_seconds, t0, final=True, reference=reference)


def summarise(
    args: argparse.Namespace,
    env: dict[str, Any],
    inputs: dict[str, Any],
    rows: list[dict[str, Any]],
    engine_load_seconds: float | None,
    t0: float,
    *,
    final: bool,
    reference: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Compute speedups, write the result JSON and (when ``final``) print the table."""
    seed_rate = next((r.get("new_tokens_per_s") for r in rows if r["variant"] == "seed"), None)
    engine_rows = [r for r in rows if r["variant"].startswith("engine") and r.get("new_tokens_per_s")]
    for r in rows:
        if r.get("new_tokens_per_s") and seed_rate:
            r["speedup"] = round(r["new_tokens_per_s"] / seed_rate, 1)
    best = max(engine_rows, key=lambda r: r["new_tokens_per_s"], default=None)
    seed_row = next((r for r in rows if r["variant"] == "seed" and "spread" in r), None)
    rerun = next((r for r in rows if r["variant"] == "compile_rerun" and "rerun_warmup_seconds" in r), None)
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
        "speedup_basis": "best engine row's new tokens/s over the seed's MEDIAN per-note rate",
        "seed_new_tokens_per_s_median": None if seed_row is None else seed_row["new_tokens_per_s_median"],
        "seed_spread": None if seed_row is None else seed_row["spread"],
        "best_fraction_of_decode_limit": None if best is None else best.get("fraction_of_decode_limit"),
        "equality_reference": reference,
        "compile_warmup": None
        if rerun is None
        else {k: rerun[k] for k in ("first_run_warmup_seconds", "rerun_warmup_seconds", "of_variant")},
        "goal_new_tokens_per_s": GOAL_TOKENS_PER_SECOND,
        "stretch_new_tokens_per_s": STRETCH_TOKENS_PER_SECOND,
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
        ("fraction_of_decode_limit", "of limit"), ("same_as_dynamic", "= dynamic"),
    ]  # fmt: skip
    table_rows = [
        {
            **r,
            "gpu_busy": (r.get("profile") or {}).get("gpu_busy_fraction"),
            "same_as_dynamic": None
            if not r.get("equality")
            else f"{r['equality']['identical']}/{r['equality']['notes']}"
            + ("" if r["equality"]["all_explained"] else " UNEXPLAINED"),
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
    if seed_row is not None:
        sp = seed_row["spread"]
        print(f"seed: median {seed_row['new_tokens_per_s_median']} new tok/s over {seed_row['notes']} notes "
              f"(min {sp['min']}, p25 {sp['p25']}, p75 {sp['p75']}, max {sp['max']})")  # fmt: skip
    if rerun is not None:
        print(f"compile warm-up ({rerun['of_variant']}): first run {rerun['first_run_warmup_seconds']} s, "
              f"rerun in a new process {rerun['rerun_warmup_seconds']} s")  # fmt: skip
    print(f"speedup (best engine variant vs seed): {result['speedup']}x; goal {GOAL_TOKENS_PER_SECOND} new tok/s")
    return result


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        main()
