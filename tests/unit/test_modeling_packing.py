"""Packing is correct: packed examples never attend to each other.

transformers >= 5.17 builds a block-diagonal causal mask from per-example ``position_ids`` when the batch has no
attention mask (sdpa/eager/flex), and flash attention uses varlen sequence lengths. Here the per-example losses of
examples packed into one row by TRL's padding-free collator must equal those of the examples run alone — for the
tiny causal LM and the tiny VLM (MedGemma's class), with sdpa and eager, on sequences longer than the sliding
window. A control with a single running position_ids (no boundaries) must differ, so the test can fail; and a
forward with a KV cache (use_cache=True) leaks across examples, which is why training disables the cache.
flex_attention compiles on CPU for ~30 s, so its packed forward is checked in the integration tier
(tests/integration/test_packing_flex_cpu.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.packing_checks import examples_for, nll_per_example, packed_and_alone, packed_vs_alone_gradients

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", ["causal_lm", "vlm"])
def test_packed_losses_equal_unpacked(kind: str, attn: str, tiny_model_dir: Path, tiny_vlm_dir: Path) -> None:
    model, examples, alone, packed = packed_and_alone(tiny_model_dir if kind == "causal_lm" else tiny_vlm_dir, attn)
    assert packed == pytest.approx(alone, rel=1e-4, abs=1e-3)
    leaky = nll_per_example(model, examples, packed=True, boundaries=False)
    assert leaky[0] == pytest.approx(alone[0], rel=1e-4)  # the first example has nothing before it
    assert leaky[1:] != pytest.approx(alone[1:], rel=1e-4), "without boundaries later examples must differ"
    if kind == "causal_lm":
        # The trap this documents: transformers derives the block-diagonal mask from position_ids only when no KV
        # cache exists, and Gemma3ForCausalLM creates one before building its masks when use_cache=True, so such a
        # forward attends across examples. Training runs with use_cache=False (TRL passes it, and
        # load_model_for_training sets config.use_cache=False). (The VLM builds its masks before the cache.)
        with_cache = nll_per_example(model, examples, packed=True, use_cache=True)
        assert with_cache[1:] != pytest.approx(alone[1:], rel=1e-4)


def test_packed_loss_and_lora_gradients_equal_one_by_one(tiny_model_dir: Path) -> None:
    """A packed micro-batch gives the loss and LoRA gradients of the same examples run alone: neither a document
    boundary nor the sliding window leaks. sdpa only on CPU: torch has no CPU backward for flex_attention
    ("FlexAttention does not support backward on CPU"); its forward is checked on CPU by
    tests/integration/test_packing_flex_cpu.py, its gradients on the GPU by tests/gpu/test_training_gpu.py."""
    alone, packed, worst = packed_vs_alone_gradients(tiny_model_dir, "sdpa")
    assert packed == pytest.approx(alone, rel=1e-5)
    assert worst < 1e-4, worst


def test_padded_packed_row_gives_the_same_loss_and_lora_gradients(tiny_model_dir: Path) -> None:
    """`static_packed_shape`: the packed row padded to a fixed length (pads at position 0, label -100) changes
    neither the loss nor the LoRA gradients. sdpa on CPU; flex_attention on the GPU (tests/gpu)."""
    total = sum(len(ids) for ids, _ in examples_for(tiny_model_dir))
    pad_to = 1024
    assert total % pad_to, "the check needs a row that gets padded"
    alone, packed, worst = packed_vs_alone_gradients(tiny_model_dir, "sdpa", pad_to=pad_to)
    assert packed == pytest.approx(alone, rel=1e-5)
    assert worst < 1e-4, worst
