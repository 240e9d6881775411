"""Engine variants only the generation benchmark needs, built on the engine's public surface (nothing of theirs is
in the package):

* :class:`FixedLengthEngine` — every row generates exactly ``min_new_tokens`` tokens (stop tokens are masked until
  then, through :meth:`InferenceEngine.decoding_config`): random weights never emit a stop token at a realistic
  point, so tokens/s needs a fixed length.
* :func:`use_matmul_fold` — our decoding attention with the other kernel for its folded step: two batched matmuls
  and a float32 softmax (transformers' eager attention math, without its ``repeat_kv`` copy), registered through
  :func:`dischargesum.inference.attention.register` as :data:`MATMUL_FOLD_NAME` (the ``engine_static_compile_matmul``
  row of ``generate_throughput.py``).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import GenerationConfig

from dischargesum.inference import attention
from dischargesum.inference.engine import EngineSettings, InferenceEngine

MATMUL_FOLD_NAME = "sdpa_gqa_fold_matmul"


class FixedLengthEngine(InferenceEngine):
    """The engine with a minimum output length (``min(min_new_tokens, the batch's max_new_tokens)``)."""

    def __init__(self, model: Any, tokenizer: Any, settings: EngineSettings, *, min_new_tokens: int):
        super().__init__(model, tokenizer, settings)
        self.min_new_tokens = min_new_tokens

    def decoding_config(self, max_new_tokens: int) -> GenerationConfig:
        config = super().decoding_config(max_new_tokens)
        config.min_new_tokens = min(self.min_new_tokens, max_new_tokens) or None
        return config


def matmul_kernel(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, scale: float | None
) -> torch.Tensor:
    """The folded decoding step as two batched matmuls with the softmax in >= float32."""
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(query, key.transpose(-1, -2))
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32)) * scale  # softmax in >= float32
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return torch.matmul(scores.softmax(dim=-1).to(value.dtype), value)


def use_matmul_fold(model: Any) -> str:
    """Switch ``model`` (on :data:`dischargesum.inference.attention.NAME`) to the matmul kernel; returns the
    implementation it was on, to switch back with ``model.set_attn_implementation(previous)``."""
    previous = model.config._attn_implementation
    model.set_attn_implementation(attention.register(MATMUL_FOLD_NAME, attention.gqa_fold_forward(matmul_kernel)))
    return previous
