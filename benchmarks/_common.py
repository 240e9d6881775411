"""Shared pieces of the GPU benchmarks: environment facts, the random Gemma-3-4B model and token-length-matched
synthetic data (built once per invocation into a work directory), FLOP accounting, a GPU-slot scheduler for
variant subprocesses, profiler-event classification, result JSON and the closing table.

Other benchmark scripts put ``benchmarks/`` on ``sys.path`` and ``import _common`` (``benchmarks`` is not a package:
a site-packages distribution of that name exists); importing it puts the repository root on ``sys.path``.

Token lengths. The real Gemma-3 tokenizer (262k vocabulary) cannot be downloaded here, so the benchmarks use a
byte-level BPE tokenizer with :data:`BENCH_VOCAB_SIZE` tokens, trained offline (``dischargesum.tiny_models``) on
synthetic notes drawn with a different seed than the benchmark's rows. Its size was chosen so that the synthetic
*kaggle* profile averages ~3.95 characters per token, i.e. ≈ 1,000 tokens per example with the chat template (the
issue's figure for Gemma's tokenizer on the Kaggle data; the synthetic generator's own physionet token columns
assume 4 characters per token). Measured here on 293 kaggle rows: mean 998 tokens (255 of them summary); physionet
rows capped at 2,048 by prepare_data's section-aware shortening: mean 1,918 (483 summary). The model still has
Gemma's 262,208-row embedding and LM head, so every FLOP and byte of the real model is spent; only the ids differ.
Every result file records the measured length distribution it ran on.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import platform
import queue
import re
import shlex
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

BENCH_VOCAB_SIZE = 4096
# Data profiles: the synthetic generator's length profile and schema, prepare_data's token budget.
PROFILES: dict[str, dict[str, Any]] = {
    "kaggle": {"schema": "kaggle", "max_seq_length": 2048},
    "physionet": {"schema": "physionet", "max_seq_length": 2048},
    # CPU smoke runs only: short notes for the tiny model.
    "tiny": {"schema": "kaggle", "max_seq_length": 512},
}
# bf16 dense tensor-core peak by datasheet (SXM parts), for MFU. The measured matmul rate is recorded beside it.
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L40S": 362.0, "L4": 121.0}
LIBRARIES = (
    "torch",
    "transformers",
    "trl",
    "peft",
    "accelerate",
    "bitsandbytes",
    "liger_kernel",
    "datasets",
    "triton",
    "tokenizers",
    "unsloth",
    "unsloth_zoo",
)
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONUNBUFFERED": "1",
}


# ---------------------------------------------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------------------------------------------


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for a benchmark child process: this checkout importable, offline, no telemetry."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(OFFLINE_ENV)
    env.update(extra)
    return env


def library_versions(names: Iterable[str] = LIBRARIES) -> dict[str, str | None]:
    """The stage manifests' version record, over the benchmark libraries (Unsloth, Liger, ...) by default."""
    from dischargesum.manifest import library_versions as versions_of

    return versions_of(names)


def gpu_facts() -> list[dict[str, Any]]:
    """Name, memory and compute capability of every visible GPU (empty on CPU). Reads torch only."""
    import torch

    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        out.append(
            {
                "index": i,
                "name": p.name,
                "total_memory_gib": round(p.total_memory / 2**30, 2),
                "capability": f"{p.major}.{p.minor}",
                "multiprocessors": p.multi_processor_count,
            }
        )
    return out


def driver_version() -> str | None:
    try:
        proc = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip().splitlines()[0] if proc.returncode == 0 and proc.stdout.strip() else None


def environment_facts(argv: Sequence[str] | None = None, gpus: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """What a result file records about where and how it was measured. ``gpus``: from :func:`gpu_facts` run in a
    child process (the orchestrating process never initialises CUDA, which would hold memory on GPU 0)."""
    from dischargesum.manifest import git_revision

    gpus = gpus or []
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "command": " ".join(shlex.quote(a) for a in (argv if argv is not None else [sys.executable, *sys.argv])),
        "git_revision": git_revision(),
        "device": gpus[0]["name"] if gpus else "cpu",
        "gpus": gpus,
        "driver": driver_version() if gpus else None,
        "cpu_count": os.cpu_count(),
        "versions": library_versions(),
    }


def peak_bf16_tflops(device_name: str) -> float | None:
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in device_name:
            return value
    return None


def measure_matmul_tflops(size: int = 8192, reps: int = 10) -> float | None:
    """The bf16 matmul rate this GPU reaches on random data (the practical ceiling), or None on CPU."""
    import torch

    if not torch.cuda.is_available():
        return None
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        a @ b
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / reps
    del a, b
    torch.cuda.empty_cache()
    return round(2 * size**3 / seconds / 1e12, 1)


