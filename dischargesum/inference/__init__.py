"""Inference: loading a model for generation, the one generation engine, the resumable sharded-stage protocol, and
the two stages that use them (generate, compress) plus both in one process (pipeline).

Modules: :mod:`~dischargesum.inference.engine` (requests, batching, decoding), :mod:`~.sampling` (per-note seeded
sampling), :mod:`~.kv_cache` and :mod:`~.attention` (the static/ring KV cache and the decoding attention the engine
uses), :mod:`~.loading` (model source, adapter checks, :func:`~dischargesum.inference.loading.load_engine`),
:mod:`~.stage` (processes, crash-safe sharded JSONL, :func:`~dischargesum.inference.stage.run_sharded_stage`),
:mod:`~.generate`, :mod:`~.compress`, :mod:`~.pipeline`. Import from the modules; this package exports nothing.
"""
