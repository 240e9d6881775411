"""Packed-vs-one-by-one checks shared by the unit, integration and gpu tiers (tests/*/test_*packing*.py,
tests/gpu/test_training_gpu.py): chat examples longer than twice the sliding window, their per-example NLL run
alone or packed into one padding-free row by TRL's collator, and the LoRA gradients of the training path."""

from __future__ import annotations

import itertools
from pathlib import Path


def examples_for(model_dir: Path, n: int = 3) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) of ``n`` chat examples with the prompt masked, as TRL builds them."""
    from dischargesum.data.formatting import completion_messages, prompt_messages
    from dischargesum.data.synthetic import generate_rows
    from dischargesum.modeling import load_tokenizer

    tok = load_tokenizer(str(model_dir))
    out = []
    for row in generate_rows(n, profile="tiny", schema="kaggle", seed=3, with_entities=False):
        prompt = prompt_messages(str(row["input"])[:600])
        full = prompt + completion_messages(str(row["target"])[:300])
        prompt_ids = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)
        ids = tok.apply_chat_template(full, tokenize=True, return_dict=True)["input_ids"]
        n_prompt = len(prompt_ids["input_ids"])
        out.append((ids, [-100] * n_prompt + ids[n_prompt:]))
    return out


def long_examples(model_dir: Path, model) -> list[tuple[list[int], list[int]]]:
    """:func:`examples_for`, checked to be longer than twice ``model``'s sliding window (so a leak through the
    window would show)."""
    examples = examples_for(model_dir)
    window = model.config.get_text_config().sliding_window
    assert all(len(ids) > 2 * window for ids, _ in examples), "examples must exceed the sliding window"
    return examples


def packed_and_alone(model_dir: Path, attn: str):
    """(model, examples, per-example NLL run alone, per-example NLL packed into one padding-free row) with the
    fp32 model of ``model_dir`` under attention ``attn`` (checked to be the one in use)."""
    from dischargesum.modeling import load_base_model

    model = load_base_model(str(model_dir), dtype="float32", attn_implementation=attn).eval()
    assert model.config.get_text_config()._attn_implementation == attn
    examples = long_examples(model_dir, model)
    return (
        model,
        examples,
        nll_per_example(model, examples, packed=False),
        nll_per_example(model, examples, packed=True),
    )


def nll_per_example(model, examples, *, packed: bool, boundaries: bool = True, use_cache: bool = False) -> list[float]:
    import torch
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    if not packed:
        losses = []
        for ids, labels in examples:
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
            target = torch.tensor(labels[1:])
            mask = target != -100
            nll = torch.nn.functional.cross_entropy(logits[mask], target[mask], reduction="sum")
            losses.append(float(nll))
        return losses
    collator = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    batch = collator([{"input_ids": ids, "labels": labels} for ids, labels in examples])
    position_ids = batch["position_ids"]
    if not boundaries:
        position_ids = torch.arange(position_ids.shape[1])[None]
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=position_ids, use_cache=use_cache).logits
    logits = logits[0, :-1].float()
    target = batch["labels"][0, 1:]
    starts = [int(s) for s in batch["cu_seq_lens_q"]]
    losses = []
    for a, b in itertools.pairwise(starts):
        seg_logits, seg_target = logits[a : b - 1], target[a : b - 1]
        mask = seg_target != -100
        losses.append(float(torch.nn.functional.cross_entropy(seg_logits[mask], seg_target[mask], reduction="sum")))
    return losses


def nll_sum(model, examples, *, packed: bool, device: str = "cpu", pad_to: int | None = None):
    """Summed completion NLL of ``examples`` (with autograd), packed into one padding-free row or run one by one."""
    import torch
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    def segment_nll(logits, labels):
        target = labels[1:]
        mask = target != -100
        return torch.nn.functional.cross_entropy(logits[:-1][mask].float(), target[mask], reduction="sum")

    if not packed:
        total = 0
        for ids, labels in examples:
            logits = model(input_ids=torch.tensor([ids], device=device)).logits[0]
            total = total + segment_nll(logits, torch.tensor(labels, device=device))
        return total
    # pad_to: the packed row padded to a multiple of it, as `static_packed_shape` trains (masked out of the loss).
    batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True, pad_to_multiple_of=pad_to)(
        [{"input_ids": ids, "labels": labels} for ids, labels in examples]
    )
    logits = model(input_ids=batch["input_ids"].to(device), position_ids=batch["position_ids"].to(device)).logits[0]
    labels = batch["labels"][0].to(device)
    starts = [int(s) for s in batch["cu_seq_lens_q"]]
    return sum(segment_nll(logits[a:b], labels[a:b]) for a, b in itertools.pairwise(starts))


def packed_vs_alone_gradients(
    model_dir: Path, attn: str, *, device: str = "cpu", dtype: str = "float32", pad_to: int | None = None
) -> tuple[float, float, float]:
    """(loss alone, loss packed, worst relative LoRA-gradient difference) of the training path — PEFT LoRA on
    every projection, the fused LoRA node, gradient checkpointing — on examples longer than twice the sliding
    window, packed into one padding-free row vs run one by one. Shared with tests/gpu/test_training_gpu.py."""
    import torch
    from peft import LoraConfig, get_peft_model

    from dischargesum.modeling import load_base_model
    from dischargesum.training.fast_lora import enable_fused_lora

    model = load_base_model(str(model_dir), dtype=dtype, attn_implementation=attn).to(device)
    model.config.use_cache = False
    model.requires_grad_(False)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type="CAUSAL_LM"))
    gen = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()  # fp32 master weights, as the trainer keeps them
        if "lora_B" in name:
            p.data.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    assert enable_fused_lora(model) > 0
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    examples = long_examples(model_dir, model)

    def loss_and_grads(packed: bool):
        model.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            loss = nll_sum(model, examples, packed=packed, device=device, pad_to=pad_to if packed else None)
        loss.backward()
        grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}
        return float(loss.detach()), grads

    alone_loss, alone_grads = loss_and_grads(packed=False)
    packed_loss, packed_grads = loss_and_grads(packed=True)
    worst = max(float((packed_grads[k] - g).norm() / g.norm()) for k, g in alone_grads.items())
    return alone_loss, packed_loss, worst
