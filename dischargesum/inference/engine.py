"""The one generation engine (used by generate AND compress): requests, batching, decoding, out-of-memory retries.

What a batch goes through (:class:`InferenceEngine`):

1. **Prompts** are the chat template of the same messages training used, tokenized exactly as TRL does
   (``apply_chat_template(..., tokenize=True)``, no extra special tokens); a :class:`GenerationRequest` carries the
   token ids, so everything below works on ids (the benchmark feeds ids directly).
2. **Batches** (:func:`plan_batches`): requests sorted by prompt length, longest first (an out-of-memory batch
   shows up at once, not hours in), packed greedily so that ``batch size x (longest prompt + max_new_tokens)``
   stays within ``batch_token_budget`` and the size within ``max_batch_size``. Prompts are left-padded.
3. **Decoding** is ``model.generate`` with a generation config the engine owns (the model's own defaults — e.g.
   Gemma's ``top_k=64`` — never leak in): greedy, or sampling through
   :class:`~dischargesum.inference.sampling.SeededSampler`. Generation stops per row at the tokenizer's eos or the
   chat template's end-of-turn token (``<end_of_turn>`` for Gemma, ``<|eot_id|>`` for Llama 3), or at the row's own
   ``max_new_tokens``.
4. **Outputs** are cut by TOKEN COUNT: the generated ids are ``output[:, padded_prompt_length:]``, never the decoded
   string minus the decoded prompt (the seed's way lost ~43 characters of every summary). ``new_tokens`` counts the
   generated tokens including the stop token; ``finish_reason`` is ``eos`` (a stop token was generated) or
   ``length`` (the row hit its ``max_new_tokens``).

What holds about determinism (a note's output should not depend on which batch, rank or resume it landed in):

* **Greedy**: the result is a function of the note's logits only. Left padding with the attention mask and
  position ids derived from it make the math batch-independent; the *numerics* are not exactly (a different
  padded shape picks different matmul/attention kernel tilings, so logits can differ in the last bits, and a
  near-tie between two tokens can flip). On CPU in fp32 the tests see identical outputs batched and one by one.
  Across process counts generate keeps outputs identical by construction: batches are planned over ALL notes and
  then dealt to ranks (:meth:`dischargesum.inference.stage.Processes.share`), so every note sees the same batch
  whatever the number of processes.
* **Sampling**: :class:`~dischargesum.inference.sampling.SeededSampler` draws from counter-based noise keyed by
  (note seed, step, token id), so a note's random numbers never depend on its batch neighbours, its position in
  the batch, the process or a resume. The same "up to kernel numerics" caveat applies.
* ``cache_implementation: static`` + ``compile``: same math; fused kernels change the numerics as above.

Model loading is :mod:`dischargesum.inference.loading`; crash-safe sharded output is
:mod:`dischargesum.inference.stage`. Benchmarks extend the engine through :meth:`InferenceEngine.decoding_config`.
"""

from __future__ import annotations

import contextlib
import gc
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from transformers import GenerationConfig, StoppingCriteria

from dischargesum.cli import UserError
from dischargesum.config import ConfigError, InferenceConfig, settings_from_config
from dischargesum.inference.kv_cache import (
    attach_ring,
    build_static_cache,
    memory_plan,
    prefill_in_chunks,
    ring_layers,
    ring_supported,
    set_row_starts,
)
from dischargesum.inference.sampling import SeededSampler, clear_noise_cache
from dischargesum.logging_utils import get_logger

logger = get_logger(__name__)

FinishReason = Literal["eos", "length"]
# End-of-turn tokens of the chat templates we know (Gemma, Llama 3, ChatML, Phi-3), used as stop tokens when the
# tokenizer has them; the tokenizer's eos and the model's generation_config eos ids are always stop tokens too.
END_OF_TURN_TOKENS = ("<end_of_turn>", "<|eot_id|>", "<|im_end|>", "<|end|>")


