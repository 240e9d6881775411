"""The one generation engine: batched, sharded across processes, resumable, used by generate AND compress.

What a batch goes through (:class:`InferenceEngine`):

1. **Prompts** are the chat template of the same messages training used, tokenized exactly as TRL does
   (``apply_chat_template(..., tokenize=True)``, no extra special tokens); a :class:`GenerationRequest` carries the
   token ids, so everything below works on ids (the benchmark feeds ids directly).
2. **Batches** (:func:`plan_batches`): requests sorted by prompt length, longest first (an out-of-memory batch
   shows up at once, not hours in), packed greedily so that ``batch size x (longest prompt + max_new_tokens)``
   stays within ``batch_token_budget`` and the size within ``max_batch_size``. Prompts are left-padded.
3. **Decoding** is ``model.generate`` with a generation config the engine owns (the model's own defaults — e.g.
   Gemma's ``top_k=64`` — never leak in): greedy, or sampling through :class:`SeededSampler`. Generation stops per
   row at the tokenizer's eos or the chat template's end-of-turn token (``<end_of_turn>`` for Gemma,
   ``<|eot_id|>`` for Llama 3), or at the row's own ``max_new_tokens``.
4. **Outputs** are cut by TOKEN COUNT: the generated ids are ``output[:, padded_prompt_length:]``, never the decoded
   string minus the decoded prompt (the seed's way lost ~43 characters of every summary). ``new_tokens`` counts the
   generated tokens including the stop token; ``finish_reason`` is ``eos`` (a stop token was generated) or
   ``length`` (the row hit its ``max_new_tokens``).

What holds about determinism (a note's output should not depend on which batch, rank or resume it landed in):

* **Greedy**: the result is a function of the note's logits only. Left padding with the attention mask and
  position ids derived from it make the math batch-independent; the *numerics* are not exactly (a different
  padded shape picks different matmul/attention kernel tilings, so logits can differ in the last bits, and a
  near-tie between two tokens can flip). On CPU in fp32 the tests see identical outputs batched and one by one.
  Across process counts :func:`run_generation` keeps outputs identical by construction: batches are planned over
  ALL notes and then dealt to ranks, so every note sees the same batch whatever the number of processes.
* **Sampling**: :class:`SeededSampler` draws with the Gumbel-max trick from counter-based noise: the noise for
  (note seed, step, token id) is a fixed integer hash, so a note's random numbers never depend on its batch
  neighbours, its position in the batch, the process or a resume. Temperature / top-k / top-p are applied per
  row. The same "up to kernel numerics" caveat applies to the logits the noise is added to.
* ``cache_implementation: static`` + ``compile``: same math; fused kernels change the numerics as above.

Resumability and crash safety (:class:`ShardedJsonlOutput`): every process appends its records to its own part
file (``<output_dir>/parts/<name>.rank<r>.jsonl``), flushed and fsynced after each batch. On (re)start the main
process repairs the part files — a torn last line (no newline, or not valid JSON) is dropped and that note is
generated again — and every rank skips the note_ids already written. At the end each rank drops a done marker;
the main process waits for all markers (files, not a collective, so an unbalanced shard never hits a NCCL timeout)
and merges the parts into ``<output_dir>/<name>`` in input order (atomic rename). A rerun whose settings differ
from the run that wrote the parts is refused (``overwrite: true`` starts over), so outputs never mix settings.
A torn line in the merged output itself is dropped on the next run and the output rebuilt from the parts. Part
files and merged outputs hold patient text: they are created 0600 in 0700 directories.
Across machines, ``output_dir`` must be on a filesystem every node sees: part files and markers are where the ranks
meet. Every rank tokenizes every prompt (to compute the same batch plan); ids are kept as 4-byte arrays.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import shutil
import sys
import time
import weakref
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from transformers import GenerationConfig, LogitsProcessor, StoppingCriteria

from dischargesum.artifacts import PARTS_DIR, STAGE1_FILE, read_jsonl
from dischargesum.cli import UserError
from dischargesum.config import ConfigError, InferenceConfig
from dischargesum.kv_cache import (
    attach_ring,
    build_static_cache,
    memory_plan,
    prefill_in_chunks,
    ring_layers,
    ring_supported,
    set_row_starts,
)
from dischargesum.logging_utils import get_logger, show_progress
from dischargesum.manifest import (
    ArtifactError,
    atomic_write_json,
    canonical_hash,
    open_private,
    private_dir,
    read_manifest,
    require_artifact,
)

if TYPE_CHECKING:
    from dischargesum.config import GenerateConfig

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
    # Forces every row to generate at least this many tokens (stop tokens are masked until then). Benchmarks only:
    # random weights never emit a stop token at a realistic point, so tokens/s needs a fixed length.
    min_new_tokens: int = 0

    @classmethod
    def from_config(cls, cfg: InferenceConfig) -> EngineSettings:
        return cls(
            batch_token_budget=cfg.batch_token_budget,
            max_batch_size=cfg.max_batch_size,
            do_sample=cfg.do_sample,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            top_k=cfg.top_k,
            cache_implementation=cfg.cache_implementation,
            compile=cfg.compile,
            sliding_window_cache=cfg.sliding_window_cache,
            prefill_chunk_rows=cfg.prefill_chunk_rows,
        )


def note_seed(seed: int, key: str) -> int:
    """A 32-bit per-note seed from the run seed and a note key (sha256: stable across machines and runs)."""
    digest = hashlib.sha256(f"{seed}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def request_seeds(seed: int, keys: Sequence[str], policy: Literal["note_id", "input_order"]) -> list[int]:
    """Per-note seeds by ``seed_policy``: hash of the note_id, or of the row number in the input."""
    if policy == "note_id":
        return [note_seed(seed, key) for key in keys]
    return [note_seed(seed, f"#{i}") for i in range(len(keys))]


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


def deal_batches(
    batches: Sequence[list[GenerationRequest]], rank: int, world_size: int
) -> list[list[GenerationRequest]]:
    """This rank's batches: batch i goes to rank i mod world_size (the plan is global, so a note's batch — and hence
    its greedy output — is the same for any number of processes; longest-first order balances the ranks)."""
    return [batch for i, batch in enumerate(batches) if i % world_size == rank]


# ---------------------------------------------------------------------------------------------------------------
# Per-note seeded sampling (counter-based Gumbel-max) and per-row length limits
# ---------------------------------------------------------------------------------------------------------------

_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """(x * constant) mod 2**32 for int64 tensors holding 32-bit values, without int64 overflow."""
    low = x & 0xFFFF
    high = x >> 16
    return ((((high * constant) & 0xFFFF) << 16) + low * constant) & _MASK32


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (Wellons' lowbias32) of int64 tensors with values in [0, 2**32): a bijection with good
    avalanche, evaluated elementwise on any device."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


_TOKEN_HASH_CACHE: dict[tuple[str, int], torch.Tensor] = {}


def gumbel_noise(seeds: torch.Tensor, step: int, vocab_size: int) -> torch.Tensor:
    """Gumbel(0, 1) noise of shape (rows, vocab) that depends only on (row seed, step, token id)."""
    device = seeds.device
    cache_key = (str(device), vocab_size)
    token_hash = _TOKEN_HASH_CACHE.get(cache_key)
    if token_hash is None:
        token_hash = hash32(torch.arange(vocab_size, dtype=torch.int64, device=device) + 0x632BE5AB)
        _TOKEN_HASH_CACHE[cache_key] = token_hash
    step_key = int(hash32(torch.tensor([(step * 0x9E3779B9 + 0x85EBCA6B) & _MASK32])).item())
    row_key = hash32(seeds.to(torch.int64) ^ step_key)
    bits = hash32(row_key[:, None] ^ token_hash[None, :])
    # 24 random bits -> a float32-exact uniform in (0, 1), never 0 or 1.
    uniform = ((bits >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))
    return -torch.log(-torch.log(uniform))


def filter_top_k_top_p(scores: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set scores outside the top-k / nucleus (top-p) to -inf, row by row (the most likely token always stays)."""
    if top_k and top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True, stable=True)
        probs = sorted_scores.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        remove_sorted = mass_before >= top_p
        remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
        scores = scores.masked_fill(remove, float("-inf"))
    return scores


