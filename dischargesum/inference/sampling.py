"""Per-note seeds and seeded sampling that does not depend on a note's batch, rank or resume.

:class:`SeededSampler` draws with the Gumbel-max trick from counter-based noise: the noise for (note seed, step,
token id) is a fixed integer hash (:func:`hash32`), so a note's random numbers never depend on its batch neighbours,
its position in the batch, the process or a resume. Temperature / top-k / top-p are applied per row. Per-note seeds
(:func:`note_seed`) are sha256 of the run seed and the note key: stable across machines and runs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Literal

import torch
from transformers import LogitsProcessor


def note_seed(seed: int, key: str) -> int:
    """A 32-bit per-note seed from the run seed and a note key (sha256: stable across machines and runs)."""
    digest = hashlib.sha256(f"{seed}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def request_seeds(seed: int, keys: Sequence[str], policy: Literal["note_id", "input_order"]) -> list[int]:
    """Per-note seeds by ``seed_policy``: hash of the note_id, or of the row number in the input."""
    if policy == "note_id":
        return [note_seed(seed, key) for key in keys]
    return [note_seed(seed, f"#{i}") for i in range(len(keys))]


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


def clear_noise_cache() -> None:
    """Drop the per-device token hashes :func:`gumbel_noise` keeps (they hold device memory)."""
    _TOKEN_HASH_CACHE.clear()
