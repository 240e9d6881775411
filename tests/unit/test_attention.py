"""``sdpa_gqa_fold`` (dischargesum.inference.attention) computes what transformers' ``sdpa`` computes, without the KV
copy — with its SDPA kernel and with the benchmark's matmul kernel (benchmarks/_engine_ablations.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from dischargesum.inference.attention import NAME, gqa_fold_forward, sdpa_gqa_fold_forward, sdpa_kernel, use_gqa_fold

# benchmarks/ is not a package (and a site-packages distribution owns the name `benchmarks`): import by path.
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from _engine_ablations import matmul_kernel, use_matmul_fold

pytestmark = pytest.mark.unit


class _Module(torch.nn.Module):
    def __init__(self, n_rep: int):
        super().__init__()
        self.num_key_value_groups = n_rep
        self.is_causal = True


@pytest.mark.parametrize("n_rep", [2, 4])
def test_folded_decoding_attention_equals_sdpa_with_a_padding_mask(n_rep: int) -> None:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    torch.manual_seed(0)
    batch, kv_heads, length, dim = 3, 2, 37, 16
    query = torch.randn(batch, kv_heads * n_rep, 1, dim, dtype=torch.float64)
    key = torch.randn(batch, kv_heads, length, dim, dtype=torch.float64)
    value = torch.randn(batch, kv_heads, length, dim, dtype=torch.float64)
    mask = torch.ones(batch, 1, 1, length, dtype=torch.bool)
    mask[0, ..., :9] = False  # left padding
    mask[2, ..., :20] = False  # and a sliding window's cut
    module = _Module(n_rep)
    expected, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.25)
    for kernel in (sdpa_kernel, matmul_kernel):
        got, _ = gqa_fold_forward(kernel)(module, query, key, value, mask, scaling=0.25)
        assert got.shape == expected.shape == (batch, 1, kv_heads * n_rep, dim)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_prefill_goes_to_sdpa_unchanged() -> None:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    torch.manual_seed(1)
    query, key, value = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    module = _Module(2)
    expected, _ = sdpa_attention_forward(module, query, key, value, None, scaling=0.3)
    got, _ = sdpa_gqa_fold_forward(module, query, key, value, None, scaling=0.3)
    assert torch.equal(got, expected)


def test_model_generates_the_same_tokens_with_the_folded_attention(tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").eval()
    torch.manual_seed(2)
    ids = torch.randint(5, 1000, (3, 90))  # longer than the tiny model's sliding window (64)
    mask = torch.ones_like(ids)
    mask[0, :30] = 0
    kwargs = {"max_new_tokens": 16, "min_new_tokens": 16, "do_sample": False, "output_logits": True}
    with torch.inference_mode():
        before = model.generate(input_ids=ids, attention_mask=mask, return_dict_in_generate=True, **kwargs)
    assert use_gqa_fold(model)
    assert model.config._attn_implementation == NAME
    with torch.inference_mode():
        after = model.generate(input_ids=ids, attention_mask=mask, return_dict_in_generate=True, **kwargs)
    assert torch.equal(after.sequences, before.sequences)
    for a, b in zip(after.logits, before.logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert not use_gqa_fold(model)  # already switched: no-op
    assert use_matmul_fold(model) == NAME
    with torch.inference_mode():
        matmul = model.generate(input_ids=ids, attention_mask=mask, return_dict_in_generate=True, **kwargs)
    assert torch.equal(matmul.sequences, before.sequences)