class SeededSampler(LogitsProcessor):
    """Turns greedy decoding into per-note seeded sampling: returns ``scores / T`` (top-k/top-p filtered) plus
    Gumbel noise keyed by (note seed, step, token id); the argmax of that is a sample from the filtered softmax.

    Used with ``do_sample=False`` so ``generate`` adds no sampler of its own and takes the argmax.
    """

    def __init__(self, seeds: Sequence[int], prompt_length: int, *, temperature: float, top_k: int, top_p: float):
        self.seeds = torch.tensor([s & _MASK32 for s in seeds], dtype=torch.int64)
        self.prompt_length = prompt_length
        self.temperature = temperature
        self.top_k = top_k
        self.top_p = top_p

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = input_ids.shape[1] - self.prompt_length
        if self.seeds.device != scores.device:
            self.seeds = self.seeds.to(scores.device)
        scores = filter_top_k_top_p(scores.float() / self.temperature, self.top_k, self.top_p)
        return scores + gumbel_noise(self.seeds, step, scores.shape[-1])


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
        config = GenerationConfig(
            max_new_tokens=max_new,
            min_new_tokens=min(s.min_new_tokens, max_new) or None,
            do_sample=False,
            num_beams=1,
            eos_token_id=self.stop_ids,
            pad_token_id=self.pad_id,
            bos_token_id=self.tokenizer.bos_token_id,
        )
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
    layers by ring buffers of ``window`` slots (:mod:`dischargesum.kv_cache`), without the per-step guard.
    """
    return build_static_cache(text_config, max_cache_len, ring=False)


def _cache_kwarg_name(model: Any) -> str:
    """``generate``'s keyword for a user cache: ``cache`` in newer transformers, ``past_key_values`` before."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def default_compile_cache_dir() -> Path:
    """``$TORCHINDUCTOR_CACHE_DIR`` when set, else ``$XDG_CACHE_HOME`` (or ~/.cache)/dischargesum/torch_compile."""
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dischargesum" / "torch_compile"