# ---------------------------------------------------------------------------------------------------------------
# Inputs: tokenizer, model, data (cached in a work directory)
# ---------------------------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def write_json(path: Path, payload: Mapping[str, Any]) -> Path:
    """Write JSON atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=1, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def build_bench_tokenizer(out_dir: Path, *, seed: int = 7) -> Path:
    """The length-calibrated byte-level BPE tokenizer (see the module docstring); cached in ``out_dir``."""
    marker = out_dir / "bench_tokenizer.json"
    wanted = {"vocab_size": BENCH_VOCAB_SIZE, "seed": seed, "version": 1}
    if _read_json(marker) == wanted and (out_dir / "tokenizer.json").is_file():
        return out_dir
    from dischargesum.data.synthetic import generate_rows
    from dischargesum.tiny_models import train_tiny_tokenizer

    def corpus() -> Iterable[str]:
        for profile in ("kaggle", "tiny"):
            for row in generate_rows(400, profile=profile, schema="kaggle", seed=seed, with_entities=False):
                yield str(row["input"])
                yield str(row["target"])

    tokenizer = train_tiny_tokenizer(corpus(), BENCH_VOCAB_SIZE)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    write_json(marker, wanted)
    return out_dir


# MedGemma-4B's language model (Gemma-3-4B text): the FLOPs and bytes of the real model without its weights.
GEMMA3_4B_TEXT: dict[str, Any] = dict(
    vocab_size=262_208,
    hidden_size=2560,
    intermediate_size=10_240,
    num_hidden_layers=34,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=256,
    query_pre_attn_scalar=256,
    sliding_window=1024,
    max_position_embeddings=131_072,
    rope_scaling={"rope_type": "linear", "factor": 8.0},
    rope_theta=1_000_000.0,
    rope_local_base_freq=10_000.0,
)


def gemma3_4b_text_config():  # -> Gemma3TextConfig
    """Gemma-3-4B text architecture: 34 layers with the 5 sliding : 1 full attention pattern."""
    from transformers import Gemma3TextConfig

    kwargs = dict(GEMMA3_4B_TEXT)
    layer_types = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(34)]
    # transformers >= 5 takes rope settings as `rope_parameters` per attention kind; older keyword names are
    # accepted by some 5.x releases only, so build the dict explicitly.
    kwargs.pop("rope_scaling")
    theta, local = kwargs.pop("rope_theta"), kwargs.pop("rope_local_base_freq")
    rope_parameters = {
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": theta},
        "sliding_attention": {"rope_type": "default", "rope_theta": local},
    }
    return Gemma3TextConfig(
        **kwargs,
        layer_types=layer_types,
        rope_parameters=rope_parameters,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )


def build_random_gemma3_4b(output_dir: str | Path, *, seed: int = 0, tokenizer_dir: str | Path | None = None) -> Path:
    """Write a random-initialised Gemma-3-4B text model (bf16 safetensors, ~8.6 GB) for GPU benchmarks.

    The tokenizer is the tiny byte-level one (from ``tokenizer_dir`` or built here): benchmarks feed token ids,
    and the 262k-row embedding keeps the real model's logits cost. Builds on the GPU when one is present.
    """
    import torch
    from transformers import Gemma3ForCausalLM, GenerationConfig

    from dischargesum.logging_utils import get_logger
    from dischargesum.tiny_models import default_corpus, train_tiny_tokenizer

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = Gemma3ForCausalLM(gemma3_4b_text_config()).to(torch.bfloat16)  # type: ignore[arg-type]
    model.save_pretrained(out, safe_serialization=True)
    if tokenizer_dir is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    else:
        tokenizer = train_tiny_tokenizer(default_corpus(seed))
    tokenizer.save_pretrained(out)
    eot = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    GenerationConfig(bos_token_id=2, pad_token_id=0, eos_token_id=[1, eot], do_sample=False).save_pretrained(out)
    get_logger(__name__).info("wrote random Gemma-3-4B text model (%d parameters) to %s", model.num_parameters(), out)
    del model
    return out


def build_model(work_dir: Path, *, kind: str, tokenizer_dir: Path | None = None, seed: int = 0) -> Path:
    """``kind="gemma3-4b"``: the random-initialised Gemma-3-4B text model with the benchmark tokenizer (~8.6 GB,
    built on the GPU when there is one); ``kind="tiny"``: the tiny test model (CPU smoke runs). Cached in
    ``work_dir/model-<kind>`` (a marker file is written last, so a half-written directory is rebuilt)."""
    out = work_dir / f"model-{kind}"
    marker = out / "bench_model.json"
    wanted = {"kind": kind, "seed": seed, "tokenizer": str(tokenizer_dir) if tokenizer_dir else None, "version": 1}
    if _read_json(marker) == wanted:
        return out
    from dischargesum import tiny_models

    began = time.perf_counter()
    if kind == "gemma3-4b":
        build_random_gemma3_4b(out, seed=seed, tokenizer_dir=tokenizer_dir)
    elif kind == "tiny":
        tiny_models.build_tiny_gemma3(out, seed=seed)
    else:
        raise ValueError(f"kind={kind!r}: use 'gemma3-4b' or 'tiny'")
    write_json(marker, {**wanted, "build_seconds": round(time.perf_counter() - began, 1)})
    return out


def build_dataset(
    work_dir: Path, *, profile: str, tokenizer_dir: Path, rows: int, seed: int = 0, num_workers: int = 0
) -> Path:
    """prepare_data's output for ``rows`` synthetic rows of ``profile`` (nearly all in the train split), counted
    with ``tokenizer_dir``; cached in ``work_dir/data-<profile>-<rows>``."""
    from dischargesum.config import PrepareDataConfig
    from dischargesum.data.prepare import run_prepare_data
    from dischargesum.manifest import read_manifest

    spec = PROFILES[profile]
    out = work_dir / f"data-{profile}-{rows}"
    marker = out / "bench_data.json"
    # version 2: prepared without the entity ranking (below); a cache from another setting is rebuilt, not reused
    wanted = {"profile": profile, "rows": rows, "seed": seed, "tokenizer": str(tokenizer_dir), "version": 2}
    manifest = read_manifest(out)
    if _read_json(marker) == wanted and manifest and manifest.get("status") == "complete":
        return out
    cfg = PrepareDataConfig(
        output_dir=str(out),
        seed=seed,
        source="synthetic",
        synthetic_rows=rows,
        synthetic_profile=profile,  # type: ignore[arg-type]
        synthetic_schema=spec["schema"],
        tokenizer_name_or_path=str(tokenizer_dir),
        max_seq_length=spec["max_seq_length"],
        # The validation split is unused by the benchmarks (sft's eval is off) but must not be empty.
        validation_fraction=0.02,
        test_fraction=0.0,
        num_workers=num_workers,
        plots=False,
        # The training benchmarks' data as before issue 15's entity ranking (byte-identical splits, comparable with
        # earlier result files), and no entity extraction in the data step (its cost is prepare_data's, measured in
        # prepare_data_rank_by_target_cpu2.json).
        shortening_rank_by_target=False,
        entity_support_stats="off",
    )
    run_prepare_data(cfg)
    write_json(marker, wanted)
    return out


def tokenized_train_examples(dataset_dir: Path, tokenizer_dir: Path, limit: int = 0) -> dict[str, list[Any]]:
    """The train split tokenized exactly as TRL's SFTTrainer tokenizes conversational prompt-completion data
    (``dischargesum.data.budget.tokenize_examples``): ``input_ids`` and ``completion_start`` per example, in
    file order. Feeds the Unsloth variant (same tokens as our stage) and the FLOP accounting."""
    import pyarrow.parquet as pq

    from dischargesum.data import schema
    from dischargesum.data.budget import tokenize_examples
    from dischargesum.modeling import load_tokenizer

    card = json.loads((dataset_dir / schema.DATA_CARD_FILE).read_text(encoding="utf-8"))
    table = pq.read_table(dataset_dir / schema.SPLIT_FILES["train"], columns=["note", "summary"])
    notes = [str(x) for x in table.column("note").to_pylist()]
    summaries = [str(x) for x in table.column("summary").to_pylist()]
    if limit:
        notes, summaries = notes[:limit], summaries[:limit]
    tokenizer = load_tokenizer(str(tokenizer_dir))
    tok = tokenize_examples(tokenizer, notes, summaries, str(card["instruction"]))
    return {"input_ids": [list(x) for x in tok.input_ids], "completion_start": [int(s) for s in tok.completion_starts]}


def length_distribution(lengths: Sequence[int], trained: Sequence[int]) -> dict[str, Any]:
    """Summary of per-example token counts (total and trained = summary tokens)."""
    import numpy as np

    arr = np.asarray(lengths, dtype=np.int64)
    tr = np.asarray(trained, dtype=np.int64)
    if arr.size == 0:
        return {"examples": 0}
    return {
        "examples": int(arr.size),
        "mean_tokens": round(float(arr.mean()), 1),
        "p50_tokens": int(np.percentile(arr, 50)),
        "p90_tokens": int(np.percentile(arr, 90)),
        "max_tokens": int(arr.max()),
        "mean_trained_tokens": round(float(tr.mean()), 1),
        "trained_fraction": round(float(tr.sum() / max(arr.sum(), 1)), 4),
    }


# ---------------------------------------------------------------------------------------------------------------
# FLOP accounting
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FlopModel:
    """Per-token FLOPs of QLoRA training on a Gemma-3 text model for one data profile (what is counted: see
    :func:`flop_model`)."""

    base_matmul_params: int  # the 34 decoder layers' q/k/v/o/gate/up/down weights
    lm_head_params: int
    lora_params: int
    attention_fwd_flops_per_token: float  # QK^T and AV, causal and sliding-window aware
    trained_fraction: float  # tokens that carry loss / all tokens, completion-only

    def per_token(self, *, completion_only: bool, checkpointing: str) -> dict[str, float]:
        """``useful``: the work a QLoRA step needs without recomputation; ``executed``: plus the forward that
        gradient checkpointing recomputes (``full``: layers incl. attention; ``selective``: layers without
        attention; ``none``)."""
        head_tokens = self.trained_fraction if completion_only else 1.0
        # Frozen NF4 base: forward (2N) + input gradients (2N); no weight gradients. LoRA: forward (2) + input and
        # weight gradients (4). Attention: forward + backward (2x forward). LM head: only on positions that carry
        # loss (TRL's fused head skips the others), forward + input gradient.
        useful = (
            4 * self.base_matmul_params
            + 6 * self.lora_params
            + 4 * self.lm_head_params * head_tokens
            + 3 * self.attention_fwd_flops_per_token
        )
        recompute = 0.0
        if checkpointing in ("full", "selective", "offload"):
            recompute = 2 * self.base_matmul_params + 2 * self.lora_params
            if checkpointing != "selective":
                recompute += self.attention_fwd_flops_per_token
        return {"useful": useful, "executed": useful + recompute}


def flop_model(config: Mapping[str, Any], lengths: Sequence[int], trained: Sequence[int], lora_r: int) -> FlopModel:
    """Count the matmul parameters from a Gemma-3 text ``config.json`` mapping and the attention FLOPs of the
    actual example lengths (each example attends only to itself: causal; sliding layers see at most
    ``sliding_window`` keys). LoRA on all seven projections with rank ``lora_r``. Embedding lookups, norms,
    activations and the optimizer are not counted (they are memory-bound and small in FLOPs)."""
    cfg = config.get("text_config", config)
    h = int(cfg["hidden_size"])
    inter = int(cfg["intermediate_size"])
    n_heads, n_kv = int(cfg["num_attention_heads"]), int(cfg["num_key_value_heads"])
    hd = int(cfg.get("head_dim") or h // n_heads)
    vocab = int(cfg["vocab_size"])
    layer_types = list(cfg.get("layer_types") or ["full_attention"] * int(cfg["num_hidden_layers"]))
    window = int(cfg.get("sliding_window") or 0)
    shapes = [
        (h, n_heads * hd),  # q
        (h, n_kv * hd),  # k
        (h, n_kv * hd),  # v
        (n_heads * hd, h),  # o
        (h, inter),  # gate
        (h, inter),  # up
        (inter, h),  # down
    ]
    per_layer = sum(i * o for i, o in shapes)
    lora_per_layer = sum(lora_r * (i + o) for i, o in shapes)
    n_layers = len(layer_types)
    total_tokens = max(sum(lengths), 1)
    attn = 0.0
    for length in lengths:
        full_keys = length * (length + 1) / 2
        if window and length > window:
            sliding_keys = window * (window + 1) / 2 + (length - window) * window
        else:
            sliding_keys = full_keys
        for kind in layer_types:
            keys = sliding_keys if kind == "sliding_attention" else full_keys
            attn += 4 * n_heads * hd * keys  # QK^T and AV, 2 FLOPs per multiply-add
    return FlopModel(
        base_matmul_params=per_layer * n_layers,
        lm_head_params=h * vocab,
        lora_params=lora_per_layer * n_layers,
        attention_fwd_flops_per_token=attn / total_tokens,
        trained_fraction=sum(trained) / total_tokens,
    )


# ---------------------------------------------------------------------------------------------------------------
# Loss/gradient check helpers (shared by our variants and the Unsloth variant)
# ---------------------------------------------------------------------------------------------------------------

SKETCH_DIM = 8
LORA_B_CHECK_STD = 0.01


def canonical_lora_name(name: str) -> str | None:
    """``...layers.12.mlp.gate_proj.lora_A.default.weight`` -> ``12.mlp.gate_proj.lora_A`` (None for non-LoRA)."""
    marker = "layers."
    if ".lora_A." not in name and ".lora_B." not in name:
        return None
    i = name.find(marker)
    if i < 0:
        return None
    rest = name[i + len(marker) :]
    which = "lora_A" if ".lora_A." in name else "lora_B"
    module = rest.split(f".{which}.")[0]
    return f"{module}.{which}"


def _name_seed(name: str, salt: int) -> int:
    return zlib.crc32(f"{salt}:{name}".encode()) & 0x7FFFFFFF


def reinit_lora_for_check(model: Any, *, seed: int = 0) -> int:
    """Give every LoRA matrix the same values in every variant (keyed by its canonical name): A as PEFT's
    kaiming-uniform bound 1/sqrt(fan_in), B small Gaussian (so the adapters take part in the forward and both
    A and B get gradients). Returns the number of tensors set. Call :func:`zero_lora_b` after the check."""
    import torch

    count = 0
    with torch.no_grad():
        for name, param in model.named_parameters():
            canon = canonical_lora_name(name)
            if canon is None:
                continue
            gen = torch.Generator(device="cpu").manual_seed(_name_seed(canon, seed))
            if canon.endswith("lora_A"):
                bound = 1.0 / math.sqrt(param.shape[1])
                values = (torch.rand(param.shape, generator=gen) * 2 - 1) * bound
            else:
                values = torch.randn(param.shape, generator=gen) * LORA_B_CHECK_STD
            param.copy_(values.to(device=param.device, dtype=param.dtype))
            count += 1
    return count


def zero_lora_b(model: Any) -> None:
    """Back to the LoRA starting point (B = 0: the adapted model equals the base)."""
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            canon = canonical_lora_name(name)
            if canon is not None and canon.endswith("lora_B"):
                param.zero_()


def gradient_sketch(model: Any, *, seed: int = 0) -> list[float]:
    """A fixed random projection (``SKETCH_DIM`` numbers per LoRA tensor, same projection in every variant) of the
    LoRA gradients. Linear, so ``|S(g) - S(g_ref)| / |S(g_ref)|`` estimates ``|g - g_ref| / |g_ref|`` to a few
    per cent without storing 60M-element gradients."""
    import torch

    grads: dict[str, Any] = {}
    for name, param in model.named_parameters():
        canon = canonical_lora_name(name)
        if canon is not None and param.grad is not None:
            grads[canon] = param.grad
    out: list[float] = []
    for canon in sorted(grads):
        g = grads[canon].detach().float().flatten()
        # drawn on the gradient's device (60M x 8 numbers would take seconds on the CPU); Philox on every CUDA GPU
        # gives the same numbers, so rows on different GPUs (and the Unsloth row) share the projection
        gen = torch.Generator(device=g.device).manual_seed(_name_seed(canon, seed + 1))
        proj = torch.randn(g.numel(), SKETCH_DIM, generator=gen, device=g.device) / math.sqrt(SKETCH_DIM)
        out.extend((g @ proj).tolist())
    return out


def compare_checks(check: Mapping[str, Any] | None, ref: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Loss and gradient agreement of a variant's identical-batch check with its reference's."""
    if not check or not ref or "loss" not in check or "loss" not in ref:
        return None
    out: dict[str, Any] = {
        "loss_rel_diff": abs(check["loss"] - ref["loss"]) / max(abs(ref["loss"]), 1e-12),
    }
    s, r = check.get("grad_sketch") or [], ref.get("grad_sketch") or []
    if s and len(s) == len(r):
        diff = math.sqrt(sum((a - b) ** 2 for a, b in zip(s, r)))
        norm = math.sqrt(sum(b * b for b in r))
        out["grad_rel_err"] = diff / max(norm, 1e-30)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Profiler events
