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

from tests.packing_checks import nll_per_example, packed_and_alone

pytestmark = pytest.mark.integration


def test_flex_attention_packed_losses_equal_unpacked_on_cpu(tiny_model_dir: Path) -> None:
    model, examples, alone, packed = packed_and_alone(tiny_model_dir, "flex_attention")
    assert packed == pytest.approx(alone, rel=1e-4, abs=1e-3)
    # The check can fail: without document boundaries the later examples see the earlier ones.
    leaky = nll_per_example(model, examples, packed=True, boundaries=False)
    assert leaky[1:] != pytest.approx(alone[1:], rel=1e-4)
