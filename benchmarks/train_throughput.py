"""QLoRA training throughput and memory on a random-initialised Gemma-3-4B text model: the seed configuration vs
our default recipe, one-lever ablations, the 8 GB recipe and (separately) Unsloth — through sft_qlora's real trainer.

On the GPU machine, from the repository root (one H100: ``--set core``, about 8 minutes; four GPUs of one host:
``--gpus 0,1,2,3`` runs one variant per GPU at a time and the default set becomes ``all``, about 8 minutes)::

    python benchmarks/train_throughput.py --out $OUT [--gpus 0,1,2,3] [--set core|ablation|all]
    # Unsloth, in its own process whose PYTHONPATH holds the Unsloth bundle (it reuses the model and data in
    # --work_dir when they are still there, keeps the main run's rows from --merge_with and adds `vs_unsloth`):
    python benchmarks/train_throughput.py --unsloth --merge_with benchmarks/results/<main run>.json --out $OUT

Sets: ``core`` = seed and recipe on both profiles, the 8 GB recipe (physionet), the recipe with every lever off
(the check's reference); ``ablation`` = the seed plus one lever at a time; ``all`` = both plus lever combinations
on the recipe and the 8 GB recipe with offloading. ``--variants`` picks rows by name or glob.

CPU check of the harness itself (tiny model, numbers meaningless; exercised by tests/integration)::

    python benchmarks/train_throughput.py --smoke --out /tmp/tt_smoke

What runs. One subprocess per (variant, data profile), each with a timeout, so a crash or hang costs only that
row. Each builds ``SFTConfig`` with ``parse_config`` from a recipe plus overrides — the seed configuration is
spelled out in :data:`SEED_FIELDS` — and trains through ``dischargesum.training.sft.build_trainer`` (the stage's
trainer: TRL SFTTrainer + peft + bitsandbytes NF4 + our checks and token accounting) for ``--warmup_steps`` +
``--measure_steps`` optimizer steps. A callback (``_common.SFTProbe``) times each optimizer step after a CUDA sync
and records peak memory; before the first step it runs the identical-batch check (below).

Numbers, per row:

* ``tokens_per_s``: real (non-pad) tokens per second over the measured steps (warm-up steps skipped), from the
  stage's own per-step token counts; ``trained_tokens_per_s``: tokens that carry loss.
* ``mfu``: tokens/s x useful FLOPs per token / datasheet bf16 peak (989 TFLOP/s for H100/H200 SXM). Useful FLOPs
  (``_common.flop_model``): frozen NF4 base 4N (forward + input gradients, no weight gradients; N = 3.21e9 matmul
  parameters of the 34 layers), LoRA 6N_lora, LM head 4 x 671M on the positions that carry loss, attention QK^T/AV
  forward x 3 for the real example lengths (causal, sliding window 1024 on 5 of 6 layers). ``hfu`` adds what
  gradient checkpointing recomputes (2N + 2N_lora, plus attention unless selective). ``ceiling_fraction`` divides
  HFU by the matmul rate measured on this GPU instead of the datasheet peak.
* ``peak_allocated_gib`` / ``peak_reserved_gib``: ``torch.cuda.max_memory_allocated/reserved`` during training
  (the check before it excluded). The 8 GB recipe runs with ``set_per_process_memory_fraction`` capped at 7.5 GiB,
  so it either fits or fails with OOM.
* ``check``: the first 8 train examples, tokenized, labelled and collated by the variant's own trainer into its
  own micro-batch shapes, go through its ``compute_loss`` + backward with identical LoRA weights (B small, not 0,
  so the adapters take part; LoRA dropout off during the check) and the loss normalised by their trained tokens:
  ``loss_rel_diff`` and ``grad_rel_err`` (a fixed random sketch of all LoRA gradients) against the reference row
  of the same loss definition and LoRA shape (``seed``, ``seed+completion_only``, ``recipe_plain``). ``math_ok``:
  loss within 1e-2 relative and gradients within 10% (bf16). ``attention`` names the kernel the check's forward
  ran (from the profiler's op names: sdpa/flash, sdpa/mem_efficient, sdpa/cudnn, sdpa/math, flex, eager).
* ``speedup``: tokens/s over the seed row's on the same profile; ``vs_unsloth``: over the Unsloth row's.

Data (``_common`` docstring): synthetic notes through prepare_data with a length-calibrated 4,096-token BPE
tokenizer (the Gemma tokenizer is not available offline): ``kaggle`` ≈ 1,000 tokens per example, ``physionet``
capped at 2,048. Results: ``<out>/train_throughput.json`` (device, date, versions, command, every row, ``speedup``,
``vs_unsloth``) and ``<out>/train_throughput_logs.txt`` (log tails of failed rows); the table is printed last.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common

REPO_ROOT = _common.REPO_ROOT
RESULT_NAME = "train_throughput.json"
LOG_NAME = "train_throughput_logs.txt"
DEFAULT_RECIPE = REPO_ROOT / "recipes" / "medgemma-4b" / "sft_qlora.yaml"
SMALL_GPU_RECIPE = REPO_ROOT / "recipes" / "medgemma-4b" / "sft_qlora_8gb.yaml"
SMALL_GPU_CAP_GIB = 7.5
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LOSS_TOLERANCE = 1e-2
GRAD_TOLERANCE = 0.10
CHECK_EXAMPLES = 8

# The seed prototype's training setup, field by field (not derived from our recipe, so recipe changes never leak
# into the baseline): NF4 + double quant, LoRA r32 on all 7 projections with dropout 0.05, batch 1 x accumulation 8,
# no packing, loss on the whole sequence, gradient checkpointing, default attention (sdpa), adamw_torch.
SEED_FIELDS: dict[str, Any] = {
    "load_in_4bit": True,
    "bnb_4bit_quant_type": "nf4",
    "bnb_4bit_use_double_quant": True,
    "precision": "auto",
    "attn_implementation": "auto",
    "lora_r": 32,
    "lora_alpha": 64,
    "lora_dropout": 0.05,
    "lora_target_modules": LORA_TARGETS,
    "per_device_train_batch_size": 1,
    "gradient_accumulation_steps": 8,
    "learning_rate": 2e-4,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.03,
    "optim": "adamw_torch",
    "gradient_checkpointing": True,
    "packing": False,
    "padding_free": False,
    "use_liger_kernel": False,
    "completion_only_loss": False,
    "max_seq_length": None,
    "fused_lora": False,
}
# The recipe with every speed lever off (plain path, same loss and LoRA shape): the reference its check compares to.
PLAIN_FIELDS: dict[str, Any] = {
    "packing": False,
    "padding_free": False,
    "use_liger_kernel": False,
    "per_device_train_batch_size": 1,
    "gradient_accumulation_steps": 8,
    "attn_implementation": "auto",
    "optim": "adamw_torch",
    "gradient_checkpointing": True,
    "selective_checkpointing": False,
    "activation_offloading": False,
    "compile_layers": False,
    "fused_lora": False,
    "max_seq_length": None,
}
# The medgemma recipe as it was before flex_attention and the fused LoRA node became its defaults (packing + Liger,
# sdpa, PEFT's LoRA forward): the 0.41x-Unsloth row of issue 13, kept to show what each lever adds.
PREVIOUS_RECIPE_FIELDS: dict[str, Any] = {"attn_implementation": "sdpa", "fused_lora": False}
# The recipe's step (32 packed rows of 2048) as 4 micro-batches of 8 rows instead of 8 of 4.
MICRO_BATCH_8: dict[str, Any] = {"per_device_train_batch_size": 8, "gradient_accumulation_steps": 4}
# Smoke runs check the harness, not NF4: bitsandbytes' CPU 4-bit path is slow (sft's own tests cover it).
SMOKE_FIELDS: dict[str, Any] = {"load_in_4bit": False}
# Settings that cannot run on a CPU; smoke runs turn them off in recipe-based rows.
CPU_SAFE_FIELDS: dict[str, Any] = {
    "use_liger_kernel": False,
    "compile_layers": False,
    "optim": "adamw_torch",
    "activation_offloading": False,
    "attn_implementation": "auto",
}


@dataclass(frozen=True)
class Variant:
    name: str
    base: str  # seed | recipe | recipe_8gb | unsloth
    lever: str
    overrides: dict[str, Any] = field(default_factory=dict)
    profiles: tuple[str, ...] = ("kaggle",)
    sets: tuple[str, ...] = ("ablation", "all")
    needs_cuda: bool = False
    memory_cap_gib: float | None = None


# In priority order: with a time budget, the first rows run first.
VARIANTS: tuple[Variant, ...] = (
    Variant(
        "seed",
        "seed",
        "seed configuration",
        profiles=("kaggle", "physionet"),
        sets=("core", "ablation", "all", "smoke"),
    ),
    Variant("recipe", "recipe", "our default recipe", profiles=("kaggle", "physionet"), sets=("core", "all", "smoke")),
    Variant(
        "recipe_8gb",
        "recipe_8gb",
        f"8 GB recipe (capped at {SMALL_GPU_CAP_GIB} GiB)",
        profiles=("physionet",),
        sets=("core", "all"),
        memory_cap_gib=SMALL_GPU_CAP_GIB,
    ),
    Variant(
        "recipe_prev",
        "recipe",
        "the previous default recipe (packing + Liger, sdpa, PEFT LoRA forward)",
        PREVIOUS_RECIPE_FIELDS,
        profiles=("kaggle", "physionet"),
        sets=("core", "all"),
    ),
    Variant(
        "recipe_prev+flex",
        "recipe",
        "previous recipe + flex_attention (PEFT LoRA forward)",
        {"attn_implementation": "flex_attention", "fused_lora": False},
        sets=("core", "all"),
        needs_cuda=True,
    ),
    Variant(
        "recipe+fused_lora",
        "recipe",
        "recipe (flex_attention) + fused LoRA node",
        {"fused_lora": True},
        sets=("core", "all"),
        needs_cuda=True,
    ),
    Variant(
        "recipe_prev+fused_lora",
        "recipe",
        "previous recipe + fused LoRA node (sdpa)",
        {"attn_implementation": "sdpa", "fused_lora": True},
        sets=("all",),
    ),
    Variant(
        "recipe_8gb_prev",
        "recipe_8gb",
        f"previous 8 GB recipe (sdpa, PEFT LoRA forward; capped at {SMALL_GPU_CAP_GIB} GiB)",
        PREVIOUS_RECIPE_FIELDS,
        profiles=("physionet",),
        sets=("core", "all"),
        memory_cap_gib=SMALL_GPU_CAP_GIB,
    ),
    Variant("recipe_plain", "recipe", "recipe, every speed lever off (reference)", PLAIN_FIELDS, sets=("core", "all")),
    # Lever combinations on top of the recipe (packing + Liger): what the default recipe should become.
    Variant(
        "recipe+compile",
        "recipe",
        "recipe + torch.compile per decoder layer",
        {"compile_layers": True},
        sets=("all",),
        needs_cuda=True,
    ),
    Variant(
        "recipe+mb8",
        "recipe",
        "recipe with micro-batch 8 x 2048 packed tokens, accumulation 4 (same step)",
        {**MICRO_BATCH_8, "fused_lora": True},
        profiles=("kaggle", "physionet"),
        sets=("all",),
    ),
    Variant(
        "recipe+static",
        "recipe",
        "recipe + static packed shape (each micro-batch's row padded to 4 x 2048: flex_attention compiles once)",
        {"static_packed_shape": True},
        profiles=("kaggle", "physionet"),
        sets=("all",),
    ),
    Variant(
        "recipe+mb8+static",
        "recipe",
        "recipe, micro-batch 8 x 2048, accumulation 4, static packed shape (row padded to 8 x 2048)",
        {**MICRO_BATCH_8, "static_packed_shape": True},
        profiles=("kaggle", "physionet"),
        sets=("all",),
    ),
    Variant(
        "recipe+mb8+offload",
        "recipe",
        "recipe, micro-batch 8 x 2048 packed tokens, accumulation 4, activation offloading (memory back to ~recipe)",
        {
            **MICRO_BATCH_8,
            "activation_offloading": True,
            "fused_lora": True,
        },
        profiles=("kaggle", "physionet"),
        sets=("all",),
        needs_cuda=True,
    ),
    Variant(
        "recipe+mb8+offload+compile",
        "recipe",
        "recipe, micro-batch 8, accumulation 4, activation offloading, torch.compile per decoder layer",
        {
            **MICRO_BATCH_8,
            "activation_offloading": True,
            "compile_layers": True,
            "fused_lora": True,
        },
        profiles=("kaggle", "physionet"),
        sets=("all",),
        needs_cuda=True,
    ),
    Variant(
        "recipe+mb8+compile",
        "recipe",
        "recipe, micro-batch 8, accumulation 4, torch.compile per layer",
        {**MICRO_BATCH_8, "compile_layers": True},
        sets=("all",),
        needs_cuda=True,
    ),
    Variant(
        "recipe+selective_ckpt",
        "recipe",
        "recipe + selective checkpointing (keep attention)",
        {"selective_checkpointing": True},
        sets=("all",),
    ),
    Variant(
        "recipe+packing+liger",
        "recipe",
        "recipe + packing + Liger",
        {"packing": True, "use_liger_kernel": True},
        sets=("all",),
        needs_cuda=True,
    ),
    Variant("recipe+packing", "recipe", "recipe + packing", {"packing": True}, sets=("all",)),
    Variant(
        "recipe+packing+liger+compile",
        "recipe",
        "recipe + packing + Liger + torch.compile per layer",
        {"packing": True, "use_liger_kernel": True, "compile_layers": True},
        sets=("all",),
        needs_cuda=True,
    ),
    Variant(
        "recipe+packing+liger+flex",
        "recipe",
        "recipe + packing + Liger + flex_attention",
        {"packing": True, "use_liger_kernel": True, "attn_implementation": "flex_attention"},
        sets=("all",),
        needs_cuda=True,
    ),
    Variant("seed+completion_only", "seed", "loss on the summary only", {"completion_only_loss": True}),
    Variant("seed+liger", "seed", "Liger kernels (RMSNorm, GeGLU, RoPE)", {"use_liger_kernel": True}, needs_cuda=True),
    Variant(
        "seed+packing", "seed", "packing (bfd, padding-free rows of 2048)", {"packing": True}, sets=("all", "smoke")
    ),
    Variant(
        "seed+microbatch_8k",
        "seed",
        "packed micro-batch of 8192 tokens, no accumulation",
        {"packing": True, "max_seq_length": 8192, "gradient_accumulation_steps": 1},
    ),
    Variant("seed+dropout0", "seed", "LoRA dropout 0", {"lora_dropout": 0.0}),
    Variant(
        "seed+selective_ckpt", "seed", "selective checkpointing (keep attention)", {"selective_checkpointing": True}
    ),
    Variant(
        "seed+offload_ckpt",
        "seed",
        "checkpointing + activation offloading to CPU",
        {"activation_offloading": True},
        needs_cuda=True,
    ),
    Variant("seed+no_ckpt", "seed", "no gradient checkpointing", {"gradient_checkpointing": False}),
    Variant("seed+compile", "seed", "torch.compile of each decoder layer", {"compile_layers": True}, needs_cuda=True),
    Variant(
        "seed+packing+flex",
        "seed",
        "packing + flex_attention",
        {"packing": True, "attn_implementation": "flex_attention"},
        needs_cuda=True,
    ),
    Variant(
        "seed+padding_free_b8",
        "seed",
        "padding-free micro-batch of 8 examples",
        {"padding_free": True, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1},
    ),
    Variant(
        "seed+microbatch_16k",
        "seed",
        "packed micro-batch of 16384 tokens, no accumulation",
        {"packing": True, "max_seq_length": 16384, "gradient_accumulation_steps": 1},
    ),
    Variant("seed+fused_adamw", "seed", "optimizer adamw_torch_fused", {"optim": "adamw_torch_fused"}),
    Variant(
        "seed+paged_adamw_8bit", "seed", "optimizer paged_adamw_8bit", {"optim": "paged_adamw_8bit"}, needs_cuda=True
    ),
    Variant(
        "recipe_8gb+offload",
        "recipe_8gb",
        "8 GB recipe + activation offloading",
        {"activation_offloading": True},
        profiles=("physionet",),
        sets=("all",),
        needs_cuda=True,
        memory_cap_gib=SMALL_GPU_CAP_GIB,
    ),
    Variant(
        "unsloth",
        "unsloth",
        "Unsloth FastLanguageModel, dropout 0, 'unsloth' checkpointing",
        profiles=("kaggle", "physionet"),
        sets=("unsloth",),
    ),
)
# Check references, in order of preference, per loss group (first one that ran on the same profile).
REFERENCE_ORDER = ("seed", "seed+completion_only", "recipe_plain", "recipe")


# ---------------------------------------------------------------------------------------------------------------
# Worker side (one variant, in its own process)
# ---------------------------------------------------------------------------------------------------------------


def run_unsloth_variant(spec: dict[str, Any]) -> dict[str, Any]:
    """Unsloth on the same tokens (our stage's tokenization, exported by the prepare step): FastLanguageModel NF4,
    LoRA r/alpha as our recipe on all 7 projections, dropout 0, ``use_gradient_checkpointing="unsloth"``, a plain
    step loop (AdamW, grad clip 1.0), micro-batches of ``batch`` examples padded to the longest after grouping by
    length within windows of 8 batches (Unsloth has no packing in this loop), completion-only labels."""
    # isort: off
    import unsloth  # noqa: F401  (first: it patches transformers, trl and peft when imported before them)
    from unsloth import FastLanguageModel

    # isort: on
    import random

    import torch

    began = time.perf_counter()
    result: dict[str, Any] = {"name": spec["name"], "profile": spec["profile"], "completion_only_loss": True}
    cuda = torch.cuda.is_available()
    if cuda:
        result["gpu"] = _common.gpu_facts()[0]
    data = json.loads(Path(spec["tokens_path"]).read_text(encoding="utf-8"))
    examples = list(zip(data["input_ids"], data["completion_start"]))
    kwargs: dict[str, Any] = dict(
        model_name=spec["model_dir"],
        max_seq_length=int(spec["max_seq_length"]),
        dtype=torch.bfloat16,
        load_in_4bit=True,
    )
    try:
        model, _tok = FastLanguageModel.from_pretrained(**kwargs, local_files_only=True)
    except TypeError:
        model, _tok = FastLanguageModel.from_pretrained(**kwargs)
    model = FastLanguageModel.get_peft_model(
        model,
        r=int(spec["lora_r"]),
        lora_alpha=int(spec["lora_alpha"]),
        lora_dropout=0.0,
        target_modules=LORA_TARGETS,
        bias="none",
        use_gradient_checkpointing="unsloth",
        random_state=0,
        max_seq_length=int(spec["max_seq_length"]),
    )
    FastLanguageModel.for_training(model)
    result["group"] = _common.loss_group(True, int(spec["lora_r"]), int(spec["lora_alpha"]), LORA_TARGETS)
    result["checkpointing"] = "offload"
    device = next(p.device for p in model.parameters() if p.requires_grad)
    pad_id = 0

    def trained_count(ex: tuple[list[int], int]) -> int:
        ids, start = ex
        return max(len(ids) - max(start, 1), 0)

    def collate(batch: list[tuple[list[int], int]]) -> dict[str, Any]:
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, (ids, start) in enumerate(batch):
            t = torch.tensor(ids, dtype=torch.long)
            input_ids[i, : len(ids)] = t
            mask[i, : len(ids)] = 1
            labels[i, start : len(ids)] = t[start:]
        return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}

    batch_size = int(spec["batch_size"])
    # identical-batch check (same examples, same LoRA values as our rows)
    check = examples[: int(spec["check_examples"])]
    total_trained = sum(trained_count(ex) for ex in check)
    _common.reinit_lora_for_check(model)
    model.train()
    loss_sum = 0.0
    for i in range(0, len(check), batch_size):
        mb = check[i : i + batch_size]
        n_mb = sum(trained_count(ex) for ex in mb)
        out = model(**collate(mb))
        scaled = out.loss * (n_mb / total_trained)
        scaled.backward()
        loss_sum += float(scaled.detach().float().item())
    result["check"] = {
        "examples": len(check),
        "tokens": sum(len(ids) for ids, _ in check),
        "trained_tokens": total_trained,
        "loss": loss_sum,
        "grad_sketch": _common.gradient_sketch(model),
        "attention_kernels": {"unsloth": 0},
    }
    model.zero_grad(set_to_none=True)
    _common.zero_lora_b(model)

    # training
    rng = random.Random(0)
    order = list(range(len(examples)))
    rng.shuffle(order)
    window = batch_size * 8
    batches: list[list[tuple[list[int], int]]] = []
    for w in range(0, len(order), window):
        chunk = sorted((examples[j] for j in order[w : w + window]), key=lambda ex: -len(ex[0]))
        batches += [chunk[k : k + batch_size] for k in range(0, len(chunk), batch_size)]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0)
    grad_accum = int(spec["grad_accum"])
    total_steps = int(spec["warmup_steps"]) + int(spec["measure_steps"])
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    steps = []
    prev = time.perf_counter()
    cursor = 0
    for step in range(1, total_steps + 1):
        tokens = trained = 0
        loss_val = 0.0
        for _ in range(grad_accum):
            mb = batches[cursor % len(batches)]
            cursor += 1
            inputs = collate(mb)
            out = model(**inputs)
            (out.loss / grad_accum).backward()
            tokens += int(inputs["attention_mask"].sum())
            trained += sum(trained_count(ex) for ex in mb)
            loss_val += float(out.loss.detach()) / grad_accum
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        steps.append(
            {
                "step": step,
                "seconds": round(now - prev, 4),
                "tokens": tokens,
                "trained_tokens": trained,
                "loss": loss_val,
            }
        )
        prev = now
    warm = int(spec["warmup_steps"])
    measured = [s for s in steps if s["step"] > warm]
    seconds = sum(s["seconds"] for s in measured)
    result.update(
        steps=steps,
        warmup_steps=warm,
        measured_steps=len(measured),
        tokens_per_s=round(sum(s["tokens"] for s in measured) / seconds, 1),
        trained_tokens_per_s=round(sum(s["trained_tokens"] for s in measured) / seconds, 1),
        measured_seconds=round(seconds, 3),
        tokens_per_step=round(sum(s["tokens"] for s in measured) / len(measured), 1),
        peak_allocated_gib=round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None,
        peak_reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 3) if cuda else None,
        config={
            "batch_size": batch_size,
            "grad_accum": grad_accum,
            "lora_r": spec["lora_r"],
            "lora_alpha": spec["lora_alpha"],
            "max_seq_length": spec["max_seq_length"],
        },
        seconds_total=round(time.perf_counter() - began, 1),
    )
    return result


def worker_main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    result_path = Path(spec["result_path"])
    try:
        if spec["base"] == "unsloth":
            result = run_unsloth_variant(spec)
        else:
            result = _common.run_sft_variant(spec)
        result["status"] = "ok"
        _common.write_json(result_path, result)
        return 0
    except BaseException as exc:  # recorded for the parent: one failing variant never stops the others
        error = {
            "name": spec.get("name"),
            "profile": spec.get("profile"),
            "status": "failed",
            "error": f"{type(exc).__name__}: {str(exc)[:2000]}",
            "traceback": traceback.format_exc()[-6000:],
        }
        if "out of memory" in str(exc).lower() or type(exc).__name__ == "OutOfMemoryError":
            error["status"] = "oom"
        _common.write_json(result_path, error)
        traceback.print_exc()
        return 1


def prepare_main(spec_path: str) -> int:
    """Build (or reuse) tokenizer, model and datasets; measure the matmul ceiling; write the prepare record."""
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    from dischargesum.logging_utils import setup_logging

    setup_logging("info")
    record = prepare_inputs(spec)
    record["spec"] = spec
    _common.write_json(Path(spec["record_path"]), record)
    return 0


def prepare_inputs(spec: dict[str, Any]) -> dict[str, Any]:
    began = time.perf_counter()
    work = Path(spec["work_dir"])
    work.mkdir(parents=True, exist_ok=True)
    smoke = spec["model_kind"] == "tiny"
    if spec.get("model_dir"):
        model_dir = Path(spec["model_dir"])
        tokenizer_dir = model_dir
    elif smoke:
        model_dir = _common.build_model(work, kind="tiny")
        tokenizer_dir = model_dir
    else:
        tokenizer_dir = _common.build_bench_tokenizer(work / "tokenizer")
        model_dir = _common.build_model(work, kind="gemma3-4b", tokenizer_dir=tokenizer_dir)
    model_config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    record: dict[str, Any] = {
        "model_dir": str(model_dir),
        "tokenizer_dir": str(tokenizer_dir),
        "model_config": {
            k: model_config.get(k)
            for k in (
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "head_dim",
                "vocab_size",
                "sliding_window",
                "layer_types",
            )
        },
        "datasets": {},
    }
    workers = min(8, max((os.cpu_count() or 2) // 2, 1)) if not smoke else 0
    for profile in spec["profiles"]:
        ds = _common.build_dataset(
            work, profile=profile, tokenizer_dir=tokenizer_dir, rows=int(spec["rows"]), num_workers=workers
        )
        tok = _common.tokenized_train_examples(ds, tokenizer_dir)
        lengths = [len(x) for x in tok["input_ids"]]
        trained = [max(n - max(s, 1), 0) for n, s in zip(lengths, tok["completion_start"])]
        tokens_path = ds / "bench_tokens.json"
        _common.write_json(tokens_path, tok)
        fm = _common.flop_model(model_config, lengths, trained, lora_r=1)
        record["datasets"][profile] = {
            "dataset_dir": str(ds),
            "tokens_path": str(tokens_path),
            "lengths": _common.length_distribution(lengths, trained),
            "flops": {
                "base_matmul_params": fm.base_matmul_params,
                "lm_head_params": fm.lm_head_params,
                "lora_params_per_rank": fm.lora_params,
                "attention_fwd_flops_per_token": round(fm.attention_fwd_flops_per_token),
                "trained_fraction": round(fm.trained_fraction, 4),
            },
        }
    record["gpus"] = _common.gpu_facts()
    record["matmul_tflops_measured"] = _common.measure_matmul_tflops()
    record["prepare_seconds"] = round(time.perf_counter() - began, 1)
    return record


# ---------------------------------------------------------------------------------------------------------------
# Orchestrator side
# ---------------------------------------------------------------------------------------------------------------


def select_jobs(args: argparse.Namespace, cuda: bool, stage_fields: set[str]) -> list[tuple[Variant, str, str | None]]:
    """``(variant, profile, skip_reason)`` rows in priority order."""
    if args.unsloth:
        wanted_set = "unsloth"
    elif args.smoke:
        wanted_set = "smoke"
    else:
        wanted_set = args.set
    names = [n.strip() for n in args.variants.split(",")] if args.variants else None
    profiles = ["tiny"] if args.smoke else [p.strip() for p in args.profiles.split(",")]
    rows = []
    for v in VARIANTS:
        if names is not None:
            if not any(fnmatch.fnmatch(v.name, pat) for pat in names):
                continue
            if (v.base == "unsloth") != bool(args.unsloth):
                continue
        elif wanted_set not in v.sets:
            continue
        for profile in v.profiles if not args.smoke else ("tiny",):
            if profile not in profiles:
                continue
            reason = None
            if v.needs_cuda and not cuda:
                reason = "needs a CUDA GPU"
            missing = sorted(k for k in v.overrides if k not in stage_fields)
            if v.base == "seed":
                missing += sorted(k for k in SEED_FIELDS if k not in stage_fields)
            if missing and v.base != "unsloth":
                reason = f"the sft stage has no field(s) {', '.join(missing)}"
            if v.base == "recipe_8gb" and not SMALL_GPU_RECIPE.is_file():
                reason = f"{SMALL_GPU_RECIPE.relative_to(REPO_ROOT)} does not exist"
            if v.base == "recipe" and not Path(args.recipe).is_file():
                reason = f"{args.recipe} does not exist"
            rows.append((v, profile, reason))
    return rows


def variant_spec(
    v: Variant, profile: str, args: argparse.Namespace, prep: dict[str, Any], work: Path, cuda: bool
) -> dict[str, Any]:
    key = f"{v.name}__{profile}".replace("+", "_")
    ds = prep["datasets"][profile]
    spec: dict[str, Any] = {
        "name": v.name,
        "profile": profile,
        "base": v.base,
        "lever": v.lever,
        "warmup_steps": args.warmup_steps,
        "measure_steps": args.measure_steps,
        "check_examples": args.check_examples,
        "result_path": str(work / "results" / f"{key}.json"),
        "memory_cap_gib": v.memory_cap_gib if cuda else None,
    }
    if v.base == "unsloth":
        spec.update(
            model_dir=prep["model_dir"],
            tokens_path=ds["tokens_path"],
            max_seq_length=_common.PROFILES[profile]["max_seq_length"],
            lora_r=args.unsloth_lora_r,
            lora_alpha=args.unsloth_lora_alpha,
            batch_size=args.unsloth_batch,
            grad_accum=args.unsloth_grad_accum,
        )
        return spec
    common = {
        "output_dir": str(work / "runs" / key),
        "dataset_dir": ds["dataset_dir"],
        "model_name_or_path": prep["model_dir"],
        "max_steps": args.warmup_steps + args.measure_steps,
        "save_steps": 1_000_000,
        "logging_steps": 1,
        "eval_steps": 0,
        "resume_from_checkpoint": "none",
        "log_note_ids": False,
        "check_base_unchanged": False,
        "seed": 0,
    }
    if v.base == "seed":
        recipe = None
        overrides = {**SEED_FIELDS, **v.overrides}
    else:
        recipe = str(SMALL_GPU_RECIPE if v.base == "recipe_8gb" else Path(args.recipe))
        overrides = dict(v.overrides)
        if not cuda:
            overrides = {**overrides, **CPU_SAFE_FIELDS}
    if args.smoke:
        overrides = {**overrides, **SMOKE_FIELDS}
    spec["recipe"] = recipe
    spec["overrides"] = {**overrides, **common}
    return spec


def _mfu(row: dict[str, Any], prep: dict[str, Any], matmul: float | None, peak: float | None) -> None:
    ds = prep["datasets"].get(row.get("profile", ""))
    tps = row.get("tokens_per_s")
    if not ds or not tps:
        return
    f = ds["flops"]
    cfg = row.get("config") or {}
    r = int(cfg.get("lora_r", 32))
    fm = _common.FlopModel(
        base_matmul_params=int(f["base_matmul_params"]),
        lm_head_params=int(f["lm_head_params"]),
        lora_params=int(f["lora_params_per_rank"]) * r,
        attention_fwd_flops_per_token=float(f["attention_fwd_flops_per_token"]),
        trained_fraction=float(f["trained_fraction"]),
    )
    per = fm.per_token(
        completion_only=bool(row.get("completion_only_loss", True)), checkpointing=row.get("checkpointing", "full")
    )
    row["flops_per_token"] = {k: round(v / 1e9, 3) for k, v in per.items()}  # GFLOP
    if peak:
        row["mfu"] = round(tps * per["useful"] / (peak * 1e12), 4)
        row["hfu"] = round(tps * per["executed"] / (peak * 1e12), 4)
    if matmul:
        row["ceiling_fraction"] = round(tps * per["executed"] / (matmul * 1e12), 4)


def summarize(rows: list[dict[str, Any]], prep: dict[str, Any]) -> dict[str, Any]:
    """Fill per-row comparisons (speedup, vs_unsloth, check vs reference, MFU) and the top-level ratio maps."""
    device = (prep.get("gpus") or [{}])[0].get("name", "cpu")
    peak = _common.peak_bf16_tflops(device)
    matmul = prep.get("matmul_tflops_measured")
    ok = {(r["name"], r["profile"]): r for r in rows if r.get("status") == "ok"}
    speedup: dict[str, float] = {}
    vs_unsloth: dict[str, float] = {}
    for row in rows:
        if row.get("status") != "ok":
            continue
        _mfu(row, prep, matmul, peak)
        key = f"{row['name']}/{row['profile']}"
        seed = ok.get(("seed", row["profile"]))
        if seed and seed.get("tokens_per_s") and row.get("tokens_per_s"):
            row["speedup"] = round(row["tokens_per_s"] / seed["tokens_per_s"], 3)
            speedup[key] = row["speedup"]
        uns = ok.get(("unsloth", row["profile"]))
        if uns and uns.get("tokens_per_s") and row.get("tokens_per_s"):
            row["vs_unsloth"] = round(row["tokens_per_s"] / uns["tokens_per_s"], 3)
            vs_unsloth[key] = row["vs_unsloth"]
        ref = next(
            (
                ok[(name, row["profile"])]
                for name in REFERENCE_ORDER
                if (name, row["profile"]) in ok
                and ok[(name, row["profile"])].get("group") == row.get("group")
                and (ok[(name, row["profile"])].get("check") or {}).get("loss") is not None
            ),
            None,
        )
        check = row.get("check") or {}
        if ref is not None and check:
            cmp = _common.compare_checks(check, ref.get("check"))
            if cmp is not None:
                cmp["reference"] = ref["name"]
                cmp["math_ok"] = cmp["loss_rel_diff"] <= LOSS_TOLERANCE and cmp.get("grad_rel_err", 0.0) <= (
                    GRAD_TOLERANCE
                )
                check["vs_reference"] = cmp
    return {"speedup": speedup, "vs_unsloth": vs_unsloth, "peak_bf16_tflops": peak, "matmul_tflops_measured": matmul}


TABLE_COLUMNS = (
    ("name", "variant"),
    ("profile", "profile"),
    ("status", "status"),
    ("tokens_per_s", "tok/s"),
    ("speedup", "x seed"),
    ("vs_unsloth", "x unsloth"),
    ("mfu", "MFU"),
    ("peak_allocated_gib", "peak GiB"),
    ("peak_reserved_gib", "reserved"),
    ("loss_rel_diff", "loss diff"),
    ("grad_rel_err", "grad diff"),
    ("reference", "vs"),
    ("attention", "attention"),
)


def table_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        check = r.get("check") or {}
        cmp = check.get("vs_reference") or {}
        kernels = check.get("attention_kernels") or {}
        status = r.get("status")
        if status == "skipped":
            status = "skipped"
        elif cmp and not cmp.get("math_ok", True):
            status = "ok, MATH DIFFERS"
        out.append(
            {
                **r,
                "status": status,
                "loss_rel_diff": cmp.get("loss_rel_diff"),
                "grad_rel_err": cmp.get("grad_rel_err"),
                "reference": cmp.get("reference"),
                "attention": "+".join(sorted(kernels)) if kernels else None,
            }
        )
    return out


def write_outputs(out_dir: Path, payload: dict[str, Any], logs: dict[str, str], earlier_logs: str = "") -> None:
    _common.write_json(out_dir / RESULT_NAME, payload)
    text = earlier_logs + "".join(f"===== {k} =====\n{v}\n" for k, v in logs.items())
    (out_dir / LOG_NAME).write_text(text or "no failed rows\n", encoding="utf-8")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=False, default=str(REPO_ROOT / "benchmarks" / "results"), help="result dir")
    p.add_argument("--work_dir", default=None, help="model/data/run scratch (default /tmp/dischargesum_bench)")
    p.add_argument("--gpus", default=None, help="comma-separated GPU indices, one variant per GPU at a time")
    p.add_argument(
        "--set",
        default="auto",
        choices=("auto", "core", "ablation", "all"),
        help="auto: core on 1-2 GPUs, all on 3 or more",
    )
    p.add_argument("--variants", default=None, help="comma-separated names or globs (overrides --set)")
    p.add_argument("--profiles", default="kaggle,physionet")
    p.add_argument("--recipe", default=str(DEFAULT_RECIPE), help="the default recipe rows use")
    p.add_argument("--rows", type=int, default=256, help="synthetic rows per profile")
    # The identical-batch check runs a forward/backward before step 1, so one warm-up step is enough.
    p.add_argument("--warmup_steps", type=int, default=1)
    p.add_argument("--measure_steps", type=int, default=3)
    p.add_argument("--check_examples", type=int, default=CHECK_EXAMPLES)
    p.add_argument("--budget_s", type=float, default=540.0, help="whole invocation, prepare included")
    p.add_argument("--variant_timeout_s", type=float, default=300.0)
    p.add_argument("--smoke", action="store_true", help="CPU harness check on the tiny model")
    p.add_argument("--model_dir", default=None, help="smoke only: an existing tiny model directory")
    p.add_argument("--cpu_slots", type=int, default=2, help="parallel variants without GPUs (smoke)")
    p.add_argument("--unsloth", action="store_true", help="run only the Unsloth rows (its own environment)")
    p.add_argument(
        "--merge_with",
        default=None,
        help="an earlier train_throughput.json whose rows of the other kind (main / Unsloth) are kept",
    )
    p.add_argument("--unsloth_batch", type=int, default=8)
    p.add_argument("--unsloth_grad_accum", type=int, default=1)
    p.add_argument("--unsloth_lora_r", type=int, default=32)
    p.add_argument("--unsloth_lora_alpha", type=int, default=64)
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_prepare", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.warmup_steps, args.measure_steps = min(args.warmup_steps, 1), min(args.measure_steps, 1)
        args.rows = min(args.rows, 16)
        args.check_examples = min(args.check_examples, 3)
    return args


def run_prepare(
    args: argparse.Namespace, work: Path, profiles: list[str], slot: str | None, deadline: float
) -> tuple[dict[str, Any] | None, str]:
    """Build or reuse (same spec, same work dir: e.g. profile_train_step after train_throughput) the inputs in a
    child process. Returns the prepare record (None on failure) and the log tail."""
    spec = {
        "work_dir": str(work),
        "model_kind": "tiny" if args.smoke else "gemma3-4b",
        "model_dir": args.model_dir,
        "profiles": sorted(profiles) or ["tiny" if args.smoke else "kaggle"],
        "rows": args.rows,
        "record_path": str(work / "prepare.json"),
    }
    cached = _common._read_json(work / "prepare.json")
    if cached and Path(cached.get("model_dir", "/nonexistent")).is_dir():
        old = dict(cached.get("spec") or {})
        if {k: v for k, v in old.items() if k != "profiles"} == {
            k: v for k, v in spec.items() if k != "profiles"
        } and (set(spec["profiles"]) <= set(old.get("profiles") or [])):
            print(f"[prepare] reusing the model and data prepared in {work}", flush=True)
            return cached, ""
    spec_dir = work / "specs"
    spec_dir.mkdir(parents=True, exist_ok=True)
    spec_path = spec_dir / "prepare.json"
    _common.write_json(spec_path, spec)
    (work / "prepare.json").unlink(missing_ok=True)
    job = _common.Job(
        "prepare",
        [sys.executable, str(Path(__file__).resolve()), "--_prepare", str(spec_path)],
        timeout_s=max(deadline - time.monotonic() - 60, 60),
        log_path=work / "logs" / "prepare.log",
    )
    _common.run_jobs([job], [slot], deadline=None)
    record = _common._read_json(work / "prepare.json") if job.returncode == 0 else None
    return record, _common.tail(job.log_path, 8000)


def visible_gpus() -> int:
    # NVML-based count: the orchestrator never creates a CUDA context (it would hold memory on GPU 0).
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:
        return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args._worker:
        return worker_main(args._worker)
    if args._prepare:
        return prepare_main(args._prepare)
    deadline = time.monotonic() + args.budget_s
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(args.work_dir or ("/tmp/dischargesum_bench_smoke" if args.smoke else "/tmp/dischargesum_bench"))
    n_gpus = 0 if args.smoke else visible_gpus()
    cuda = n_gpus > 0
    slots: list[str | None] = [s.strip() for s in args.gpus.split(",")] if args.gpus else (["0"] if cuda else [])
    if not slots:
        slots = [None] * max(args.cpu_slots, 1)
    if args.set == "auto":
        args.set = "all" if len(slots) >= 3 and cuda else "core"
    from dischargesum.config import SFTConfig, field_names

    selected = select_jobs(args, cuda, set(field_names(SFTConfig)))
    profiles = sorted({p for _v, p, reason in selected if reason is None})

    # 1. inputs (a child process: builds the model on the GPU, never in this process)
    print(f"[train_throughput] preparing model and data in {work} ...", flush=True)
    prep, prep_log = run_prepare(args, work, profiles, slots[0], deadline)
    env = _common.environment_facts(gpus=(prep or {}).get("gpus"))
    payload: dict[str, Any] = {
        "benchmark": "train_throughput",
        **env,
        "settings": {
            k: getattr(args, k)
            for k in (
                "set",
                "profiles",
                "rows",
                "warmup_steps",
                "measure_steps",
                "check_examples",
                "budget_s",
                "variant_timeout_s",
                "gpus",
                "smoke",
                "unsloth",
                "recipe",
            )
        },
        "tolerances": {"loss_rel": LOSS_TOLERANCE, "grad_rel": GRAD_TOLERANCE},
        "tokenizer": (
            f"byte-level BPE, {_common.BENCH_VOCAB_SIZE} tokens, length-calibrated (see benchmarks/_common.py); "
            "the model keeps Gemma-3's 262,208-row embedding and LM head"
        ),
    }
    logs: dict[str, str] = {}
    if prep is None:
        payload["error"] = "prepare failed"
        logs["prepare"] = prep_log
        write_outputs(out_dir, payload, logs)
        print(logs["prepare"])
        print(f"[train_throughput] prepare failed; see {out_dir / LOG_NAME}")
        return 1
    payload["inputs"] = {k: v for k, v in prep.items() if k != "gpus"}

    # 2. rows: the main run and the Unsloth run (separate processes, often separate device commands) complete each
    # other: rows of the other kind are kept from --merge_with (or an earlier result in --out), so `vs_unsloth`
    # is filled whichever ran first.
    merge_path = Path(args.merge_with) if args.merge_with else out_dir / RESULT_NAME
    previous = _common._read_json(merge_path) if (args.merge_with or not args.smoke) else None
    rows: list[dict[str, Any]] = []
    earlier_logs = ""
    if previous and previous.get("variants"):
        # Rows of the other kind, and rows of this kind that this invocation does not re-run (a comparison split
        # over several device commands on one warm machine: each command adds its rows to the same file).
        rerun = {(v.name, profile) for v, profile, _ in selected}
        rows = [
            r
            for r in previous["variants"]
            if (r.get("name") == "unsloth") != bool(args.unsloth) or (r.get("name"), r.get("profile")) not in rerun
        ]
        if rows:
            # Every earlier invocation whose rows this file keeps: its own record plus the ones it had merged.
            earlier = [{k: previous.get(k) for k in ("date", "command", "versions", "settings", "device", "host")}]
            payload["merged_runs"] = [*previous.get("merged_runs", []), *earlier]
            if previous.get("device") not in (None, payload.get("device")):
                payload["warning"] = (
                    f"rows merged from another GPU ({previous.get('device')} vs {payload.get('device')}): ratios "
                    "between them are not comparable"
                )
        log_path = merge_path.with_name(LOG_NAME)
        if rows and log_path.is_file():
            earlier_logs = log_path.read_text(encoding="utf-8").replace("no failed rows\n", "")
    spec_dir = work / "specs"
    spec_dir.mkdir(parents=True, exist_ok=True)
    jobs: list[_common.Job] = []
    job_rows: dict[str, dict[str, Any]] = {}
    for v, profile, reason in selected:
        row: dict[str, Any] = {"name": v.name, "profile": profile, "lever": v.lever}
        rows.append(row)
        if reason is not None:
            row.update(status="skipped", reason=reason)
            continue
        spec = variant_spec(v, profile, args, prep, work, cuda)
        key = Path(spec["result_path"]).stem
        Path(spec["result_path"]).unlink(missing_ok=True)
        spec_path = spec_dir / f"{key}.json"
        _common.write_json(spec_path, spec)
        job = _common.Job(
            key,
            [sys.executable, str(Path(__file__).resolve()), "--_worker", str(spec_path)],
            timeout_s=args.variant_timeout_s,
            log_path=work / "logs" / f"{key}.log",
            # each row tokenizes into its own datasets cache: rows running side by side never share cache files
            env={"HF_DATASETS_CACHE": str(work / "hf_datasets_cache" / key)},
        )
        jobs.append(job)
        job_rows[key] = row
        row["status"] = "pending"

    def on_done(job: _common.Job) -> None:
        row = job_rows[job.name]
        result_path = work / "results" / f"{job.name}.json"
        result = _common._read_json(result_path) if job.returncode is not None else None
        if job.skipped:
            row.update(status="skipped", reason=job.skipped)
        elif result is not None:
            row.update(result)
            row["lever"] = row.get("lever") or job_rows[job.name]["lever"]
        else:
            row.update(status="timeout" if job.timed_out else "failed", returncode=job.returncode)
        row["wall_seconds"] = job.seconds
        row["slot"] = job.slot
        if row.get("status") not in ("ok", "skipped"):
            logs[job.name] = _common.tail(job.log_path, 6000)
        payload["variants"] = rows
        payload.update(summarize(rows, prep))
        write_outputs(out_dir, payload, logs, earlier_logs)
        print(
            f"[train_throughput] {row['name']}/{row['profile']}: {row.get('status')} "
            f"{row.get('tokens_per_s', '-')} tok/s in {job.seconds:.0f} s",
            flush=True,
        )

    payload["variants"] = rows
    payload.update(summarize(rows, prep))
    write_outputs(out_dir, payload, logs, earlier_logs)
    # a row needs ~40 s to load the model and build the trainer before its first step: don't start one in the last
    # 90 s of the budget (it would only time out)
    _common.run_jobs(jobs, slots, deadline=deadline, on_done=on_done, min_start_s=90.0)
    payload["variants"] = rows
    payload.update(summarize(rows, prep))
    payload["wall_seconds"] = round(args.budget_s - (deadline - time.monotonic()), 1)
    write_outputs(out_dir, payload, logs, earlier_logs)
    print(f"[train_throughput] wrote {out_dir / RESULT_NAME}")
    device = (prep.get("gpus") or [{}])[0].get("name", "cpu")
    print(
        f"\ntrain throughput on {device} (real tokens/s, steady state; MFU vs {payload.get('peak_bf16_tflops')} "
        f"TFLOP/s bf16 peak, matmul ceiling measured {payload.get('matmul_tflops_measured')} TFLOP/s)"
    )
    print(_common.format_table(table_rows(rows), TABLE_COLUMNS))
    failed = [r for r in rows if r.get("status") not in ("ok", "skipped")]
    return 1 if failed and len(failed) == len([r for r in rows if r.get("status") != "skipped"]) else 0


if __name__ == "__main__":
    sys.exit(main())