# ---------------------------------------------------------------------------------------------------------------

ATTENTION_OPS = {
    "aten::_scaled_dot_product_flash_attention": "sdpa/flash",
    "aten::_scaled_dot_product_efficient_attention": "sdpa/mem_efficient",
    "aten::_scaled_dot_product_cudnn_attention": "sdpa/cudnn",
    "aten::_scaled_dot_product_attention_math": "sdpa/math",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "sdpa/flash_cpu",
    "aten::_flash_attention_forward": "flash_attn",
    "aten::_efficient_attention_forward": "sdpa/mem_efficient",
}


def attention_kernels(op_names: Iterable[str], attn_implementation: str) -> dict[str, int]:
    """Which attention path ran, from profiler op names: ``{"sdpa/mem_efficient": 34, ...}`` (calls). Without an
    SDPA op, ``eager`` runs matmul + softmax and ``flex_attention`` a compiled Triton kernel."""
    counts: dict[str, int] = {}
    flex = 0
    for name in op_names:
        kind = ATTENTION_OPS.get(name)
        if kind is not None:
            counts[kind] = counts.get(kind, 0) + 1
        elif "flex_attention" in name.lower():
            flex += 1
    if flex:
        counts["flex_attention"] = flex
    if not counts:
        counts[f"{attn_implementation} (no SDPA op)"] = 0
    return counts


