"""flex_attention's packed forward on CPU: examples packed into one padding-free row give the per-example losses
of the same examples run alone (the training default on a GPU is flex_attention for packed rows).

Integration tier, not unit: flex_attention compiles its kernel on CPU for every new shape (~30 s here). The mask
code is shared with sdpa/eager, whose controls (no boundaries, KV cache) run in tests/unit/test_modeling_packing.py;
the causal LM is checked only (same transformers mask code as MedGemma's class). Gradients: torch has no CPU
backward for flex_attention, so they are checked on the GPU (tests/gpu/test_training_gpu.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.packing_checks import examples_for, nll_per_example

pytestmark = pytest.mark.integration


def test_flex_attention_packed_losses_equal_unpacked_on_cpu(tiny_model_dir: Path) -> None:
    from dischargesum.modeling import load_base_model

    model = load_base_model(str(tiny_model_dir), dtype="float32", attn_implementation="flex_attention").eval()
    assert model.config.get_text_config()._attn_implementation == "flex_attention"
    examples = examples_for(tiny_model_dir)
    window = model.config.get_text_config().sliding_window
    assert all(len(ids) > 2 * window for ids, _ in examples), "examples must exceed the sliding window"
    alone = nll_per_example(model, examples, packed=False)
    packed = nll_per_example(model, examples, packed=True)
    assert packed == pytest.approx(alone, rel=1e-4, abs=1e-3)
    # The check can fail: without document boundaries the later examples see the earlier ones.
    leaky = nll_per_example(model, examples, packed=True, boundaries=False)
    assert leaky[1:] != pytest.approx(alone[1:], rel=1e-4)
