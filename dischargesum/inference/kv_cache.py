"""The static KV cache of the generate engine: full-length layers for global attention, ring buffers for sliding-window
attention, and a prefill that runs in row chunks.

**Ring buffer** (:class:`RingSlidingLayer`). A sliding-window layer of Gemma 3 attends to the last ``sliding_window``
positions only, so it needs ``window`` slots, not the cache's full length (Gemma-3-4B: 1,024 instead of ~2,400 for 28
of its 34 layers). Position ``p`` is written to slot ``p % window`` (``index_copy_`` with a tensor index computed from
the layer's tensor length counter: no Python int changes between decoding steps, so ``torch.compile`` installs no
per-step guard — unlike transformers' ``StaticSlidingWindowLayer``, whose Python-int branch recompiles every step and
which ``roll`` s the whole window each step). The slots are then out of position order; attention does not care about
key order, only about the mask, so the decoding step gets a mask of its own (:meth:`RingSlidingLayer.decode_mask`):
slot ``j`` holds position ``pos_j = p - ((p - j) mod window)`` (the latest position <= p that maps to j, always within
the window), which is attended when ``pos_j`` is at or after the row's first real token (left padding). transformers'
mask for that layer is built for an ordered window and is ignored: the attention function
(:func:`dischargesum.inference.attention.sdpa_gqa_fold_forward`) takes the ring's mask from the attention module, where
:func:`attach_ring` puts the layer for the duration of a ``generate`` call. So the ring needs that attention function
(``attn_implementation: auto`` on a grouped-query model); elsewhere the engine keeps full-length layers.

**Chunked prefill** (:func:`prefill_in_chunks`). Prefilling a whole batch at once holds the MLP activations of batch x
prompt tokens (batch 128 ran out of memory in the prefill on an 80 GB H100, issue 14). Here the prompt minus its last
token is run ``rows`` notes at a time into a temporary full-length dynamic cache, whose keys and values are copied into
the static cache's rows (ring layers: the last ``window - 1`` positions, all a decoding step can see); ``generate``
then starts from the filled cache and only the last prompt token goes through its own first step. The peak is one
chunk's activations instead of the batch's.

**Memory plan** (:func:`memory_plan`): what a static-cache batch needs — weights, KV cache (ring layers at their
window), the prefill's working set (an estimate) and the free GPU memory — logged by the engine when it builds a cache.
The batch size itself still comes from ``batch_token_budget``; a batch that runs out of memory is halved
(:meth:`dischargesum.inference.engine.InferenceEngine.run_batch`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from transformers.cache_utils import StaticLayer

# Attribute of an attention module holding its ring layer while ``generate`` runs (read by the attention function).
RING_ATTR = "_dischargesum_ring"


class RowStarts:
    """The cache index of each row's first real token (left padding), shared by the ring layers of one cache. One
    tensor, written in place for every batch, so compiled graphs keep reading the same address."""

    def __init__(self) -> None:
        self.tensor: torch.Tensor | None = None

    def set(self, starts: torch.Tensor) -> None:
        if self.tensor is None or self.tensor.shape != starts.shape or self.tensor.device != starts.device:
            self.tensor = starts.clone()
            torch._dynamo.mark_static_address(self.tensor)
        else:
            self.tensor.copy_(starts)


class RingSlidingLayer(StaticLayer):  # type: ignore[misc]
    """A sliding-window cache layer of ``window`` slots used as a ring buffer (see the module docstring).

    Multi-token updates (prefill) must start from an empty layer; they keep the last ``window`` positions and return
    the full keys/values so the prefill attends to the whole prompt under transformers' sliding mask.
    """

    is_sliding = True

    def __init__(self, window: int, rows: RowStarts, **kwargs: Any):
        super().__init__(max_cache_len=window)
        self.window = window
        self.rows = rows
        self.filled = False  # a multi-token update happened (read only outside compiled decoding)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        if n == 1:
            keys, values = self._buffers()
            slot = torch.remainder(self.cumulative_length, self.window).reshape(1)
            keys.index_copy_(2, slot, key_states)
            values.index_copy_(2, slot, value_states)
            self.cumulative_length.add_(1)
            return keys, values
        if self.filled:
            raise NotImplementedError("RingSlidingLayer: a multi-token update after the prefill (chunked decoding)")
        self.write_prefix(key_states, value_states, rows=slice(None))
        self.cumulative_length.add_(n)
        return key_states, value_states

    def write_prefix(self, key_states: torch.Tensor, value_states: torch.Tensor, *, rows: slice) -> None:
        """Store positions ``0 .. n-1`` (only the last ``window``, each in its slot) of rows ``rows``."""
        keys, values = self._buffers()
        n = key_states.shape[-2]
        keep = min(n, self.window)
        slots = torch.remainder(torch.arange(n - keep, n, device=keys.device), self.window)
        keys[rows].index_copy_(2, slots, key_states[:, :, n - keep :].to(keys.dtype))
        values[rows].index_copy_(2, slots, value_states[:, :, n - keep :].to(values.dtype))
        self.filled = True

    def _buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.keys is not None and self.values is not None, "allocated by lazy_initialization"
        return self.keys, self.values

    def decode_mask(self) -> torch.Tensor:
        """``(batch, 1, 1, window)`` bool: which slots the query at position ``cumulative_length - 1`` attends."""
        assert self.rows.tensor is not None, "the engine sets the row starts before generating"
        p = self.cumulative_length - 1
        slots = torch.arange(self.window, device=self._buffers()[0].device)
        positions = p - torch.remainder(p - slots, self.window)
        return (positions[None, :] >= self.rows.tensor[:, None])[:, None, None, :]

    def get_mask_sizes(self, query_length: int, *args: Any) -> tuple[int, int]:
        # Decoding: the attention function replaces this layer's mask by decode_mask(); the size just has to be
        # static. Prefill (from empty): the returned keys are the prompt's own.
        return (self.window, 0) if query_length == 1 else (query_length, 0)

    def reset(self) -> None:
        super().reset()
        self.filled = False


def ring_supported(model: Any) -> bool:
    """Whether ``model`` decodes through our attention function, which applies the ring's mask."""
    from dischargesum.inference.attention import FOLD_NAMES

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(inner.config, "_attn_implementation", None) in FOLD_NAMES