# ---------------------------------------------------------------------------------------------------------------
# Scheduling variant subprocesses over GPU slots
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Job:
    """One variant subprocess. ``cmd`` runs with ``CUDA_VISIBLE_DEVICES`` set to the slot's GPU (if any)."""

    name: str
    cmd: list[str]
    timeout_s: float
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    # Filled by run_jobs:
    returncode: int | None = None
    seconds: float = 0.0
    slot: str | None = None
    timed_out: bool = False
    skipped: str | None = None


def tail(path: Path, chars: int = 3000) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return text[-chars:]


def run_jobs(
    jobs: Sequence[Job],
    slots: Sequence[str | None],
    *,
    deadline: float | None = None,
    on_done: Callable[[Job], None] | None = None,
    min_start_s: float = 60.0,
) -> None:
    """Run ``jobs`` in order, one per slot at a time (a slot is a GPU index or None = no GPU pinning). A job gets
    ``min(timeout_s, time left before deadline)``; a job that could not start with at least ``min_start_s`` left is
    marked skipped. A failing or hanging job never stops the others (its process group is killed at its timeout).
    ``on_done`` is called (under a lock) after each job, so results can be written as they come."""
    pending: queue.Queue[Job] = queue.Queue()
    for job in jobs:
        pending.put(job)
    lock = threading.Lock()

    def worker(slot: str | None) -> None:
        while True:
            try:
                job = pending.get_nowait()
            except queue.Empty:
                return
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left < min_start_s:
                job.skipped = f"not started: {max(left, 0):.0f} s left of the invocation's budget"
            else:
                timeout = job.timeout_s if left is None else min(job.timeout_s, left)
                _run_one(job, slot, timeout)
            if on_done is not None:
                with lock:
                    on_done(job)

    threads = [threading.Thread(target=worker, args=(slot,), daemon=True) for slot in slots]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _run_one(job: Job, slot: str | None, timeout: float) -> None:
    env = subprocess_env(**job.env)
    if slot is not None:
        env["CUDA_VISIBLE_DEVICES"] = slot
    else:
        # CPU rows share few cores: several OpenMP pools spinning against each other make tiny matmuls ~100x slower.
        env.setdefault("OMP_NUM_THREADS", "1")
    job.slot = slot
    job.log_path.parent.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    with open(job.log_path, "w", encoding="utf-8") as log:
        log.write(f"$ {' '.join(shlex.quote(c) for c in job.cmd)}\n")
        log.flush()
        proc = subprocess.Popen(
            job.cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=env, start_new_session=True
        )
        try:
            job.returncode = proc.wait(timeout=max(timeout, 1.0))
        except subprocess.TimeoutExpired:
            job.timed_out = True
            _kill_group(proc)
            job.returncode = proc.wait()
    job.seconds = round(time.monotonic() - began, 1)


