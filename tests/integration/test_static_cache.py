"""The engine's static KV cache on the tiny Gemma-3 (CPU): same greedy tokens as the dynamic cache on prompts longer
than the sliding window — with full-length sliding layers, with ring-buffer sliding layers, and with the prefill run in
row chunks — and compiled decoding compiles once — no recompilation per step (transformers' own sliding static layer
recompiles every step and then silently runs eagerly; see ``compile_friendly_static_cache`` and
dischargesum/inference/kv_cache.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dischargesum.inference.engine import EngineSettings, GenerationRequest, InferenceEngine
from dischargesum.inference.kv_cache import compile_friendly_static_cache
from dischargesum.inference.loading import load_engine, resolve_model_source

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def dynamic_engine(tiny_model_dir: Path) -> InferenceEngine:
    source = resolve_model_source(str(tiny_model_dir), None)
    return load_engine(
        source, EngineSettings(max_batch_size=4, batch_token_budget=4096), precision="fp32", load_in_4bit=False,
        merge_adapter=False, attn_implementation="auto", device="cpu",
    )  # fmt: skip


def _requests(window: int, n: int = 6, max_new: int = 20) -> list[GenerationRequest]:
    # prompts from below to well above the sliding window, so decoding crosses it in some rows and not others
    lengths = [window // 2 + 23 * i for i in range(n)]
    return [
        GenerationRequest(f"n{i}", tuple(3 + (7 * i + 5 * j) % 900 for j in range(n_tok)), max_new, seed=i, index=i)
        for i, n_tok in enumerate(lengths)
    ]


def test_sliding_layers_become_full_length_static_layers(dynamic_engine: InferenceEngine) -> None:
    from transformers.cache_utils import StaticLayer, StaticSlidingWindowLayer

    config = dynamic_engine.model.config.get_text_config(decoder=True)
    cache = compile_friendly_static_cache(config, 300)
    assert len(cache.layers) == config.num_hidden_layers
    assert all(type(layer) is StaticLayer for layer in cache.layers)
    assert not any(isinstance(layer, StaticSlidingWindowLayer) for layer in cache.layers)
    assert cache.is_compileable and "sliding_attention" in config.layer_types


@pytest.fixture(scope="module")
def reference(dynamic_engine: InferenceEngine) -> list[tuple[int, ...]]:
    window = dynamic_engine.model.config.get_text_config(decoder=True).sliding_window
    requests = _requests(window)
    assert max(len(r.prompt_ids) for r in requests) + 20 > 2 * window
    return [r.token_ids for r in dynamic_engine.generate_all(requests)]


@pytest.mark.parametrize(("sliding", "chunk_rows"), [("full", 0), ("ring", 0), ("ring", 3)])
def test_static_cache_gives_the_dynamic_cache_tokens_beyond_the_window(
    dynamic_engine: InferenceEngine, reference: list[tuple[int, ...]], sliding: str, chunk_rows: int
) -> None:
    from dischargesum.inference.kv_cache import ring_layers

    window = dynamic_engine.model.config.get_text_config(decoder=True).sliding_window
    static = InferenceEngine(
        dynamic_engine.model,
        dynamic_engine.tokenizer,
        EngineSettings(
            max_batch_size=4, batch_token_budget=4096, cache_implementation="static",
            sliding_window_cache=sliding, prefill_chunk_rows=chunk_rows,  # type: ignore[arg-type]
        ),
    )  # fmt: skip
    got = [r.token_ids for r in static.generate_all(_requests(window))]
    assert got == reference
    # ring: the sliding layer holds `window` slots, far fewer than the cache length (prompts up to 2.3 windows)
    rings = ring_layers(static._static_cache)
    assert len(rings) == (1 if sliding == "ring" else 0)
    if rings:
        assert rings[0].keys.shape[2] == window < static._static_shape[1]


def test_compiled_decoding_does_not_recompile_per_step(dynamic_engine: InferenceEngine) -> None:
    import torch._dynamo

    torch._dynamo.reset()
    # Any recompilation (a guard failing between decoding steps or batches of the same shape) raises. torch's own
    # config.patch restores the flag (a monkeypatch of the config module left it unreadable in torch 2.13: the
    # next recompilation in the same process, in another test, raised AttributeError).
    with torch._dynamo.config.patch(error_on_recompile=True):
        window = dynamic_engine.model.config.get_text_config(decoder=True).sliding_window
        requests = _requests(window, n=8, max_new=12)
        compiled = InferenceEngine(
            dynamic_engine.model,
            dynamic_engine.tokenizer,
            EngineSettings(
                max_batch_size=4, batch_token_budget=4096, cache_implementation="static", compile=True,
                sliding_window_cache="ring", prefill_chunk_rows=2,
            ),
        )  # fmt: skip
        # two batches of 4: chunked prefill and the first step eager, 10 compiled steps each; the ring's slot index and
        # mask are tensors, so the steps and the second batch reuse the first compilation
        results = compiled.generate_all(requests)
        assert [r.new_tokens for r in results if r.finish_reason == "length"] == [12] * sum(
            r.finish_reason == "length" for r in results
        )
        reference = [r.token_ids for r in dynamic_engine.generate_all(requests)]
        assert [r.token_ids for r in results] == reference
    torch._dynamo.reset()


def test_memory_plan_counts_ring_layers_at_their_window(dynamic_engine: InferenceEngine) -> None:
    from dischargesum.inference.kv_cache import memory_plan

    model = dynamic_engine.model
    config = model.config.get_text_config(decoder=True)
    per_position = 2 * config.num_key_value_heads * config.head_dim * 4  # K and V, fp32
    kwargs = {"batch": 8, "cache_len": 300, "prefill_rows": 8, "prompt_len": 280}
    full = memory_plan(model, config, ring=False, **kwargs)
    ring = memory_plan(model, config, ring=True, **kwargs)
    # tiny model: one sliding layer (window 64) and one full layer
    assert full["kv_cache"] == pytest.approx(8 * 2 * 300 * per_position / 2**30)
    assert ring["kv_cache"] == pytest.approx(8 * (300 + config.sliding_window) * per_position / 2**30)
    assert full["weights"] == pytest.approx(sum(p.numel() * 4 for p in model.parameters()) / 2**30)
    chunked = memory_plan(model, config, ring=True, **{**kwargs, "prefill_rows": 2})
    assert 0 < chunked["prefill"] < ring["prefill"]
