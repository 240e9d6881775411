"""A decoding attention for grouped-query models that never copies the KV cache: ``sdpa_gqa_fold``.

Why our own: transformers' ``sdpa`` attention passes ``enable_gqa`` to PyTorch only without an attention mask, since
SDPA's efficient kernels do not take both. Batched generation always has a mask (left padding, the sliding window),
so every decoding step of every layer runs ``repeat_kv``, which materialises the whole KV cache at ``n_rep`` times its
size (Gemma-3-4B: 8 query heads on 4 KV heads, so 2x) only to read it once. At batch 64 with a 2,401-token cache that
is ~21 GB written and read again per step on top of the ~21 GB the attention must read — the largest single cost of a
decoding step after the weights.

For one query token the copy is unnecessary: the ``n_rep`` query heads that share a KV head can be laid along the
query-length axis of that KV head instead — ``query (B, H, 1, D) -> (B, H_kv, n_rep, D)`` — and one SDPA call over the
un-repeated cache ``(B, H_kv, L, D)`` computes exactly the same softmax(q k^T / sqrt(d)) v per query head (the
``(B, 1, 1, L)`` mask broadcasts over the new axis). Prefill (more than one query token) goes to transformers' own
``sdpa`` unchanged.

:func:`use_gqa_fold` switches a loaded model to it (registered with transformers' ``AttentionInterface`` and, for the
mask, ``AttentionMaskInterface`` under :data:`NAME`); the generate engine does so for grouped-query models on sdpa.
Tested against ``sdpa`` (logits and greedy tokens) in tests/unit/test_attention.py. It also applies the mask of a
ring-buffer sliding-window cache layer (:mod:`dischargesum.inference.kv_cache`) when the module carries one.
:func:`gqa_fold_forward` builds the same attention around another kernel for the folded step (the throughput
benchmark's matmul ablation registers one under its own name: benchmarks/_engine_ablations.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from dischargesum.inference.kv_cache import RING_ATTR
from dischargesum.logging_utils import get_logger

logger = get_logger(__name__)

NAME = "sdpa_gqa_fold"
# The names registered with a folded decoding step (:func:`register`): the ring-buffer cache needs one of them.
FOLD_NAMES: set[str] = set()
# The kernel of a folded decoding step: (query (B, H_kv, n_rep, D), key, value (B, H_kv, L, D), mask, scale) -> out.
FoldedKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, float | None], torch.Tensor]
AttentionFunction = Callable[..., tuple[torch.Tensor, None]]


def sdpa_kernel(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, scale: float | None
) -> torch.Tensor:
    """PyTorch's SDPA on the folded query (PyTorch picks cuDNN / efficient / math)."""
    return torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=0.0, scale=scale, is_causal=False
    )


def gqa_fold_forward(kernel: FoldedKernel) -> AttentionFunction:
    """An attention function (transformers' signature; returns ``(B, q_len, H, D)`` like its ``sdpa``) whose
    decoding steps fold the query heads onto their KV head and run ``kernel``; everything else goes to sdpa."""

    def forward(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        dropout: float = 0.0,
        scaling: float | None = None,
        is_causal: bool | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        n_rep = int(getattr(module, "num_key_value_groups", 1))
        batch, heads, q_len, head_dim = query.shape
        ring = getattr(module, RING_ATTR, None)
        if ring is not None and q_len == 1:
            # A ring-buffer layer (dischargesum.inference.kv_cache): its slots are not in position order, so
            # transformers' mask (built for an ordered window) does not apply; the ring's own mask does.
            attention_mask = ring.decode_mask()
        if q_len != 1 or n_rep == 1 or kwargs.get("position_bias") is not None or dropout:
            return sdpa_attention_forward(
                module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal,
                **kwargs,
            )  # fmt: skip
        kv_heads = key.shape[1]
        # Query head h reads KV head h // n_rep (transformers' repeat_kv order), so consecutive heads fold together.
        folded = query.reshape(batch, kv_heads, n_rep, head_dim)
        mask = attention_mask
        if mask is not None and mask.ndim == 4:
            mask = mask[:, :, :, : key.shape[-2]]
        out = kernel(folded, key, value, mask, scaling)
        return out.reshape(batch, heads, 1, head_dim).transpose(1, 2).contiguous(), None

    return forward


sdpa_gqa_fold_forward = gqa_fold_forward(sdpa_kernel)


def register(name: str = NAME, forward: AttentionFunction = sdpa_gqa_fold_forward) -> str:
    """Register ``forward`` (default: :data:`NAME`, the SDPA fold) with transformers under ``name``, with sdpa's mask
    format; idempotent. Another kernel (``gqa_fold_forward(kernel)``) registers under its own name; a model switches
    to it with ``set_attn_implementation(name)``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(name, forward)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    FOLD_NAMES.add(name)
    return name


def use_gqa_fold(model: Any) -> bool:
    """Switch ``model`` (loaded with ``sdpa``) to :data:`NAME` when it has grouped-query attention; returns whether it
    switched. Models on another attention implementation, or without GQA, are left as they are."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = inner.config.get_text_config(decoder=True)
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if getattr(config, "_attn_implementation", None) != "sdpa" or not heads or kv_heads == heads:
        return False
    register()
    inner.set_attn_implementation(NAME)
    logger.info("attention: %s (%d query heads share %d KV heads; no KV copy per step)", NAME, heads, kv_heads)
    return True
