"""Packing is correct: packed examples never attend to each other.

transformers >= 5.17 builds a block-diagonal causal mask from per-example ``position_ids`` when the batch has no
attention mask (sdpa/eager/flex), and flash attention uses varlen sequence lengths. Here the per-example losses of
examples packed into one row by TRL's padding-free collator must equal those of the examples run alone — for the
tiny causal LM and the tiny VLM (MedGemma's class), with sdpa and eager, on sequences longer than the sliding
window. A control with a single running position_ids (no boundaries) must differ, so the test can fail; and a
forward with a KV cache (use_cache=True) leaks across examples, which is why training disables the cache.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit


def _examples(model_dir: Path, n: int = 3) -> list[tuple[list[int], list[int]]]:
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


def _nll_per_example(
    model, examples, *, packed: bool, boundaries: bool = True, use_cache: bool = False
) -> list[float]:
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


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", ["causal_lm", "vlm"])
def test_packed_losses_equal_unpacked(kind: str, attn: str, tiny_model_dir: Path, tiny_vlm_dir: Path) -> None:
    from dischargesum.modeling import load_base_model

    model_dir = tiny_model_dir if kind == "causal_lm" else tiny_vlm_dir
    model = load_base_model(str(model_dir), dtype="float32", attn_implementation=attn).eval()
    assert model.config.get_text_config()._attn_implementation == attn
    examples = _examples(model_dir)
    window = model.config.get_text_config().sliding_window
    assert all(len(ids) > 2 * window for ids, _ in examples), "examples must exceed the sliding window"
    alone = _nll_per_example(model, examples, packed=False)
    packed = _nll_per_example(model, examples, packed=True)
    assert packed == pytest.approx(alone, rel=1e-4, abs=1e-3)
    leaky = _nll_per_example(model, examples, packed=True, boundaries=False)
    assert leaky[0] == pytest.approx(alone[0], rel=1e-4)  # the first example has nothing before it
    assert leaky[1:] != pytest.approx(alone[1:], rel=1e-4), "without boundaries later examples must differ"
    if kind == "causal_lm":
        # The trap this documents: transformers derives the block-diagonal mask from position_ids only when no KV
        # cache exists, and Gemma3ForCausalLM creates one before building its masks when use_cache=True, so such a
        # forward attends across examples. Training runs with use_cache=False (TRL passes it, and
        # load_model_for_training sets config.use_cache=False). (The VLM builds its masks before the cache.)
        with_cache = _nll_per_example(model, examples, packed=True, use_cache=True)
        assert with_cache[1:] != pytest.approx(alone[1:], rel=1e-4)