def configure_compile_cache(directory: str | Path | None = None) -> Path:
    """Point torch.compile's on-disk caches at ``directory`` (default :func:`default_compile_cache_dir`) and make sure
    they are on, so a second run on this machine loads the compiled decoding step instead of compiling it again.

    What is cached there: inductor's FX-graph cache (generated kernels and wrappers), AOTAutograd's cache and
    Triton's compiled kernels (inductor puts them under the same directory unless ``TRITON_CACHE_DIR`` is set).
    What a rerun still pays: dynamo's tracing of the model's Python and the CUDA-graph capture (neither is cached by
    torch). torch's default directory is under /tmp (``/tmp/torchinductor_<user>``), which many machines wipe; a
    per-user directory survives. Must run before the first compilation (inductor reads the variable lazily).
    Returns the directory.
    """
    path = Path(directory).expanduser() if directory else default_compile_cache_dir()
    path.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path.resolve())
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    functorch_config.enable_autograd_cache = True
    logger.info("torch.compile caches: %s (a rerun reuses the compiled decoding step)", path)
    return path


def release_memory() -> None:
    """Collect garbage, drop torch.compile's caches (they hold references to compiled modules) and empty the CUDA
    allocator's cache."""
    dynamo = sys.modules.get("torch._dynamo")  # only when something compiled (importing it costs seconds)
    if dynamo is not None:
        with contextlib.suppress(Exception):
            dynamo.reset()
    _TOKEN_HASH_CACHE.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------------
# Loading a model for inference (base + adapter), with checks before any weight is read
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSource:
    """What to load: a base model and an optional LoRA adapter, checked before loading."""

    base: str
    adapter: str | None
    tokenizer_path: str
    adapter_sha256: str | None = None
    adapter_stage: str | None = None


def check_adapter_dir(adapter: str, *, field: str = "adapter") -> tuple[str | None, str]:
    """Check that ``adapter`` is a usable LoRA adapter directory before any model is loaded.

    A ``checkpoint-N`` directory must pass :func:`dischargesum.training.checkpoint_store.validate_checkpoint` (size
    check); a directory with a dischargesum manifest (sft_qlora's ``final/``) must be a completed sft_qlora output; a
    plain peft directory (no manifest) is accepted with a warning. Returns ``(producing stage, weights sha256)``.

    Raises:
        ArtifactError: missing directory, incomplete or foreign output, invalid checkpoint, no adapter weights.
    """
    from dischargesum.manifest import sha256_file
    from dischargesum.training.checkpoint_store import parse_checkpoint_step, validate_checkpoint

    d = Path(adapter)
    if not d.is_dir():
        raise ArtifactError(
            f"`{field}` = {adapter}: no such directory. Point it at sft_qlora's <output_dir>/final (or a "
            "checkpoint-N directory), or run sft_qlora first."
        )
    stage: str | None = None
    if parse_checkpoint_step(d.name) is not None:
        status = validate_checkpoint(d, verify_checksums=False)
        if not status.valid:
            raise ArtifactError(
                f"`{field}` = {adapter} is not a valid checkpoint: {status.reason}. Use another checkpoint or "
                "sft_qlora's final/ directory."
            )
        stage = "checkpoint"
    elif read_manifest(d) is not None:
        stage = str(require_artifact(d, stage="sft_qlora", field=field).get("stage"))
    else:
        logger.warning("`%s` = %s has no dischargesum manifest; using it as a plain peft adapter", field, adapter)
    if not (d / "adapter_config.json").is_file():
        raise ArtifactError(f"`{field}` = {adapter}: no adapter_config.json (not a LoRA adapter directory).")
    weights = d / "adapter_model.safetensors"
    if not weights.is_file():
        raise ArtifactError(
            f"`{field}` = {adapter}: no adapter_model.safetensors (pickled .bin adapters are not loaded; "
            "re-save the adapter with safetensors)."
        )
    return stage, sha256_file(weights)