# ---------------------------------------------------------------------------------------------------------------
# Requests, results, settings
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt to complete. ``key`` is unique (the note_id); ``index`` the input position (tie-breaker)."""

    key: str
    prompt_ids: Sequence[int]
    max_new_tokens: int
    seed: int = 0
    index: int = 0


@dataclass(frozen=True)
class GenerationResult:
    """A completion. ``token_ids`` exclude the stop token; ``new_tokens`` count it (it was generated).

    ``seconds`` is the batch's wall time divided by its size (so the sum over notes is the time spent);
    ``batch_size`` the number of real notes in that batch.
    """

    key: str
    text: str
    token_ids: tuple[int, ...]
    prompt_tokens: int
    new_tokens: int
    finish_reason: FinishReason
    seconds: float
    batch_size: int


@dataclass(frozen=True)
class EngineSettings:
    """Decoding and batching knobs of :class:`InferenceEngine` (built from a config, or directly by benchmarks)."""

    batch_token_budget: int = 131_072
    max_batch_size: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    cache_implementation: Literal["dynamic", "static"] = "dynamic"
    compile: bool = False
    # Static cache only: sliding-window layers as ring buffers of `window` slots, or full-length layers.
    sliding_window_cache: Literal["ring", "full"] = "ring"
    # Static cache only: prefill this many rows at a time (0 = the whole batch at once).
    prefill_chunk_rows: int = 0

    @classmethod
    def from_config(cls, cfg: InferenceConfig) -> EngineSettings:
        return settings_from_config(cls, cfg)


# ---------------------------------------------------------------------------------------------------------------
# Prompts and stop tokens
# ---------------------------------------------------------------------------------------------------------------


def encode_chats(tokenizer: Any, conversations: Sequence[list[dict[str, str]]]) -> list[list[int]]:
    """Token ids of each conversation's prompt with the generation prompt appended, exactly as TRL tokenizes the
    prompt of a training example (``apply_chat_template(..., tokenize=True)`` adds no special tokens of its own)."""
    if not conversations:
        return []
    encoded = tokenizer.apply_chat_template(
        list(conversations), add_generation_prompt=True, tokenize=True, return_dict=True
    )
    return [list(ids) for ids in encoded["input_ids"]]


def stop_token_ids(tokenizer: Any, generation_config: Any = None) -> list[int]:
    """Ids that end a completion: eos (tokenizer and model generation config) and known end-of-turn tokens.

    Raises:
        ConfigError: the tokenizer defines no stop token at all (generation would never stop).
    """
    ids: set[int] = set()
    for source in (getattr(generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, list | tuple):
            ids.update(int(i) for i in source)
    vocab = tokenizer.get_vocab()
    ids.update(vocab[token] for token in END_OF_TURN_TOKENS if token in vocab)
    if not ids:
        raise ConfigError(
            "the tokenizer has no eos or end-of-turn token, so generation would never stop; use a chat model's "
            "tokenizer (its tokenizer_config.json names eos_token)."
        )
    return sorted(ids)


# ---------------------------------------------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------------------------------------------


def batch_cost(batch: Sequence[GenerationRequest]) -> int:
    """Tokens a batch holds at its end: size x (longest prompt + largest max_new_tokens)."""
    longest = max(len(r.prompt_ids) for r in batch)
    return len(batch) * (longest + max(r.max_new_tokens for r in batch))


def plan_batches(
    requests: Sequence[GenerationRequest], *, batch_token_budget: int, max_batch_size: int
) -> list[list[GenerationRequest]]:
    """Sort by prompt length (longest first, then input order) and pack greedily under the budget.

    A request that alone exceeds the budget gets a batch of its own (it must run; a warning says so). The plan is
    a pure function of the requests, so every rank computes the same one.

    Raises:
        ValueError: a non-positive budget or batch size.
    """
    if batch_token_budget < 1 or max_batch_size < 1:
        raise ValueError("batch_token_budget and max_batch_size must be >= 1")
    ordered = sorted(requests, key=lambda r: (-len(r.prompt_ids), r.index, r.key))
    batches: list[list[GenerationRequest]] = []
    current: list[GenerationRequest] = []
    for request in ordered:
        if current and (len(current) >= max_batch_size or batch_cost([*current, request]) > batch_token_budget):
            batches.append(current)
            current = []
        current.append(request)
        if len(current) == 1 and batch_cost(current) > batch_token_budget:
            logger.warning(
                "note %s alone needs %d tokens (prompt %d + max_new_tokens %d), above batch_token_budget=%d; it runs "
                "in a batch of one",
                request.key,
                batch_cost(current),
                len(request.prompt_ids),
                request.max_new_tokens,
                batch_token_budget,
            )
    if current:
        batches.append(current)
    return batches


def plan_fixed_shape_batches(
    requests: Sequence[GenerationRequest], *, batch_token_budget: int, max_batch_size: int
) -> tuple[list[list[GenerationRequest]], int, int]:
    """Batches of ONE size for a static KV cache of one length (what CUDA graphs need): returns the batches (the
    last may be shorter; the engine pads it with copies), the batch size and the cache length.

    The size is the largest the budget allows, then evened out over the batches that size needs (256 notes under a
    cap of 81 run as 4 x 64, not 81 + 81 + 81 + 13 padded to 81, which would decode 68 copies for nothing).
    """
    if not requests:
        return [], 1, 1
    cache_len = max(len(r.prompt_ids) for r in requests) + max(r.max_new_tokens for r in requests)
    cap = max(1, min(max_batch_size, batch_token_budget // cache_len))
    n_batches = -(-len(requests) // cap)
    size = -(-len(requests) // n_batches)
    ordered = sorted(requests, key=lambda r: (-len(r.prompt_ids), r.index, r.key))
    return [ordered[i : i + size] for i in range(0, len(ordered), size)], size, cache_len


@dataclass(frozen=True)
class BatchPlan:
    """Batches in run order; with a static cache also the one (batch size, cache length) every batch uses."""

    batches: list[list[GenerationRequest]]
    static_shape: tuple[int, int] | None = None


def plan_requests(settings: EngineSettings, requests: Sequence[GenerationRequest]) -> BatchPlan:
    """The batch plan for ``requests`` under ``settings`` (no model needed: every rank computes the same plan)."""
    kwargs = {"batch_token_budget": settings.batch_token_budget, "max_batch_size": settings.max_batch_size}
    if settings.cache_implementation == "static":
        batches, size, cache_len = plan_fixed_shape_batches(requests, **kwargs)
        return BatchPlan(batches, (size, cache_len) if batches else None)
    return BatchPlan(plan_batches(requests, **kwargs))


class RowTokenLimits(StoppingCriteria):
    """Stops each row at its own ``max_new_tokens`` (``generate`` only knows one limit per call)."""

    def __init__(self, limits: Sequence[int], prompt_length: int):
        self.limits = torch.tensor(list(limits), dtype=torch.long)
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if self.limits.device != input_ids.device:
            self.limits = self.limits.to(input_ids.device)
        return self.limits <= (input_ids.shape[1] - self.prompt_length)


# ---------------------------------------------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------------------------------------------


class InferenceEngine:
    """Generates completions for :class:`GenerationRequest` s with a loaded model and tokenizer.

    The engine owns the model's generation config (replaced at construction), the stop tokens and — with
    ``cache_implementation: static`` — one KV cache reused by every batch (same addresses, so compiled CUDA graphs
    replay instead of re-recording). :meth:`close` frees all of it.
    """

    def __init__(self, model: Any, tokenizer: Any, settings: EngineSettings):
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings
        # An unmerged PEFT model generates through its base model: configure that one.
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.stop_ids = stop_token_ids(tokenizer, getattr(inner, "generation_config", None))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0]
        # Our config only: the checkpoint's defaults (Gemma ships do_sample/top_k/top_p) must not change decoding.
        inner.generation_config = GenerationConfig(
            eos_token_id=self.stop_ids, pad_token_id=self.pad_id, bos_token_id=tokenizer.bos_token_id
        )
        self._text_config = inner.config.get_text_config(decoder=True)
        self._cache_kwarg = _cache_kwarg_name(inner)
        self._static_cache: Any = None
        self._static_shape: tuple[int, int] | None = None
        self._max_new_tokens = 0  # of the planned requests: the prompt part of the cache length, for the memory plan
        self.memory_plan: dict[str, float] | None = None

    @property
    def device(self) -> torch.device:
        return self.model.device

    # -- planning ----------------------------------------------------------------------------------------------
    def plan(self, requests: Sequence[GenerationRequest]) -> list[list[GenerationRequest]]:
        """Batches for ``requests`` (:func:`plan_requests`); sizes the static cache for them when there is one."""
        plan = plan_requests(self.settings, requests)
        if requests:
            self._max_new_tokens = max(r.max_new_tokens for r in requests)
        if plan.static_shape is not None:
            self._ensure_static_shape(*plan.static_shape)
        return plan.batches

    def _ensure_static_shape(self, size: int, cache_len: int) -> None:
        # A cache that is already big enough is kept (smaller batches are padded up to its size): a new shape would
        # mean new CUDA graphs and a recompile, which costs more than decoding a few padding rows.
        if self._static_shape is not None:
            old_size, old_len = self._static_shape
            if old_size >= size and old_len >= cache_len:
                return
        self._static_cache = None
        self._static_shape = (size, cache_len)

    # -- generation --------------------------------------------------------------------------------------------
    def generate(
        self, requests: Sequence[GenerationRequest], *, batches: Sequence[list[GenerationRequest]] | None = None
    ) -> Iterator[tuple[list[GenerationRequest], list[GenerationResult]]]:
        """Yield ``(batch, results)`` per batch in plan order; ``batches`` (e.g. a rank's share) replaces the plan."""
        for batch in self.plan(requests) if batches is None else batches:
            yield batch, self.run_batch(batch)

    def generate_all(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """All results, in the order of ``requests``."""
        by_key = {}
        for _batch, results in self.generate(requests):
            by_key.update({r.key: r for r in results})
        return [by_key[r.key] for r in requests]

    def run_batch(self, batch: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Generate one batch. A CUDA out-of-memory error splits the batch in halves and retries; with a static cache
        the cache's batch size is halved too (new shapes: the compiled step recompiles once for them), and every
        later batch runs in pieces of that size.

        Raises:
            UserError: a single note does not fit in GPU memory.
        """
        static = self.settings.cache_implementation == "static"
        if static and self._static_shape is not None and len(batch) > self._static_shape[0]:
            size = self._static_shape[0]  # an earlier out-of-memory halved the cache: run in pieces that fit it
            return [r for i in range(0, len(batch), size) for r in self.run_batch(batch[i : i + size])]
        try:
            return self._run_batch(batch)
        except torch.cuda.OutOfMemoryError:
            if len(batch) == 1:
                raise UserError(
                    f"out of GPU memory generating a batch of {len(batch)} (longest prompt "
                    f"{max(len(r.prompt_ids) for r in batch)} tokens, max_new_tokens "
                    f"{max(r.max_new_tokens for r in batch)}); lower `batch_token_budget` / `max_batch_size` or "
                    "`max_new_tokens`, or use `load_in_4bit: true`."
                ) from None
            half = len(batch) // 2
            if static and self._static_shape is not None:
                self._static_shape = (max(1, min(self._static_shape[0] // 2, half)), self._static_shape[1])
                self._static_cache = None  # and the compiled graphs of the old shape with it
                release_memory()
            else:
                gc.collect()
                torch.cuda.empty_cache()
            logger.warning(
                "out of GPU memory on a batch of %d (cost %d tokens): splitting it in halves; lower "
                "batch_token_budget to avoid the retry",
                len(batch),
                batch_cost(batch),
            )
            return self.run_batch(batch[:half]) + self.run_batch(batch[half:])

    def _run_batch(self, batch: Sequence[GenerationRequest]) -> list[GenerationResult]:
        from transformers import CompileConfig, LogitsProcessorList, StoppingCriteriaList

        s = self.settings
        rows = list(batch)
        if s.cache_implementation == "static":
            assert self._static_shape is not None, "plan() sets the static shape"
            size, cache_len = self._static_shape
            if len(rows) > size or batch_cost(rows) > size * cache_len:
                raise ValueError("a static-cache batch exceeds the planned shape (plan with this engine)")
            # Pad with copies of the last request: every call then has the same shape (outputs are discarded).
            rows += [rows[-1]] * (size - len(rows))
        length = max(len(r.prompt_ids) for r in rows)
        input_ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, request in enumerate(rows):
            n = len(request.prompt_ids)
            input_ids[i, length - n :] = torch.tensor(request.prompt_ids, dtype=torch.long)
            attention_mask[i, length - n :] = 1
        limits = [r.max_new_tokens for r in rows]
        max_new = max(limits)
        config = self.decoding_config(max_new)
        kwargs: dict[str, Any] = {}
        cache = None
        if s.cache_implementation == "static":
            cache = kwargs[self._cache_kwarg] = self._reset_static_cache()
            if s.compile:
                compile_config = CompileConfig(fullgraph=False, dynamic=False, mode="reduce-overhead")
                if self.device.type != "cuda":
                    compile_config._compile_all_devices = True  # type: ignore[assignment]  # CPU: functional check only
                config.compile_config = compile_config
            else:
                # transformers compiles by itself whenever a static cache is on CUDA; only `compile` asks for it.
                config.disable_compile = True
        processors = LogitsProcessorList()
        if s.do_sample:
            processors.append(
                SeededSampler([r.seed for r in rows], length, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p)
            )
        stopping = StoppingCriteriaList()
        if min(limits) < max_new:
            stopping.append(RowTokenLimits(limits, length))
        device = self.device
        start = time.perf_counter()
        with torch.inference_mode(), attach_ring(self.model, cache):
            input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
            if cache is not None:
                set_row_starts(cache, attention_mask)
                if 0 < s.prefill_chunk_rows < len(rows):
                    prefill_in_chunks(
                        self.model, cache, input_ids, attention_mask,
                        rows=s.prefill_chunk_rows, cache_kwarg=self._cache_kwarg,
                    )  # fmt: skip
            output = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                generation_config=config,
                logits_processor=processors,
                stopping_criteria=stopping,
                **kwargs,
            )
        generated = output[: len(batch), length:].tolist()
        seconds = time.perf_counter() - start
        stop = set(self.stop_ids)
        results = []
        for request, tokens in zip(batch, generated):
            tokens = tokens[: request.max_new_tokens]
            end = next((i for i, t in enumerate(tokens) if t in stop), None)
            if end is None:
                kept, new_tokens, reason = tokens, len(tokens), "length"
            else:
                kept, new_tokens, reason = tokens[:end], end + 1, "eos"
            results.append(
                GenerationResult(
                    key=request.key,
                    text=self.tokenizer.decode(kept, skip_special_tokens=True).strip(),
                    token_ids=tuple(kept),
                    prompt_tokens=len(request.prompt_ids),
                    new_tokens=new_tokens,
                    finish_reason=reason,  # type: ignore[arg-type]
                    seconds=seconds / len(batch),
                    batch_size=len(batch),
                )
            )
        return results

    def decoding_config(self, max_new_tokens: int) -> GenerationConfig:
        """The generation config of a batch whose longest row may generate ``max_new_tokens``: greedy (sampling is
        a logits processor), the engine's stop and pad tokens. Subclasses may extend it (the throughput benchmark
        forces a fixed output length); the static-cache compile settings are added after it."""
        return GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            eos_token_id=self.stop_ids,
            pad_token_id=self.pad_id,
            bos_token_id=self.tokenizer.bos_token_id,
        )

    def _reset_static_cache(self) -> Any:
        assert self._static_shape is not None
        if self._static_cache is None:
            ring = self.settings.sliding_window_cache == "ring" and ring_supported(self.model)
            if self.settings.sliding_window_cache == "ring" and not ring:
                logger.info("sliding_window_cache: ring needs attn_implementation auto on a grouped-query model; "
                            "using full-length sliding-window layers")  # fmt: skip
            self._static_cache = build_static_cache(self._text_config, self._static_shape[1], ring=ring)
            self.memory_plan = memory_plan(
                self.model, self._text_config, batch=self._static_shape[0], cache_len=self._static_shape[1],
                ring=bool(ring_layers(self._static_cache)), prompt_len=self._static_shape[1] - self._max_new_tokens,
                prefill_rows=min(self._static_shape[0], self.settings.prefill_chunk_rows or self._static_shape[0]),
            )  # fmt: skip
            logger.info(
                "static KV cache for batch %d x %d positions: weights %.2f GiB, KV cache %.2f GiB, prefill working "
                "set ~%.2f GiB (estimate)%s",
                *self._static_shape, self.memory_plan["weights"], self.memory_plan["kv_cache"],
                self.memory_plan["prefill"],
                f", GPU memory free for them {self.memory_plan['free']:.2f} GiB" if "free" in self.memory_plan else "",
            )  # fmt: skip
        else:
            with torch.inference_mode():  # the cache tensors were created under inference mode
                self._static_cache.reset()
        return self._static_cache

    # -- text helpers --------------------------------------------------------------------------------------------
    def encode_chats(self, conversations: Sequence[list[dict[str, str]]]) -> list[list[int]]:
        return encode_chats(self.tokenizer, conversations)

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Tokens of plain texts (no special tokens): the length unit of compression ratios."""
        if not texts:
            return []
        return [len(ids) for ids in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]]

    # -- teardown ------------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Release the model, the cache and compiled graphs, so the next stage starts from an empty GPU."""
        self._static_cache = None
        self.model = None
        release_memory()


def _cache_kwarg_name(model: Any) -> str:
    """``generate``'s keyword for a user cache: ``cache`` in newer transformers, ``past_key_values`` before."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def release_memory() -> None:
    """Collect garbage, drop torch.compile's caches (they hold references to compiled modules) and empty the CUDA
    allocator's cache."""
    dynamo = sys.modules.get("torch._dynamo")  # only when something compiled (importing it costs seconds)
    if dynamo is not None:
        with contextlib.suppress(Exception):
            dynamo.reset()
    clear_noise_cache()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