def build_static_cache(text_config: Any, max_cache_len: int, *, ring: bool) -> Any:
    """A ``StaticCache`` of ``max_cache_len`` whose sliding-window layers are ring buffers (``ring``; only when the
    window is shorter than the cache) or full-length static layers (the mask then applies the window)."""
    from transformers import StaticCache
    from transformers.cache_utils import StaticSlidingWindowLayer

    cache = StaticCache(config=text_config, max_cache_len=max_cache_len)
    layer_types = getattr(text_config, "layer_types", None) or []
    window = getattr(text_config, "sliding_window", None)
    rows = RowStarts()
    for i, layer in enumerate(cache.layers):
        kind = layer_types[i] if i < len(layer_types) else None
        if isinstance(layer, StaticSlidingWindowLayer) and kind == "sliding_attention":
            if ring and window and window < max_cache_len:
                cache.layers[i] = RingSlidingLayer(window=int(window), rows=rows)
            else:
                cache.layers[i] = StaticLayer(max_cache_len=max_cache_len)
    return cache


def ring_layers(cache: Any) -> list[RingSlidingLayer]:
    return [layer for layer in getattr(cache, "layers", []) if isinstance(layer, RingSlidingLayer)]


def set_row_starts(cache: Any, attention_mask: torch.Tensor) -> None:
    """Record each row's first real token (left padding) for the ring layers' masks."""
    layers = ring_layers(cache)
    if layers:
        starts = attention_mask.shape[1] - attention_mask.long().sum(dim=1)
        layers[0].rows.set(starts)


@contextlib.contextmanager
def attach_ring(model: Any, cache: Any) -> Iterator[None]:
    """Point each sliding attention module at its ring layer while the block runs (then detach, so a later cache
    without ring layers is never given a stale mask)."""
    layers = {i: layer for i, layer in enumerate(getattr(cache, "layers", [])) if isinstance(layer, RingSlidingLayer)}
    modules = []
    if layers:
        for module in model.modules():
            idx = getattr(module, "layer_idx", None)
            if getattr(module, "is_sliding", False) and isinstance(idx, int) and idx in layers:
                setattr(module, RING_ATTR, layers[idx])
                modules.append(module)
        if len(modules) != len(layers):
            for module in modules:
                setattr(module, RING_ATTR, None)
            raise RuntimeError(
                f"ring KV cache: found {len(modules)} sliding attention modules for {len(layers)} ring layers "
                "(an unknown model layout); use `sliding_window_cache: full`."
            )
    try:
        yield
    finally:
        for module in modules:
            setattr(module, RING_ATTR, None)


