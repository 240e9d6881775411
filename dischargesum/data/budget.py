"""Token counting exactly as training sees it — the one implementation every stage reuses.

TRL's ``SFTTrainer`` tokenizes a conversational prompt-completion example (``trl/trainer/sft_trainer.py``,
``tokenize_fn``) as::

    prompt_ids = apply_chat_template(prompt, add_generation_prompt=True)          # tokenize=True
    input_ids  = apply_chat_template(prompt + completion)                           # tokenize=True
    prompt_len = common_prefix_length(prompt_ids, input_ids)
    completion_mask = [0] * prompt_len + [1] * (len(input_ids) - prompt_len)

and the trainer then cuts ``input_ids`` at ``max_length`` (from the end: the summary). :func:`tokenize_examples`
does the same, batched (one ``apply_chat_template`` call renders and tokenizes a whole batch; a fast tokenizer
encodes the batch on all its threads), so ``len(input_ids) <= max_seq_length`` computed here is exactly the
condition under which training never cuts a summary. ``apply_chat_template(..., tokenize=True)`` renders with
the tokenizer's template and encodes with ``add_special_tokens=False`` in both transformers 5.17 and 5.24; a
batched call gives the same ids as per-example calls (no padding is requested).

The prompt is :func:`dischargesum.data.formatting.prompt_messages` and the completion
:func:`~dischargesum.data.formatting.completion_messages`, the same builders sft_qlora and generate use.

:class:`TokenCounter` gives the same numbers with each note tokenized once instead of twice (prepare_data's hot
loop at 270k rows). It relies on how Hugging Face fast tokenizers work: added (special) tokens are split out of
the text *before* normalisation and pre-tokenisation, so text that ends right before a special token with
``lstrip=False`` tokenizes the same alone as followed by more text. The rendered conversation is cut before the
special token that opens the generation prompt (Gemma: ``<start_of_turn>`` of ``<start_of_turn>model\n``):
``ids(prompt + completion) = ids(head) + ids(tail)`` and ``ids(prompt) = ids(head) + ids(generation prompt)``,
where the head (instruction + note) is shared. ``token_counting: auto`` uses the split only after checking it
against the exact computation on probe texts (edge cases: trailing whitespace, special-token text inside a
note, non-ASCII) and keeps checking every ``verify_every``-th row during the run; any disagreement is an error,
never a silently different count. ``exact`` always tokenizes as TRL does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dischargesum.config import ConfigError
from dischargesum.data.formatting import DEFAULT_INSTRUCTION, completion_messages, prompt_messages
from dischargesum.logging_utils import get_logger

logger = get_logger(__name__)


@dataclass
class TokenizedExamples:
    """Token ids of a batch of (note, summary) pairs, as SFTTrainer builds them."""

    prompt_ids: list[list[int]]  # the inference prompt (with generation prompt)
    input_ids: list[list[int]]  # prompt + completion: the training sequence
    prompt_lengths: np.ndarray  # len(prompt_ids) per example (int64)
    completion_starts: np.ndarray  # common prefix of prompt_ids and input_ids: where the trained tokens begin
    total_lengths: np.ndarray  # len(input_ids) per example

    @property
    def completion_lengths(self) -> np.ndarray:
        """Tokens with completion_mask = 1 (the summary turn, including its end-of-turn tokens)."""
        return self.total_lengths - self.completion_starts


def load_tokenizer(name_or_path: str, *, field: str = "tokenizer_name_or_path") -> Any:
    """Load a tokenizer with a chat template (``trust_remote_code`` off; local directory or Hub cache).

    Raises:
        ConfigError: the tokenizer cannot be loaded, or it has no chat template.
    """
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        hint = (
            "the directory has no tokenizer files"
            if Path(name_or_path).is_dir()
            else "it is not a local directory and is not in the Hugging Face cache (this stage never downloads "
            "unless HF_HUB_OFFLINE is unset; gated models such as google/medgemma-4b-it need `hf auth login` and "
            "an accepted licence)"
        )
        raise ConfigError(f"`{field}` = {name_or_path!r} could not be loaded: {hint}. ({exc})") from exc
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            f"`{field}` = {name_or_path!r} has no chat template; point it at the instruction-tuned model you will "
            "train (its tokenizer_config.json or chat_template.jinja carries the template)."
        )
    return tokenizer


def chat_template_fingerprint(tokenizer: Any) -> str:
    """sha256 of the tokenizer's chat template (recorded so later stages can check they render the same way)."""
    import hashlib

    return hashlib.sha256(str(tokenizer.chat_template).encode("utf-8")).hexdigest()