def _kill_group(proc: subprocess.Popen[Any]) -> None:
    import signal

    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=15)
            return
        except subprocess.TimeoutExpired:
            continue


# ---------------------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------------------


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """A plain-text table; ``columns`` is ``[(key, header), ...]``; floats get sensible precision."""

    def fmt(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, bool):
            return "yes" if value else "no"
        if isinstance(value, float):
            if math.isnan(value):
                return "nan"
            if abs(value) >= 1000:
                return f"{value:,.0f}"
            if abs(value) >= 10:
                return f"{value:.1f}"
            if abs(value) >= 0.01 or value == 0:
                return f"{value:.2f}"
            return f"{value:.1e}"
        if isinstance(value, int):
            return f"{value:,}"
        return str(value)

    cells = [[fmt(row.get(key)) for key, _ in columns] for row in rows]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, (_, h) in enumerate(columns)]
    lines = [
        "  ".join(h.ljust(w) for (_, h), w in zip(columns, widths)),
        "  ".join("-" * w for w in widths),
    ]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# The SFT variant worker: one sft_qlora run through the real stage, observed by a callback
# ---------------------------------------------------------------------------------------------------------------


def sft_argv(recipe: str | None, overrides: Mapping[str, Any]) -> list[str]:
    """``--config RECIPE --field value ...`` for :func:`dischargesum.config.parse_config` (the user's path)."""
    argv: list[str] = ["--config", recipe] if recipe else []
    for key, value in overrides.items():
        if value is None:
            text = "none"
        elif isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, list | tuple):
            text = json.dumps(list(value))
        else:
            text = str(value)
        argv += [f"--{key}", text]
    return argv


def checkpointing_mode(cfg: Any) -> str:
    """``none`` / ``full`` / ``selective`` / ``offload`` from an SFTConfig (fields the stage may not have: off)."""
    if not getattr(cfg, "gradient_checkpointing", False):
        return "none"
    if getattr(cfg, "selective_checkpointing", False):
        return "selective"
    if getattr(cfg, "activation_offloading", False):
        return "offload"
    return "full"


def loss_group(completion_only: bool, lora_r: int, lora_alpha: int, targets: Sequence[str]) -> str:
    """Variants whose identical-batch checks are comparable: same loss definition and LoRA shape."""
    return f"{'completion' if completion_only else 'whole'}|r{lora_r}|a{lora_alpha}|{','.join(sorted(targets))}"


def _cuda_memory() -> dict[str, float]:
    import torch

    if not torch.cuda.is_available():
        return {}
    gib = 2**30
    return {
        "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / gib, 3),
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / gib, 3),
    }


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def check_batches(examples: Sequence[Mapping[str, Any]], *, per_device: int, flatten: bool, row_tokens: int | None):
    """Split the check examples into micro-batches as the variant would see them: ``per_device`` examples per
    padded batch, or (packing / padding-free: ``flatten``) consecutive examples up to ``per_device * row_tokens``
    tokens (packing) or ``per_device`` examples (padding-free) concatenated into one row."""
    batches: list[list[Mapping[str, Any]]] = []
    current: list[Mapping[str, Any]] = []
    budget = per_device * row_tokens if (flatten and row_tokens) else None
    used = 0
    for ex in examples:
        n = len(ex["input_ids"])
        full = len(current) >= per_device if budget is None else (current and used + n > budget)
        if full:
            batches.append(current)
            current, used = [], 0
        current.append(ex)
        used += n
    if current:
        batches.append(current)
    return batches