def prefill_in_chunks(
    model: Any,
    cache: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    rows: int,
    cache_kwarg: str,
) -> None:
    """Fill ``cache`` (a static cache, reset) with positions ``0 .. L-2`` of every row, ``rows`` rows at a time.

    Position ids follow the left padding exactly as ``generate`` derives them (cumsum of the mask - 1), so the keys
    are the ones the whole-batch prefill would compute (up to kernel numerics of the smaller batch).
    """
    from transformers import DynamicCache

    batch, length = input_ids.shape
    if length < 2:
        return
    position_ids = attention_mask.long().cumsum(-1) - 1
    position_ids.masked_fill_(attention_mask == 0, 0)
    for start in range(0, batch, rows):
        stop = min(batch, start + rows)
        chunk = DynamicCache()  # full-length layers: every position is kept, the copy picks what each layer needs
        model(
            input_ids=input_ids[start:stop, : length - 1],
            attention_mask=attention_mask[start:stop, : length - 1],
            position_ids=position_ids[start:stop, : length - 1],
            use_cache=True,
            logits_to_keep=1,
            **{cache_kwarg: chunk},
        )
        filled: list[Any] = list(chunk.layers)
        for i, layer in enumerate(cache.layers):
            keys, values = filled[i].keys, filled[i].values
            if not layer.is_initialized:
                shape = (batch, keys.shape[1], 1, keys.shape[-1])
                layer.lazy_initialization(keys.new_empty(shape), values.new_empty((*shape[:-1], values.shape[-1])))
            if isinstance(layer, RingSlidingLayer):
                layer.write_prefix(keys, values, rows=slice(start, stop))
            else:
                layer.keys[start:stop, :, : length - 1].copy_(keys)
                layer.values[start:stop, :, : length - 1].copy_(values)
        del chunk
    for layer in cache.layers:
        layer.cumulative_length.fill_(length - 1)


def memory_plan(
    model: Any,
    text_config: Any,
    *,
    batch: int,
    cache_len: int,
    ring: bool,
    prefill_rows: int,
    prompt_len: int,
) -> dict[str, float]:
    """GiB a static-cache batch needs, by part: ``weights`` (parameters as loaded), ``kv_cache`` (full-length layers
    x ``cache_len`` + ring layers x window, K and V, per row), ``prefill`` (the largest prefill working set: the MLP's
    three ``intermediate_size`` tensors and the chunk's temporary full-length keys/values, for ``prefill_rows`` rows
    of ``prompt_len`` tokens — an estimate, not a measurement) and, on CUDA, ``free`` (what the allocator can still
    get) — so a batch size can be judged before it runs out of memory."""
    dtype_bytes = next(model.parameters()).element_size()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    kv_heads = getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    per_position = 2 * kv_heads * head_dim * dtype_bytes
    layer_types = list(getattr(text_config, "layer_types", None) or [])
    layer_types += ["full_attention"] * (text_config.num_hidden_layers - len(layer_types))
    window = int(getattr(text_config, "sliding_window", None) or cache_len)
    positions = sum(
        min(window, cache_len) if ring and kind == "sliding_attention" else cache_len for kind in layer_types
    )
    tokens = prefill_rows * prompt_len
    intermediate = getattr(text_config, "intermediate_size", 4 * text_config.hidden_size)
    prefill = tokens * (3 * intermediate + 4 * text_config.hidden_size) * dtype_bytes
    if prefill_rows < batch:  # chunked: the chunk's own full-length dynamic cache exists until it is copied
        prefill += tokens * len(layer_types) * per_position
    plan = {
        "weights": weights / 2**30,
        "kv_cache": batch * positions * per_position / 2**30,
        "prefill": prefill / 2**30,
    }
    device = next(model.parameters()).device
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        plan["free"] = (free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)) / 2**30
    return plan


def compile_friendly_static_cache(text_config: Any, max_cache_len: int) -> Any:
    """A ``StaticCache`` whose sliding-window layers are full-length static layers (the mask applies the window).

    Why not transformers' own: its ``StaticSlidingWindowLayer`` (a ring buffer) branches on a Python int that grows
    every decoding step, so ``torch.compile`` guards on its value and recompiles at every step until the recompile
    limit (8), then silently runs eagerly (transformers issue 44609, declined upstream; measured on an H100: 80 ms
    per step at batch 64 with ``compile: true``). Each step it also ``roll``s the whole window (a full read + write of
    the sliding cache). A full-length :class:`StaticLayer` writes each token in place at its absolute position
    (``index_copy_`` with a tensor position: no Python-int guard) and the sliding-window mask, built from absolute
    positions, keeps attention to the last ``sliding_window`` tokens — the same outputs (tested against the dynamic
    cache), for (max_cache_len / window) x the memory of those layers. ``sliding_window_cache: ring`` replaces these
    layers by ring buffers of ``window`` slots (:func:`build_static_cache`), without the per-step guard.
    """
    return build_static_cache(text_config, max_cache_len, ring=False)