def resolve_model_source(
    model_name_or_path: str | None, adapter: str | None, *, field: str = "adapter"
) -> ModelSource:
    """Decide base, adapter and tokenizer, checking each exists (config.json only, no weights).

    The base is ``model_name_or_path`` when given (a warning notes a difference from the adapter's record), else the
    base recorded in the adapter. The tokenizer comes from the adapter directory when it has one (sft_qlora saves
    the tokenizer it trained with), else from the base.

    Raises:
        ArtifactError: bad adapter directory. ConfigError: no base model known, or it cannot be found.
    """
    from dischargesum.modeling import read_model_info, resolve_adapter_base

    stage = sha = None
    base = model_name_or_path
    if adapter is not None:
        stage, sha = check_adapter_dir(adapter, field=field)
        recorded = resolve_adapter_base(adapter)
        if base is None:
            base = recorded
        elif base != recorded:
            logger.warning("adapter %s was trained on %s; loading it onto %s as configured", adapter, recorded, base)
    if base is None:
        raise ConfigError("set `model_name_or_path` or `adapter` (a LoRA adapter directory that records its base).")
    read_model_info(base)  # raises ConfigError naming model_name_or_path when it cannot be found
    has_tokenizer = adapter is not None and (Path(adapter) / "tokenizer_config.json").is_file()
    return ModelSource(
        base=base,
        adapter=adapter,
        tokenizer_path=str(adapter) if has_tokenizer else base,
        adapter_sha256=sha,
        adapter_stage=stage,
    )


def resolve_precision(precision: str, model_path: str, *, device_type: str) -> str:
    """``auto`` -> bf16 on a GPU that has it, else fp32; fp16 is refused for Gemma 3. Returns a dtype name.

    Raises:
        ConfigError: fp16 with a Gemma 3 model, or bf16 on a device without it.
    """
    from dischargesum.modeling import read_model_info

    if precision == "fp16" and read_model_info(model_path).is_gemma3:
        raise ConfigError(
            f"`precision` = fp16 with Gemma 3 ({model_path}): its activations overflow fp16 (NaN / device asserts). "
            "Use `precision: auto` (bf16 where supported, else fp32)."
        )
    if precision == "fp32":
        return "float32"
    if precision == "fp16":
        return "float16"
    bf16 = device_type == "cuda" and torch.cuda.is_bf16_supported()
    if precision == "bf16":
        if device_type == "cuda" and not bf16:
            raise ConfigError("`precision` = bf16 but this GPU has no bf16; use `precision: auto` (fp32) or fp16.")
        return "bfloat16"
    return "bfloat16" if bf16 else "float32"


# Every model load_engine created and that is still alive: the pipeline checks that stage 1's is gone.
_LIVE_MODELS: weakref.WeakSet[Any] = weakref.WeakSet()


def live_model_count() -> int:
    """How many models loaded by :func:`load_engine` are still referenced (after a garbage collection)."""
    gc.collect()
    return len(_LIVE_MODELS)


def load_engine(
    source: ModelSource,
    settings: EngineSettings,
    *,
    precision: str,
    load_in_4bit: bool,
    merge_adapter: bool,
    attn_implementation: str,
    device: Any,
) -> InferenceEngine:
    """Load tokenizer, base and adapter (merged into the base, or kept as LoRA layers) onto ``device``.

    Raises:
        ConfigError: the model cannot be loaded; 4-bit without CUDA-capable bitsandbytes is bitsandbytes' error.
    """
    from dischargesum.modeling import load_base_model, load_tokenizer

    device = torch.device(device)
    dtype = resolve_precision(precision, source.base, device_type=device.type)
    tokenizer = load_tokenizer(source.tokenizer_path, padding_side="left")
    start = time.perf_counter()
    model: Any = load_base_model(
        source.base,
        dtype=dtype,
        load_in_4bit=load_in_4bit,
        attn_implementation="sdpa" if attn_implementation == "auto" else attn_implementation,
        device_map={"": str(device)},
    )
    if source.adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, source.adapter, is_trainable=False)
        if merge_adapter:
            model = model.merge_and_unload()
    model.eval()
    if attn_implementation == "auto":
        from dischargesum.attention import use_gqa_fold

        use_gqa_fold(model)
    _LIVE_MODELS.add(model)
    logger.info(
        "loaded %s%s (%s%s, adapter %s) on %s in %.1fs",
        source.base,
        "" if source.adapter is None else f" + {source.adapter}",
        "4-bit NF4, compute " if load_in_4bit else "",
        dtype,
        "none" if source.adapter is None else ("merged" if merge_adapter else "unmerged"),
        device,
        time.perf_counter() - start,
    )
    return InferenceEngine(model, tokenizer, settings)