class SFTProbe:
    """Attached to the stage's trainer (``train(cfg, on_trainer_ready=probe.attach)``): before the first step it
    runs the identical-batch loss/gradient check and records which attention kernels run; then it times every
    optimizer step (CUDA-synchronised) and records peak GPU memory; optionally it profiles steps.

    The check: the first ``check_examples`` train examples, tokenized and labelled by the variant's own trainer
    (``_prepare_dataset``) and collated by its own collator into its micro-batch shapes, go through its
    ``compute_loss`` and backward, normalised by their total trained tokens (so any batching gives the same
    number). LoRA weights are first set identically in every variant (:func:`reinit_lora_for_check`; B small
    instead of 0 so the adapters take part), LoRA dropout is off during the check, and afterwards B is zeroed and
    the trainer's token counters restored, so training starts from the standard LoRA start (B = 0)."""

    def __init__(self, spec: Mapping[str, Any], cfg: Any) -> None:
        self.spec = spec
        self.cfg = cfg
        self.trainer: Any = None
        self.step_end_times: dict[int, float] = {}
        self.train_begin: float | None = None
        self.check: dict[str, Any] | None = None
        self.memory: dict[str, float] = {}
        self.facts: dict[str, Any] = {}
        self.profile: dict[str, Any] | None = None
        self._profiler: Any = None

    # -- wiring ------------------------------------------------------------------------------------------------
    def attach(self, trainer: Any) -> None:
        from transformers import TrainerCallback

        probe = self

        class _Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
                probe.on_train_begin()
                return control

            def on_step_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
                probe.on_step_begin(state.global_step)
                return control

            def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
                probe.on_step_end(state.global_step)
                return control

            def on_train_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
                probe.on_train_end()
                return control

        self.trainer = trainer
        trainer.add_callback(_Callback())

    # -- events ------------------------------------------------------------------------------------------------
    def on_train_begin(self) -> None:
        import torch

        t = self.trainer
        inner = getattr(t.data_collator, "inner", t.data_collator)
        self.facts = {
            "attn_implementation": getattr(t.model.config, "_attn_implementation", None),
            "collator": type(inner).__name__,
            "padding_free_collator": bool(getattr(inner, "padding_free", False)),
            "packing": bool(t.args.packing),
            "packing_length": t.args.max_length if t.args.packing else None,
            "gradient_checkpointing": bool(t.args.gradient_checkpointing),
            "gradient_checkpointing_kwargs": t.args.gradient_checkpointing_kwargs,
            "activation_offloading": bool(getattr(t.args, "activation_offloading", False)),
            "use_liger_kernel": bool(t.args.use_liger_kernel),
            "optim": str(t.args.optim),
            "trainable_parameters": sum(p.numel() for p in t.model.parameters() if p.requires_grad),
            "lora_param_dtype": next((str(p.dtype) for p in t.model.parameters() if p.requires_grad), None),
            "train_rows": len(t.train_dataset) if hasattr(t.train_dataset, "__len__") else None,
        }
        if self.spec.get("check_examples"):
            began = time.perf_counter()
            self.check = self._identical_batch_check(int(self.spec["check_examples"]))
            self.check["seconds"] = round(time.perf_counter() - began, 2)
        _sync()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self.train_begin = time.perf_counter()

    def on_step_begin(self, step: int) -> None:
        prof = self.spec.get("profiler")
        if prof and step == int(prof["start_after_step"]) and self._profiler is None:
            self._start_profiler()

    def on_step_end(self, step: int) -> None:
        _sync()
        self.step_end_times[step] = time.perf_counter()
        prof = self.spec.get("profiler")
        if prof and self._profiler is not None and step >= int(prof["start_after_step"]) + int(prof["steps"]):
            self._stop_profiler(step - int(prof["start_after_step"]))

    def on_train_end(self) -> None:
        _sync()
        self.memory = _cuda_memory()
        if self._profiler is not None:
            self._stop_profiler(None)

    # -- the identical-batch check -----------------------------------------------------------------------------
    def _identical_batch_check(self, k: int) -> dict[str, Any]:
        import torch
        from torch.profiler import ProfilerActivity, profile

        from dischargesum.training.sft import load_data_inputs, load_split

        t = self.trainer
        data = load_data_inputs(self.cfg)
        raw, _ids = load_split(data, "train", limit=k)
        tokenized = t._prepare_dataset(raw, t.processing_class, t.args, False, None, "train")
        examples = [
            {"input_ids": list(tokenized[i]["input_ids"]), "labels": list(tokenized[i]["labels"])}
            for i in range(len(tokenized))
        ]
        inner = getattr(t.data_collator, "inner", t.data_collator)
        flatten = bool(getattr(inner, "padding_free", False))
        batches = check_batches(
            examples,
            per_device=int(t.args.per_device_train_batch_size),
            flatten=flatten,
            row_tokens=int(t.args.max_length) if (flatten and t.args.packing and t.args.max_length) else None,
        )
        if flatten and not t.args.packing:  # padding-free without packing: per_device examples per row
            batches = check_batches(
                examples, per_device=int(t.args.per_device_train_batch_size), flatten=False, row_tokens=None
            )
        trained = sum(sum(1 for x in ex["labels"][1:] if x != -100) for ex in examples)
        model = t.model_wrapped if t.model_wrapped is not None else t.model
        saved_counts = (t._token_counts, getattr(t, "_total_train_tokens", None))
        saved_metrics = {key: list(v) for key, v in getattr(t, "_metrics", {}).get("train", {}).items()}
        reinit_lora_for_check(t.model)
        dropouts = [m for m in t.model.modules() if isinstance(m, torch.nn.Dropout) and m.training]
        for m in dropouts:
            m.eval()
        t.model.train()
        for m in dropouts:
            m.eval()
        loss_sum = 0.0
        op_names: list[str] = []
        for i, batch in enumerate(batches):
            inputs = t._prepare_inputs(t.data_collator(batch))
            use_profiler = i == 0
            ctx = profile(activities=[ProfilerActivity.CPU]) if use_profiler else None
            if ctx is not None:
                ctx.__enter__()
            with t.compute_loss_context_manager():
                loss = t.compute_loss(model, inputs, num_items_in_batch=trained)
            if ctx is not None:
                _sync()
                ctx.__exit__(None, None, None)
                op_names = [e.name for e in ctx.events()]
            t.accelerator.backward(loss)
            loss_sum += float(loss.detach().float().item())
        sketch = gradient_sketch(t.model)
        grad_norm = math.sqrt(sum(x * x for x in sketch))
        t.model.zero_grad(set_to_none=True)
        zero_lora_b(t.model)
        for m in dropouts:
            m.train()
        t._token_counts = saved_counts[0]
        if saved_counts[1] is not None:
            t._total_train_tokens = saved_counts[1]
        if hasattr(t, "_metrics"):
            t._metrics["train"].clear()
            t._metrics["train"].update(saved_metrics)
        kernels = attention_kernels(op_names, str(self.facts.get("attn_implementation")))
        return {
            "examples": len(examples),
            "micro_batches": len(batches),
            "tokens": sum(len(ex["input_ids"]) for ex in examples),
            "trained_tokens": trained,
            "loss": loss_sum,
            "grad_sketch": sketch,
            "grad_sketch_norm": grad_norm,
            "attention_kernels": kernels,
        }

    # -- profiler ----------------------------------------------------------------------------------------------
    def _start_profiler(self) -> None:
        import torch
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(ProfilerActivity.CUDA)
        _sync()
        self._profiler = profile(activities=activities, record_shapes=True)
        self._profiler.__enter__()
        self._profile_began = time.perf_counter()

    def _stop_profiler(self, steps: int | None) -> None:
        _sync()
        wall = time.perf_counter() - self._profile_began
        prof, self._profiler = self._profiler, None
        prof.__exit__(None, None, None)
        self.profile = summarize_profile(prof, wall_seconds=wall, steps=steps, lora_r=int(self.cfg.lora_r))
        trace = self.spec.get("profiler", {}).get("trace_path")
        if trace:
            prof.export_chrome_trace(str(trace))

    # -- result ------------------------------------------------------------------------------------------------
    def result(self, metrics_rows: Sequence[Mapping[str, Any]], warmup: int) -> dict[str, Any]:
        rows = {int(r["step"]): r for r in metrics_rows if "loss" in r and "tokens" in r}
        steps = []
        prev = self.train_begin
        for step in sorted(self.step_end_times):
            end = self.step_end_times[step]
            row = rows.get(step, {})
            steps.append(
                {
                    "step": step,
                    "seconds": round(end - prev, 4) if prev is not None else None,
                    "tokens": row.get("tokens"),
                    "trained_tokens": row.get("trained_tokens"),
                    "loss": row.get("loss"),
                }
            )
            prev = end
        measured = [s for s in steps if s["step"] > warmup]
        out: dict[str, Any] = {"steps": steps, "warmup_steps": warmup, "measured_steps": len(measured)}
        if measured and all(s["tokens"] is not None for s in measured):
            start = self.step_end_times.get(warmup, self.train_begin)
            seconds = self.step_end_times[measured[-1]["step"]] - (start if start is not None else 0.0)
            tokens = sum(int(s["tokens"]) for s in measured)
            trained = sum(int(s["trained_tokens"] or 0) for s in measured)
            out.update(
                tokens_per_s=round(tokens / seconds, 1),
                trained_tokens_per_s=round(trained / seconds, 1),
                measured_seconds=round(seconds, 3),
                measured_tokens=tokens,
                tokens_per_step=round(tokens / len(measured), 1),
                seconds_per_step=round(seconds / len(measured), 4),
            )
        out.update(self.memory)
        out["facts"] = self.facts
        out["check"] = self.check
        if self.profile is not None:
            out["profile"] = self.profile
        return out