def _common_prefix_length(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:  # the usual case, compared in C
        return n
    left = np.asarray(a[:n])
    right = np.asarray(b[:n])
    return int(np.argmin(left == right))


def tokenize_examples(
    tokenizer: Any,
    notes: Sequence[str],
    summaries: Sequence[str],
    instruction: str = DEFAULT_INSTRUCTION,
) -> TokenizedExamples:
    """Tokenize (note, summary) pairs exactly as TRL's SFTTrainer does for conversational prompt-completion data.

    Raises:
        ValueError: ``notes`` and ``summaries`` differ in length.
    """
    if len(notes) != len(summaries):
        raise ValueError(f"{len(notes)} notes but {len(summaries)} summaries")
    if not notes:
        empty = np.zeros(0, dtype=np.int64)
        return TokenizedExamples([], [], empty, empty.copy(), empty.copy())
    prompts = [prompt_messages(note, instruction) for note in notes]
    full = [p + completion_messages(s) for p, s in zip(prompts, summaries)]
    prompt_ids = tokenizer.apply_chat_template(prompts, add_generation_prompt=True, tokenize=True, return_dict=True)[
        "input_ids"
    ]
    input_ids = tokenizer.apply_chat_template(full, tokenize=True, return_dict=True)["input_ids"]
    starts = np.fromiter(
        (_common_prefix_length(p, f) for p, f in zip(prompt_ids, input_ids)), dtype=np.int64, count=len(notes)
    )
    return TokenizedExamples(
        prompt_ids=prompt_ids,
        input_ids=input_ids,
        prompt_lengths=np.fromiter(map(len, prompt_ids), dtype=np.int64, count=len(notes)),
        completion_starts=starts,
        total_lengths=np.fromiter(map(len, input_ids), dtype=np.int64, count=len(notes)),
    )


def count_tokens(
    tokenizer: Any,
    notes: Sequence[str],
    summaries: Sequence[str],
    instruction: str = DEFAULT_INSTRUCTION,
    *,
    batch_size: int = 512,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(prompt_tokens, completion_tokens, total_tokens)`` per pair, computed in batches of ``batch_size``.

    ``total_tokens`` is the training sequence length (what ``max_seq_length`` bounds); ``prompt_tokens`` is the
    inference prompt; ``completion_tokens`` the trained tokens. Usually ``prompt + completion == total``; they
    differ only for templates that render the prompt differently alone (TRL warns about those).
    """
    prompt, completion, total = [], [], []
    for start in range(0, len(notes), batch_size):
        batch = tokenize_examples(
            tokenizer, notes[start : start + batch_size], summaries[start : start + batch_size], instruction
        )
        prompt.append(batch.prompt_lengths)
        completion.append(batch.completion_lengths)
        total.append(batch.total_lengths)
    if not prompt:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty.copy(), empty.copy()
    return np.concatenate(prompt), np.concatenate(completion), np.concatenate(total)


def render_loss_mask(tokenizer: Any, input_ids: Sequence[int], completion_start: int) -> str:
    """Decoded text of one training sequence with the trained tokens (completion_mask = 1) inside ⟦ ⟧."""
    prompt = tokenizer.decode(list(input_ids[:completion_start]), skip_special_tokens=False)
    trained = tokenizer.decode(list(input_ids[completion_start:]), skip_special_tokens=False)
    return f"{prompt}⟦{trained}⟧"


_PROBE_NOTES = (
    "Sex: F\nService: MEDICINE\n\nChief Complaint:\nchest pain  \n",
    "  leading and trailing whitespace \t\n\n",
    "BP 120/80, HR 72, Na 138 mEq/L, metoprolol 25 mg PO BID; denies fevers. ___ ___",
    "Caf\u00e9 na\u00efve \u00b5g \u2265 5 \u2014 \u00b0C; <start_of_turn>model\nnot a turn<end_of_turn>",
    "[...]",
    "x",
)
_PROBE_SUMMARIES = (
    "Ms. ___ was admitted with chest pain.",
    "\n  # Problem: AKI\n- Cr 2.1 -> 1.3\n",
    "No fevers. Discharged on metoprolol 25 mg PO BID.",
    "<end_of_turn> literal \u00b5g",
    "y",
    "A " * 300,
)


class TokenCounter:
    """Exact TRL token counts for (note, summary) batches, tokenizing each note once when that is proven safe.

    ``stats`` counts rows counted by the split (``split_rows``), by the exact path (``exact_rows``) and rows
    re-counted exactly to check the split (``verified_rows``).

    Raises (from :meth:`count`):
        RuntimeError: a verified row disagrees with the exact count (use ``mode="exact"``).
    """

    def __init__(
        self, tokenizer: Any, instruction: str = DEFAULT_INSTRUCTION, *, mode: str = "auto", verify_every: int = 64
    ) -> None:
        if mode not in ("auto", "exact"):
            raise ValueError(f"mode={mode!r}; use 'auto' or 'exact'")
        self.tokenizer = tokenizer
        self.instruction = instruction
        self.verify_every = max(1, verify_every)
        self.split_token: str | None = None
        self.stats: dict[str, int] = {"split_rows": 0, "exact_rows": 0, "verified_rows": 0}
        self.mode = "exact"
        if mode == "auto":
            self.split_token = self._find_split_token()
            if self.split_token is not None and self._probe():
                self.mode = "split"
            else:
                logger.info(
                    "token counting: exact (the prompt/completion split could not be verified for this tokenizer)"
                )

    # -- set-up -------------------------------------------------------------------------------------------------

    def _find_split_token(self) -> str | None:
        """The special token that starts the generation prompt (the last added token in a rendered prompt)."""
        text = self.tokenizer.apply_chat_template(
            prompt_messages("note", self.instruction), add_generation_prompt=True, tokenize=False
        )
        best, best_at = None, -1
        for token in self.tokenizer.added_tokens_decoder.values():
            if token.lstrip or token.normalized or not token.content:
                continue
            at = text.rfind(token.content)
            if at > best_at or (at == best_at and best is not None and len(token.content) > len(best)):
                best, best_at = token.content, at
        return best if best_at > 0 else None

    def _probe(self) -> bool:
        notes = list(_PROBE_NOTES)
        summaries = list(_PROBE_SUMMARIES)
        exact = tokenize_examples(self.tokenizer, notes, summaries, self.instruction)
        split = self._split_counts(notes, summaries)
        if split is None:
            return False
        prompt, completion, total, fallback = split
        return (
            not fallback.any()
            and np.array_equal(prompt, exact.prompt_lengths)
            and np.array_equal(completion, exact.completion_lengths)
            and np.array_equal(total, exact.total_lengths)
        )

    # -- counting -----------------------------------------------------------------------------------------------

    def _encode(self, texts: list[str]) -> list[list[int]]:
        # What apply_chat_template(tokenize=True) does with the rendered text.
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def _split_counts(
        self, notes: Sequence[str], summaries: Sequence[str]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
        assert self.split_token is not None
        prompts = [prompt_messages(note, self.instruction) for note in notes]
        full = [p + completion_messages(s) for p, s in zip(prompts, summaries)]
        prompt_texts = self.tokenizer.apply_chat_template(prompts, add_generation_prompt=True, tokenize=False)
        full_texts = self.tokenizer.apply_chat_template(full, tokenize=False)
        n = len(notes)
        heads, tails, generation = [], [], []
        fallback = np.zeros(n, dtype=bool)
        for i, (p_text, f_text) in enumerate(zip(prompt_texts, full_texts)):
            cut = p_text.rfind(self.split_token)
            if cut <= 0 or not f_text.startswith(p_text[:cut]):
                fallback[i] = True
                cut = 0
            heads.append(p_text[:cut])
            tails.append(f_text[cut:])
            generation.append(p_text[cut:])
        head_ids = self._encode(heads)
        tail_ids = self._encode(tails)
        gen_cache: dict[str, list[int]] = {}
        for text in set(generation):
            gen_cache[text] = self._encode([text])[0]
        head_len = np.fromiter(map(len, head_ids), dtype=np.int64, count=n)
        gen_ids = [gen_cache[text] for text in generation]
        prompt = head_len + np.fromiter(map(len, gen_ids), dtype=np.int64, count=n)
        total = head_len + np.fromiter(map(len, tail_ids), dtype=np.int64, count=n)
        start = head_len + np.fromiter(
            (_common_prefix_length(g, t) for g, t in zip(gen_ids, tail_ids)), dtype=np.int64, count=n
        )
        return prompt, total - start, total, fallback

    def count(self, notes: Sequence[str], summaries: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(prompt_tokens, completion_tokens, total_tokens)`` per pair — the numbers TRL's SFTTrainer gets."""
        if len(notes) != len(summaries):
            raise ValueError(f"{len(notes)} notes but {len(summaries)} summaries")
        if self.mode == "exact" or not notes:
            exact = tokenize_examples(self.tokenizer, notes, summaries, self.instruction)
            self.stats["exact_rows"] += len(notes)
            return exact.prompt_lengths, exact.completion_lengths, exact.total_lengths
        split = self._split_counts(notes, summaries)
        assert split is not None
        prompt, completion, total, fallback = split
        # rows the split cannot handle, plus every verify_every-th row, are counted exactly
        check = fallback.copy()
        check[:: self.verify_every] = True
        idx = np.flatnonzero(check)
        exact = tokenize_examples(
            self.tokenizer, [notes[i] for i in idx], [summaries[i] for i in idx], self.instruction
        )
        for k, i in enumerate(idx):
            got = (int(prompt[i]), int(completion[i]), int(total[i]))
            want = (int(exact.prompt_lengths[k]), int(exact.completion_lengths[k]), int(exact.total_lengths[k]))
            if not fallback[i] and got != want:
                raise RuntimeError(
                    f"token counting: the prompt/completion split gave {got} but TRL's tokenization gives {want} "
                    "(prompt, completion, total); set `token_counting: exact`."
                )
            prompt[i], completion[i], total[i] = want
        self.stats["verified_rows"] += int((check & ~fallback).sum())
        self.stats["exact_rows"] += int(fallback.sum())
        self.stats["split_rows"] += int((~fallback).sum())
        return prompt, completion, total