def engine_from_config(cfg: InferenceConfig, source: ModelSource, device: Any) -> InferenceEngine:
    if cfg.compile:
        configure_compile_cache(cfg.compile_cache_dir)
    return load_engine(
        source,
        EngineSettings.from_config(cfg),
        precision=cfg.precision,
        load_in_4bit=cfg.load_in_4bit,
        merge_adapter=cfg.merge_adapter_effective and source.adapter is not None,
        attn_implementation=cfg.attn_implementation,
        device=device,
    )


# ---------------------------------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Processes:
    """This process's place among the ranks ``accelerate launch`` started (one process without a launcher)."""

    rank: int
    world_size: int
    device: Any
    barrier: Callable[[], None]

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def current_processes() -> Processes:
    """Rank, world size, device and a barrier from accelerate's PartialState (works with and without a launcher)."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    # Without `cpu=True` PartialState ignores the launcher's ranks on a machine without a GPU (it reports one
    # process), so pass it whenever accelerate was told to use the CPU or there is no GPU.
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available())
    return Processes(state.process_index, state.num_processes, state.device, state.wait_for_everyone)


# ---------------------------------------------------------------------------------------------------------------
# Crash-safe, resumable, sharded JSONL output
# ---------------------------------------------------------------------------------------------------------------


def repair_jsonl(path: str | Path, key: str = "note_id") -> int:
    """Drop a torn tail (bytes after the last newline) and any line that is not a JSON object with ``key``.

    Returns how many lines were dropped; the file is rewritten atomically only when something was dropped.
    """
    p = Path(path)
    if not p.is_file():
        return 0
    data = p.read_bytes()
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    kept: list[bytes] = []
    dropped = 1 if tail.strip() else 0
    for line in lines:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError):
            dropped += 1
            continue
        if isinstance(record, dict) and key in record:
            kept.append(line)
        else:
            dropped += 1
    if dropped or (data and not data.endswith(b"\n")):
        tmp = p.with_name(f".{p.name}.repair")
        with open_private(tmp, "wb") as fh:
            fh.write(b"".join(line + b"\n" for line in kept))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, p)
        logger.warning("%s: dropped %d torn or unreadable line(s); those notes will be generated again", p, dropped)
    return dropped


class ShardedJsonlOutput:
    """``<output_dir>/<name>`` assembled from per-rank append-only part files (see the module docstring)."""

    def __init__(self, output_dir: str | Path, name: str, procs: Processes, *, key: str = "note_id"):
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / name
        self.parts_dir = self.output_dir / PARTS_DIR
        self.stem = Path(name).stem
        self.procs = procs
        self.key = key
        self.journal_path = self.parts_dir / f"{self.stem}.journal.json"

    def part_path(self, rank: int) -> Path:
        return self.parts_dir / f"{self.stem}.rank{rank:03d}.jsonl"

    def _done_marker(self, rank: int) -> Path:
        return self.parts_dir / f"{self.stem}.rank{rank:03d}-of-{self.procs.world_size:03d}.done"

    def check_resumable(self, resume_key: str, *, overwrite: bool) -> None:
        """Refuse to resume outputs written with other settings (read-only; every rank may call it).

        Raises:
            ConfigError: the parts (or a finished output) were written with different settings.
        """
        if overwrite:
            return
        journal = self._read_journal()
        has_outputs = self.path.exists() or any(self.parts_dir.glob(f"{self.stem}.rank*.jsonl"))
        if journal is None and has_outputs:
            raise ConfigError(
                f"`output_dir` = {self.output_dir} already holds {self.path.name} or part files without a journal "
                "(written by another tool or version); choose another output_dir or set `overwrite: true`."
            )
        if journal is not None and journal.get("resume_key") != resume_key:
            raise ConfigError(
                f"`output_dir` = {self.output_dir} holds outputs generated with different settings (model, adapter, "
                "data, prompt or decoding); resuming would mix them. Choose another output_dir or set "
                "`overwrite: true` to start over."
            )

    def _read_journal(self) -> dict[str, Any] | None:
        if not self.journal_path.is_file():
            return None
        try:
            data = json.loads(self.journal_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None
        return data if isinstance(data, dict) else None

    def prepare(self, resume_key: str, *, overwrite: bool, description: dict[str, Any] | None = None) -> None:
        """Main process: clear (overwrite) or repair the parts and the merged output and write the journal; then
        all ranks sync.

        The merged output is only a copy of the parts: a torn or unreadable line in it (a copy or sync cut short)
        is dropped like one in a part file, and :meth:`merge` rebuilds it from the parts (a note found in neither
        is generated again) instead of refusing the whole directory.
        """
        if self.procs.is_main:
            if overwrite:
                shutil.rmtree(self.parts_dir, ignore_errors=True)
                self.path.unlink(missing_ok=True)
            private_dir(self.output_dir)
            private_dir(self.parts_dir)
            for part in sorted(self.parts_dir.glob(f"{self.stem}.rank*.jsonl")):
                repair_jsonl(part, self.key)
            if repair_jsonl(self.path, self.key):
                logger.warning("%s had torn or unreadable lines: it is rebuilt from %s", self.path, self.parts_dir)
            for marker in self.parts_dir.glob(f"{self.stem}.rank*.done"):
                marker.unlink()
            self._complete_marker().unlink(missing_ok=True)
            atomic_write_json(self.journal_path, {"resume_key": resume_key, **(description or {})})
        self.procs.barrier()

    def done_records(self) -> dict[str, dict[str, Any]]:
        """Records already written (merged output and every part file), by key; the first one wins."""
        done: dict[str, dict[str, Any]] = {}
        sources = [self.path] if self.path.is_file() else []
        sources += sorted(self.parts_dir.glob(f"{self.stem}.rank*.jsonl"))
        for source in sources:
            for record in read_jsonl(source):
                done.setdefault(str(record[self.key]), record)
        return done

    @contextlib.contextmanager
    def writer(self) -> Iterator[Callable[[Iterable[dict[str, Any]]], None]]:
        """An ``append(records)`` function for this rank's part file: one write, flush and fsync per call."""
        private_dir(self.parts_dir)
        with open_private(self.part_path(self.procs.rank), "a", encoding="utf-8") as fh:

            def append(records: Iterable[dict[str, Any]]) -> None:
                text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
                if text:
                    fh.write(text)
                    fh.flush()
                    os.fsync(fh.fileno())

            yield append

    def _complete_marker(self) -> Path:
        return self.parts_dir / f"{self.stem}.complete"

    def mark_complete(self) -> None:
        """Main process, after merging and finishing the manifest: release the ranks waiting in
        :meth:`wait_until_complete`."""
        atomic_write_json(self._complete_marker(), {"path": str(self.path)})

    def wait_until_complete(self, poll_seconds: float = 0.5) -> None:
        """Other ranks: return once the main process has merged the output, so that when a stage returns its
        output is complete on every rank (the pipeline's stage 2 reads stage 1 right away). Files, not a
        collective: the main process may take a while and must not hit a NCCL timeout."""
        while not self._complete_marker().is_file():
            time.sleep(poll_seconds)

    def finish_rank(self, written: int) -> None:
        atomic_write_json(self._done_marker(self.procs.rank), {"rank": self.procs.rank, "written": written})

    def wait_for_ranks(self, poll_seconds: float = 0.5) -> None:
        """Main process: wait until every rank has dropped its done marker."""
        markers = [self._done_marker(r) for r in range(self.procs.world_size)]
        last_log = time.monotonic()
        while not all(m.is_file() for m in markers):
            if time.monotonic() - last_log > 60:
                waiting = [m.name for m in markers if not m.is_file()]
                logger.info("waiting for other ranks to finish: %s", ", ".join(waiting))
                last_log = time.monotonic()
            time.sleep(poll_seconds)

    def merge(self, order: Sequence[str]) -> int:
        """Main process: write ``<name>`` with one record per key of ``order``, in that order (atomic).

        Raises:
            RuntimeError: a key of ``order`` has no record (a rank did not write it — a bug or a lost file).
        """
        done = self.done_records()
        missing = [k for k in order if k not in done]
        if missing:
            raise RuntimeError(
                f"{len(missing)} note(s) have no output after all ranks finished (first: {missing[:3]}); rerun to "
                "generate them (finished notes are kept)."
            )
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with open_private(tmp, "w", encoding="utf-8") as fh:
            for k in order:
                fh.write(json.dumps(done[k], ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        return len(order)


# ---------------------------------------------------------------------------------------------------------------
# A sharded generation run (the loop both stages share)
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class RunStats:
    """Throughput of this rank's share of a run."""

    notes: int = 0
    new_tokens: int = 0
    prompt_tokens: int = 0
    seconds: float = 0.0

    def add(self, results: Sequence[GenerationResult]) -> None:
        self.notes += len(results)
        self.new_tokens += sum(r.new_tokens for r in results)
        self.prompt_tokens += sum(r.prompt_tokens for r in results)
        self.seconds += sum(r.seconds for r in results)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


def progress_bar(total: int, desc: str, procs: Processes) -> Any:
    from tqdm.auto import tqdm

    shown = procs.is_main and show_progress()
    return tqdm(total=total, desc=desc, unit="note", disable=not shown, dynamic_ncols=True)


def run_generation(
    engine: InferenceEngine,
    requests: Sequence[GenerationRequest],
    append: Callable[[Iterable[dict[str, Any]]], None],
    to_record: Callable[[GenerationResult], dict[str, Any]],
    procs: Processes,
    *,
    desc: str = "generate",
    log_every_seconds: float = 30.0,
) -> RunStats:
    """Plan ALL requests, run this rank's batches (batch i -> rank i mod world) and append their records.

    Returns this rank's throughput.
    """
    batches = deal_batches(engine.plan(requests), procs.rank, procs.world_size)
    stats = RunStats()
    bar = progress_bar(sum(len(b) for b in batches), desc, procs)
    last_log = time.monotonic()
    try:
        for batch_number, (_batch, results) in enumerate(engine.generate(requests, batches=batches), start=1):
            append(to_record(r) for r in results)
            stats.add(results)
            bar.update(len(results))
            bar.set_postfix(tok_s=f"{stats.tokens_per_second:.0f}", refresh=False)
            if time.monotonic() - last_log >= log_every_seconds or batch_number == len(batches):
                logger.info(
                    "%s: %d/%d batches, %d notes, %d new tokens, %.1f new tokens/s",
                    desc,
                    batch_number,
                    len(batches),
                    stats.notes,
                    stats.new_tokens,
                    stats.tokens_per_second,
                )
                last_log = time.monotonic()
    finally:
        bar.close()
    return stats


# ---------------------------------------------------------------------------------------------------------------
# Stage 1: generate
# ---------------------------------------------------------------------------------------------------------------

# Settings that do not change what a note's output is (only speed or which notes run): a rerun may change them and
# still resume. Everything else (model, adapter, data, decoding) must match.
_RESUME_NEUTRAL = (
    "output_dir",
    "log_level",
    "limit",
    "overwrite",
    "batch_token_budget",
    "max_batch_size",
    "cache_implementation",
    "compile",
    "sliding_window_cache",
    "prefill_chunk_rows",
    "compile_cache_dir",
    "chunk_notes",
)


def resume_key(cfg: InferenceConfig, **facts: Any) -> str:
    """Fingerprint of everything that determines the outputs (config minus speed knobs, plus input facts)."""
    settings = {k: v for k, v in cfg.to_dict().items() if k not in _RESUME_NEUTRAL}
    return canonical_hash({"stage": cfg.STAGE, "config": settings, **facts})


def generation_record(result: GenerationResult) -> dict[str, Any]:
    """One line of stage1.jsonl."""
    return {
        "note_id": result.key,
        "summary": result.text,
        "prompt_tokens": result.prompt_tokens,
        "new_tokens": result.new_tokens,
        "finish_reason": result.finish_reason,
        "seconds": round(result.seconds, 4),
        "batch_size": result.batch_size,
    }


def run_generate(cfg: GenerateConfig) -> dict[str, Any]:
    """Stage 1: summaries for ``cfg.split`` of ``cfg.dataset_dir`` -> ``<output_dir>/stage1.jsonl`` + manifest.

    Every check that a user can fail (dataset, adapter, base model, resumability) runs before a model is loaded.
    Returns the summary written into the manifest.

    Raises:
        ArtifactError: the dataset or adapter is missing or incomplete. ConfigError: unknown base model, or the
            output_dir holds outputs of different settings.
    """
    import pyarrow.parquet as pq

    from dischargesum.data import schema
    from dischargesum.data.formatting import DEFAULT_INSTRUCTION, prompt_messages
    from dischargesum.manifest import fingerprint_file, finish_run, start_run
    from dischargesum.modeling import load_tokenizer

    procs = current_processes()
    dataset = require_artifact(
        cfg.dataset_dir,
        stage="prepare_data",
        field="dataset_dir",
        files=[schema.SPLIT_FILES[cfg.split], schema.DATA_CARD_FILE],
    )
    source = resolve_model_source(cfg.model_name_or_path, cfg.adapter)
    card = json.loads((Path(cfg.dataset_dir) / schema.DATA_CARD_FILE).read_text(encoding="utf-8"))
    instruction = card.get("instruction")
    if not instruction:
        logger.warning("data_card.json has no `instruction`; using the default prompt instruction")
        instruction = DEFAULT_INSTRUCTION
    table = pq.read_table(Path(cfg.dataset_dir) / schema.SPLIT_FILES[cfg.split], columns=["note_id", "note"])
    note_ids = [str(x) for x in table.column("note_id").to_pylist()]
    notes = [str(x) for x in table.column("note").to_pylist()]
    if len(set(note_ids)) != len(note_ids):
        raise ArtifactError(
            f"`dataset_dir` = {cfg.dataset_dir}: {cfg.split} has duplicate note_ids; rerun prepare_data."
        )
    if cfg.limit:
        note_ids, notes = note_ids[: cfg.limit], notes[: cfg.limit]
    if not note_ids:
        raise ArtifactError(f"`dataset_dir` = {cfg.dataset_dir}: the {cfg.split} split has no notes.")

    key = resume_key(
        cfg,
        data_fingerprint=dataset.get("data_fingerprint"),
        base=source.base,
        adapter_sha256=source.adapter_sha256,
        instruction=instruction,
    )
    output = ShardedJsonlOutput(cfg.output_dir, STAGE1_FILE, procs)
    output.check_resumable(key, overwrite=cfg.overwrite)
    procs.barrier()  # every rank has checked before the main process touches anything
    start_run(
        cfg.output_dir,
        cfg,
        inputs={
            "dataset_dir": str(Path(cfg.dataset_dir).resolve()),
            "data_fingerprint": dataset.get("data_fingerprint"),
            "split": cfg.split,
            "base_model": source.base,
            "adapter": None if source.adapter is None else str(Path(source.adapter).resolve()),
            "adapter_sha256": source.adapter_sha256,
        },
    )
    output.prepare(key, overwrite=cfg.overwrite, description={"stage": "generate"})
    done = output.done_records()
    todo = [i for i, note_id in enumerate(note_ids) if note_id not in done]
    if done:
        logger.info(
            "resuming: %d of %d notes already written, %d to go", len(note_ids) - len(todo), len(note_ids), len(todo)
        )

    stats = RunStats()
    started = time.perf_counter()
    if todo:
        # Every rank tokenizes every note: the batch plan (and so each note's batch) must be the same on all ranks.
        # Ids are kept as 4-byte arrays (a Python int list costs ~9x more for a large split).
        tokenizer = load_tokenizer(source.tokenizer_path, padding_side="left")
        prompts: list[Sequence[int]] = []
        for start in range(0, len(todo), 1024):
            chunk = [prompt_messages(notes[i], instruction) for i in todo[start : start + 1024]]
            prompts += [array("i", ids) for ids in encode_chats(tokenizer, chunk)]
        del tokenizer
        seeds = request_seeds(cfg.seed, note_ids, cfg.seed_policy)
        requests = [
            GenerationRequest(key=note_ids[i], prompt_ids=p, max_new_tokens=cfg.max_new_tokens, seed=seeds[i], index=i)
            for i, p in zip(todo, prompts)
        ]
        settings = EngineSettings.from_config(cfg)
        if deal_batches(plan_requests(settings, requests).batches, procs.rank, procs.world_size):
            engine = engine_from_config(cfg, source, procs.device)
            try:
                with output.writer() as append:
                    stats = run_generation(engine, requests, append, generation_record, procs, desc="generate")
            finally:
                engine.close()
    output.finish_rank(stats.notes)
    summary: dict[str, Any] = {}
    if procs.is_main:
        output.wait_for_ranks()
        output.merge(note_ids)
        summary = summarize_stage1(read_jsonl(output.path), world_size=procs.world_size)
        summary["this_run"] = {"notes": len(todo), "wall_seconds": round(time.perf_counter() - started, 3)}
        finish_run(cfg.output_dir, {STAGE1_FILE: fingerprint_file(output.path, cfg.output_dir)}, summary=summary)
        output.mark_complete()
        logger.info(
            "wrote %s: %d notes, %d new tokens (%.1f new tokens/s per process), finish reasons %s",
            output.path,
            summary["notes"],
            summary["new_tokens"],
            summary["new_tokens_per_second_per_process"] or 0.0,
            summary["finish_reasons"],
        )
    else:
        output.wait_until_complete()
    return summary


def summarize_stage1(records: Sequence[dict[str, Any]], *, world_size: int) -> dict[str, Any]:
    """Totals for the manifest: notes, tokens, time, finish reasons."""
    seconds = sum(float(r.get("seconds", 0.0)) for r in records)
    new_tokens = sum(int(r.get("new_tokens", 0)) for r in records)
    reasons: dict[str, int] = {}
    for r in records:
        reasons[str(r.get("finish_reason"))] = reasons.get(str(r.get("finish_reason")), 0) + 1
    return {
        "notes": len(records),
        "new_tokens": new_tokens,
        "prompt_tokens": sum(int(r.get("prompt_tokens", 0)) for r in records),
        "generation_seconds": round(seconds, 3),
        "new_tokens_per_second_per_process": round(new_tokens / seconds, 2) if seconds > 0 else None,
        "finish_reasons": reasons,
        "world_size": world_size,
    }