def run_sft_variant(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Run one variant through ``dischargesum.training.sft.train`` and return its measurements (see SFTProbe)."""
    import shutil

    import torch

    from dischargesum.config import SFTConfig, parse_config
    from dischargesum.logging_utils import setup_logging
    from dischargesum.training import sft
    from dischargesum.training.metrics import read_metrics

    began = time.perf_counter()
    result: dict[str, Any] = {"name": spec["name"], "profile": spec["profile"]}
    cap = spec.get("memory_cap_gib")
    if cap and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        # Emulate a small card: the caching allocator refuses to hold more than `cap` GiB (OOM beyond it).
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap * 2**30 / total))
        result["memory_cap_gib"] = cap
    out_dir = Path(spec["overrides"]["output_dir"])
    if out_dir.exists():
        shutil.rmtree(out_dir)
    cfg = parse_config(SFTConfig, sft_argv(spec.get("recipe"), spec["overrides"]))
    setup_logging(cfg.log_level)
    result["config"] = cfg.to_dict()
    result["checkpointing"] = checkpointing_mode(cfg)
    result["completion_only_loss"] = bool(getattr(cfg, "completion_only_loss", True))
    result["group"] = loss_group(
        result["completion_only_loss"], cfg.lora_r, cfg.lora_alpha, list(cfg.lora_target_modules)
    )
    if torch.cuda.is_available():
        result["gpu"] = gpu_facts()[0]
    probe = SFTProbe(spec, cfg)
    # The stage's own trainer construction (sft.build_trainer: tokenizer, datasets with example checks, model per
    # the preflight plan, TRL SFTTrainer + peft, collator, callbacks); only the run manifest and final/ are left out.
    data = sft.load_data_inputs(cfg)
    _info, plan = sft.plan_training(cfg)
    result["plan"] = {
        "compute_dtype": plan.compute_dtype,
        "attn_implementation": plan.attn_implementation,
        "lora_dtype": plan.lora_dtype,
        "notes": list(plan.notes),
    }
    trainer = sft.build_trainer(cfg, data, plan, facts=sft.run_facts(cfg, data, plan, 1))
    probe.attach(trainer)
    trainer.train()
    rc = 0
    result["returncode"] = rc
    result.update(probe.result(read_metrics(out_dir), int(spec["warmup_steps"])))
    result["seconds_total"] = round(time.perf_counter() - began, 1)
    return result


# ---------------------------------------------------------------------------------------------------------------
# Profile summary
# ---------------------------------------------------------------------------------------------------------------

# Kernel-name patterns per category, tried in order (lower-case substring match).
KERNEL_CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("attention", ("flash", "fmha", "attention", "attn", "flex", "sdpa", "triton_tem_fused")),
    ("nf4 dequant / 4-bit matmul", ("dequant", "kgemm_4bit", "4bit", "nf4", "bitsandbytes", "kquantize")),
    ("lm head + loss", ("logprob", "cross_entropy", "crossentropy", "_forward_kernel", "_backward_kernel", "nll")),
    ("optimizer", ("adam", "foreach", "multi_tensor", "fused_adam", "optimizer")),
    ("copies / casts", ("memcpy", "memset", "copy", "cast", "convert", "to_copy", "fill")),
    ("matmul", ("gemm", "xmma", "cutlass", "nvjet", "wgmma", "matmul", "mm_", "sm90", "sm80", "ampere", "hopper")),
    (
        "norm / activation / elementwise",
        (
            "norm",
            "rms",
            "gelu",
            "geglu",
            "tanh",
            "elementwise",
            "vectorized",
            "reduce",
            "softmax",
            "rope",
            "rotary",
            "mul",
            "add",
            "pow",
            "mean",
            "triton_",
        ),
    ),
)


def kernel_category(name: str) -> str:
    low = name.lower()
    for category, patterns in KERNEL_CATEGORIES:
        if any(p in low for p in patterns):
            return category
    return "other"


def _op_category(name: str, shapes: str, lora_r: int) -> str | None:
    """Category of a CPU op from its name and input shapes (None: let its kernels' names decide)."""
    low = name.lower()
    if name in ATTENTION_OPS or "attention" in low:
        return "attention"
    if "bitsandbytes" in low or "dequant" in low or "4bit" in low:
        return "nf4 dequant / 4-bit matmul"
    if low in ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm"):
        dims = [int(x) for x in re.findall(r"\d+", shapes)]
        if lora_r in dims:
            return "lora matmul"
        if 262208 in dims or any(d >= 100_000 for d in dims):
            return "lm head + loss"
        return "matmul (base, dequantized weights)"
    if "logprob" in low or "cross_entropy" in low or "nll" in low:
        return "lm head + loss"
    if "adam" in low or "_foreach" in low or "optimizer" in low:
        return "optimizer"
    if low in (
        "aten::copy_",
        "aten::to",
        "aten::_to_copy",
        "aten::contiguous",
        "aten::clone",
        "aten::fill_",
        "aten::zero_",
        "aten::zeros",
        "aten::empty_like",
    ):
        return "copies / casts"
    return None


def summarize_profile(prof: Any, *, wall_seconds: float, steps: int | None, lora_r: int, top: int = 25) -> dict:
    """Device time by kernel (top ``top``), by category, and by CPU op (self device time, with input shapes);
    plus how busy the GPU was (sum of kernel time over wall time: gaps are host overhead or syncs). Without CUDA
    (CPU smoke runs) the ops' self CPU time stands in for device time."""
    from torch.autograd import DeviceType

    averages = list(prof.key_averages())
    has_cuda = any(getattr(e, "device_type", None) == DeviceType.CUDA for e in averages)
    kernels: dict[str, float] = {}
    for evt in averages:
        if getattr(evt, "device_type", None) == DeviceType.CUDA and evt.self_device_time_total > 0:
            kernels[evt.key] = kernels.get(evt.key, 0.0) + evt.self_device_time_total / 1e3
    ops: dict[tuple[str, str], float] = {}
    for evt in prof.key_averages(group_by_input_shape=True):
        if getattr(evt, "device_type", None) == DeviceType.CUDA:
            continue
        t = getattr(evt, "self_device_time_total", 0.0) if has_cuda else evt.self_cpu_time_total
        if t > 0:
            key = (evt.key, str(evt.input_shapes)[:200])
            ops[key] = ops.get(key, 0.0) + t / 1e3
    kernel_ms = sum(kernels.values()) if has_cuda else sum(ops.values())
    by_kernel_category: dict[str, float] = {}
    for name, ms in kernels.items():
        cat = kernel_category(name)
        by_kernel_category[cat] = by_kernel_category.get(cat, 0.0) + ms
    by_op_category: dict[str, float] = {}
    for (name, shapes), ms in ops.items():
        cat = _op_category(name, shapes, lora_r) or f"other ops ({kernel_category(name)})"
        by_op_category[cat] = by_op_category.get(cat, 0.0) + ms
    unattributed = kernel_ms - sum(ops.values())
    if has_cuda and unattributed > 0.01 * kernel_ms:
        # kernels launched outside any aten op (Triton kernels of Liger / TRL's LM head, called from Python)
        by_op_category["kernels outside aten ops (Triton: Liger, TRL LM head, ...)"] = unattributed

    def ranked(d: Mapping[Any, float]) -> list[tuple[Any, float]]:
        return sorted(d.items(), key=lambda kv: -kv[1])

    return {
        "time_basis": "cuda kernel time" if has_cuda else "cpu self time (no GPU)",
        "profiled_steps": steps,
        "wall_ms": round(wall_seconds * 1e3, 1),
        "kernel_ms": round(kernel_ms, 1),
        "gpu_busy_fraction": round(kernel_ms / max(wall_seconds * 1e3, 1e-9), 3),
        "by_category_kernel_names": [
            {"category": c, "ms": round(ms, 1), "share": round(ms / max(kernel_ms, 1e-9), 3)}
            for c, ms in ranked(by_kernel_category)
        ],
        "by_category_ops": [
            {"category": c, "ms": round(ms, 1), "share": round(ms / max(kernel_ms, 1e-9), 3)}
            for c, ms in ranked(by_op_category)
        ],
        "top_kernels": [
            {
                "kernel": k[:160],
                "ms": round(ms, 2),
                "share": round(ms / max(kernel_ms, 1e-9), 3),
                "category": kernel_category(k),
            }
            for k, ms in ranked(kernels)[:top]
        ],
        "top_ops": [
            {"op": name, "input_shapes": shapes, "ms": round(ms, 2), "share": round(ms / max(kernel_ms, 1e-9), 3)}
            for (name, shapes), ms in ranked(ops)[:top]
        ],
    }
