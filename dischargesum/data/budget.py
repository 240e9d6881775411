"""Token counting exactly as training sees it — the one implementation every stage reuses — and the length
budget built on it (:func:`fit_to_budget`: count, shorten over-long notes with :mod:`dischargesum.data.shorten`
until they fit, reject rows whose summary alone cannot fit).

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

Why one module (~670 lines): the exact counter, the fast counter that must agree with it, and the fitting loop that
relies on both are one contract ("a row that passes never gets its summary cut in training"); split apart, a change
to one could silently break the agreement the others rely on. Most of the length is the explanation above and the
verification of the fast path.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dischargesum.data.formatting import DEFAULT_INSTRUCTION, completion_messages, prompt_messages
from dischargesum.data.shorten import MARKER, find_sections, shorten_note
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
    "".join(map(chr, range(33, 127))) + " {{ note }} {% raw %} \u00a0\u3000 \U0001f489",
    ("Pertinent Results:\n" + "WBC 12.3 Hgb 9.8 Plt 245 Na 134 K 4.1 Cl 99 HCO3 24 BUN 31 Cr 1.4 ___ ") * 120,
)
_PROBE_SUMMARIES = (
    "Ms. ___ was admitted with chest pain.",
    "\n  # Problem: AKI\n- Cr 2.1 -> 1.3\n",
    "No fevers. Discharged on metoprolol 25 mg PO BID.",
    "<end_of_turn> literal \u00b5g",
    "y",
    "A " * 300,
    "".join(map(chr, range(126, 32, -1))) + " {{ summary }} \U0001f489",
    "# AKI: Cr 2.1 -> 1.3 with IV fluids.\n" * 40,
)
# Stand-ins for the note and the summary when the chat template is rendered once (private-use characters).
_NOTE_SLOT = "\ue000note\ue001"
_SUMMARY_SLOT = "\ue000summary\ue001"


@dataclass(frozen=True)
class _ChatFrame:
    """The rendered chat around a note and a summary, cut where :class:`TokenCounter` splits it.

    For a note and summary without surrounding whitespace (templates ``trim`` message contents) the template's text
    is ``head = head_before + note + head_after``, ``tail = tail_before + summary + tail_after`` and ``generation``
    (the rendered generation prompt) is constant — rendering with Jinja per row (two renders of the whole note)
    is replaced by two string concatenations. :meth:`TokenCounter._find_frame` builds it only after comparing it
    with Jinja's rendering of the probe texts character for character.
    """

    head_before: str
    head_after: str
    tail_before: str
    tail_after: str
    generation: str

    def applies(self, note: str, summary: str) -> bool:
        return (
            bool(note)
            and bool(summary)
            and note == note.strip()
            and summary == summary.strip()
            and _NOTE_SLOT not in note
            and _SUMMARY_SLOT not in summary
        )


class TokenCounter:
    """Exact TRL token counts for (note, summary) batches, tokenizing each note once when that is proven safe.

    ``stats`` counts rows counted by the split (``split_rows``), by the exact path (``exact_rows``) and rows
    re-counted exactly to check the split (``verified_rows``).

    Three things make the split path fast at 270k rows without changing a count: the chat is rendered from a
    fixed frame (:class:`_ChatFrame`) instead of by Jinja per row; token *counts* come from the fast tokenizer's
    Rust ``encode_batch`` without building Python id lists for the notes (what ``tokenizer(texts)`` adds); and
    the summary side (tail length and its common prefix with the generation prompt) is remembered per summary,
    so the length budget's re-counts of a shortened note — and of the bare marker — tokenize only the new note.

    Raises (from :meth:`count`):
        RuntimeError: a verified row disagrees with the exact count (use ``mode="exact"``).
    """

    def __init__(
        self,
        tokenizer: Any,
        instruction: str = DEFAULT_INSTRUCTION,
        *,
        mode: str = "auto",
        verify_every: int = 64,
        max_cached_summaries: int = 16384,
    ) -> None:
        if mode not in ("auto", "exact"):
            raise ValueError(f"mode={mode!r}; use 'auto' or 'exact'")
        self.tokenizer = tokenizer
        self.instruction = instruction
        self.verify_every = max(1, verify_every)
        self.max_cached_summaries = max_cached_summaries
        self.split_token: str | None = None
        self.frame: _ChatFrame | None = None
        # (generation prompt, tail text) -> (tail tokens, common prefix of the tail's and the generation's tokens)
        self._tails: dict[tuple[str, str], tuple[int, int]] = {}
        self._generation_ids: dict[str, list[int]] = {}
        self.stats: dict[str, int] = {"split_rows": 0, "exact_rows": 0, "verified_rows": 0}
        self.mode = "exact"
        if mode == "auto":
            self.split_token = self._find_split_token()
            if self.split_token is not None:
                self.frame = self._find_frame()
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

    def _render(self, notes: Sequence[str], summaries: Sequence[str]) -> tuple[list[str], list[str]]:
        """Jinja renderings ``(prompt with generation prompt, prompt + completion)`` — what TRL tokenizes."""
        prompts = [prompt_messages(note, self.instruction) for note in notes]
        full = [p + completion_messages(s) for p, s in zip(prompts, summaries)]
        prompt_texts = self.tokenizer.apply_chat_template(prompts, add_generation_prompt=True, tokenize=False)
        full_texts = self.tokenizer.apply_chat_template(full, tokenize=False)
        return prompt_texts, full_texts

    def _find_frame(self) -> _ChatFrame | None:
        """The fixed frame of the rendered chat, or None when Jinja's rendering is not note/summary-independent."""
        assert self.split_token is not None
        (prompt,), (full,) = self._render([_NOTE_SLOT], [_SUMMARY_SLOT])
        if prompt.count(_NOTE_SLOT) != 1 or full.count(_NOTE_SLOT) != 1 or full.count(_SUMMARY_SLOT) != 1:
            return None
        head_before, after_note = prompt.split(_NOTE_SLOT)
        cut = after_note.rfind(self.split_token)
        full_before, full_after_note = full.split(_NOTE_SLOT)
        if cut < 0 or full_before != head_before or not full_after_note.startswith(after_note[:cut]):
            return None
        tail_before, tail_after = full_after_note[cut:].split(_SUMMARY_SLOT)
        frame = _ChatFrame(head_before, after_note[:cut], tail_before, tail_after, after_note[cut:])
        pairs = [(n, s) for n in _PROBE_NOTES for s in _PROBE_SUMMARIES if frame.applies(n, s)]
        prompt_texts, full_texts = self._render([n for n, _ in pairs], [s for _, s in pairs])
        for (note, summary), p_text, f_text in zip(pairs, prompt_texts, full_texts):
            head = frame.head_before + note + frame.head_after
            if p_text != head + frame.generation or f_text != head + frame.tail_before + summary + frame.tail_after:
                return None
        return frame

    def _probe(self) -> bool:
        notes = list(_PROBE_NOTES)
        summaries = list(_PROBE_SUMMARIES)
        exact = tokenize_examples(self.tokenizer, notes, summaries, self.instruction)
        split = self._split_counts(notes, summaries)
        if split is None:
            return False
        prompt, completion, total, fallback = split
        ok = (
            not fallback.any()
            and np.array_equal(prompt, exact.prompt_lengths)
            and np.array_equal(completion, exact.completion_lengths)
            and np.array_equal(total, exact.total_lengths)
        )
        self._tails.clear()
        return ok

    # -- counting -----------------------------------------------------------------------------------------------

    def _encode(self, texts: list[str]) -> list[list[int]]:
        # What apply_chat_template(tokenize=True) does with the rendered text.
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def _backend_encode(self, texts: list[str]) -> list[Any] | None:
        """The Rust backend's encodings of ``texts`` (no offsets), or None where they could differ from ``_encode``.

        The backend is called directly only when its state is what ``tokenizer(texts)`` would set (no truncation,
        no padding, the same special-token splitting); this skips building Python lists of every id, attention
        mask and token type (a third of the tokenizer's time on long notes).
        """
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if (
            backend is None
            or backend.truncation is not None
            or backend.padding is not None
            or backend.encode_special_tokens != bool(getattr(self.tokenizer, "split_special_tokens", False))
        ):
            return None
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
        return list(encode(texts, add_special_tokens=False))

    def _token_lengths(self, texts: list[str]) -> list[int]:
        """``[len(ids) for ids in self._encode(texts)]``, without building the id lists where possible."""
        encodings = self._backend_encode(texts)
        if encodings is None:
            return [len(ids) for ids in self._encode(texts)]
        return [len(encoding) for encoding in encodings]

    def _token_ids(self, texts: list[str]) -> list[list[int]]:
        """``self._encode(texts)``, through the Rust backend where that gives the same ids."""
        encodings = self._backend_encode(texts)
        if encodings is None:
            return self._encode(texts)
        return [encoding.ids for encoding in encodings]

    def _generation(self, text: str) -> list[int]:
        ids = self._generation_ids.get(text)
        if ids is None:
            if len(self._generation_ids) >= 64:  # only rows rendered by Jinja add texts here
                self._generation_ids.clear()
            ids = self._generation_ids[text] = self._encode([text])[0]
        return ids

    def _tail_counts(self, tails: list[str], generation: list[str]) -> list[tuple[int, int]]:
        """``(tail tokens, common prefix with the generation prompt's tokens)`` per row, remembered per tail."""
        keys = list(zip(generation, tails))
        missing = list(dict.fromkeys(key for key in keys if key not in self._tails))
        if missing:
            if len(self._tails) + len(missing) > self.max_cached_summaries:
                self._tails.clear()
                missing = list(dict.fromkeys(keys))
            for key, ids in zip(missing, self._token_ids([tail for _, tail in missing])):
                self._tails[key] = (len(ids), _common_prefix_length(self._generation(key[0]), ids))
        return [self._tails[key] for key in keys]

    def _split_counts(
        self, notes: Sequence[str], summaries: Sequence[str]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
        assert self.split_token is not None
        n = len(notes)
        heads: list[str] = [""] * n
        tails: list[str] = [""] * n
        generation: list[str] = [""] * n
        fallback = np.zeros(n, dtype=bool)
        frame = self.frame
        jinja = []
        for i, (note, summary) in enumerate(zip(notes, summaries)):
            if frame is not None and frame.applies(note, summary):
                heads[i] = frame.head_before + note + frame.head_after
                tails[i] = frame.tail_before + summary + frame.tail_after
                generation[i] = frame.generation
            else:
                jinja.append(i)
        if jinja:
            prompt_texts, full_texts = self._render([notes[i] for i in jinja], [summaries[i] for i in jinja])
            for i, p_text, f_text in zip(jinja, prompt_texts, full_texts):
                cut = p_text.rfind(self.split_token)
                if cut <= 0 or not f_text.startswith(p_text[:cut]):
                    fallback[i] = True
                    cut = 0
                heads[i] = p_text[:cut]
                tails[i] = f_text[cut:]
                generation[i] = p_text[cut:]
        unique_heads = list(dict.fromkeys(heads))
        head_of = dict(zip(unique_heads, self._token_lengths(unique_heads)))
        head_len = np.fromiter((head_of[h] for h in heads), dtype=np.int64, count=n)
        tail_counts = self._tail_counts(tails, generation)
        gen_len = np.fromiter((len(self._generation(g)) for g in generation), dtype=np.int64, count=n)
        tail_len = np.fromiter((t for t, _ in tail_counts), dtype=np.int64, count=n)
        common = np.fromiter((c for _, c in tail_counts), dtype=np.int64, count=n)
        prompt = head_len + gen_len
        total = head_len + tail_len
        start = head_len + common
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


# ----------------------------------------------------------------------------------------------------------------
# length budget: count, then shorten over-long notes until they fit

_MAX_FIT_ROUNDS = 8


@dataclass
class BudgetResult:
    """Per-row outcome of :func:`fit_to_budget` (arrays aligned with the input rows)."""

    notes: list[str]
    prompt_tokens: np.ndarray
    completion_tokens: np.ndarray
    total_tokens: np.ndarray
    shortened: np.ndarray  # bool
    rejected: dict[int, str]  # row index -> detail (summary_too_long)
    stats: Counter[str] = field(default_factory=Counter)
    # Target-entity support (dischargesum.data.target_support), -1 where not measured: distinct target entities,
    # and how many of them the whole normalised note ("before") and the note as written ("after") support.
    target_entities: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    supported_before: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    supported_after: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


def _count(counter: TokenCounter, notes: list[str], summaries: list[str], batch_size: int) -> tuple[np.ndarray, ...]:
    """``counter.count`` in batches (token id lists of a whole chunk would hold ~100 MB of Python ints)."""
    parts = [
        counter.count(notes[i : i + batch_size], summaries[i : i + batch_size])
        for i in range(0, len(notes), batch_size)
    ]
    if not parts:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty.copy(), empty.copy()
    return tuple(np.concatenate([part[k] for part in parts]) for k in range(3))


def fit_to_budget(
    counter: TokenCounter,
    notes: list[str],
    summaries: list[str],
    *,
    max_seq_length: int,
    min_note_tokens: int,
    strategy: str,
    batch_size: int = 512,
    rank_by_target: Sequence[bool] | None = None,
    entity_support: str = "off",
) -> BudgetResult:
    """Count tokens; shorten the notes of over-long examples until they fit; never touch a summary.

    A row is rejected (``summary_too_long``) when the prompt frame plus the whole summary leave fewer than
    ``min_note_tokens`` of ``max_seq_length`` for the note. Shortening converts the token excess to characters
    with the note's own characters-per-token ratio, re-counts exactly and asks for more until the example fits;
    after ``_MAX_FIT_ROUNDS`` rounds the note becomes the bare marker, which is known to fit.

    ``rank_by_target`` (per row; ``sections`` only): shorten that row's note dropping first the sections that
    support the fewest of its summary's entities (training and validation rows; a test row keeps the fixed order,
    see :mod:`dischargesum.data.shorten`). ``entity_support``: measure target-entity support before and after
    shortening (``BudgetResult.target_entities`` / ``supported_before`` / ``supported_after``) for the shortened
    rows (``shortened``), every kept row (``all``) or none (``off``). Entities are extracted only for the rows
    that need them: the over-budget ones, plus every row with ``all``.
    """
    prompt, completion, total = _count(counter, notes, summaries, batch_size)
    unmeasured = np.full(len(notes), -1, dtype=np.int64)
    result = BudgetResult(
        list(notes),
        prompt,
        completion,
        total,
        np.zeros(len(notes), dtype=bool),
        {},
        target_entities=unmeasured,
        supported_before=unmeasured.copy(),
        supported_after=unmeasured.copy(),
    )
    over = np.flatnonzero(total > max_seq_length)
    if len(over):
        _shorten_over_budget(
            counter,
            notes,
            summaries,
            result,
            over,
            max_seq_length=max_seq_length,
            min_note_tokens=min_note_tokens,
            strategy=strategy,
            batch_size=batch_size,
            rank_by_target=rank_by_target,
            entity_support=entity_support,
        )
    if entity_support == "all":
        rest = [i for i in range(len(notes)) if result.target_entities[i] < 0 and i not in result.rejected]
        _measure_support(result, rest, [summaries[i] for i in rest], [notes[i] for i in rest])
    return result


def _measure_support(
    result: BudgetResult,
    rows: Sequence[int],
    summaries: Sequence[str],
    notes: Sequence[str],
    note_entities: Sequence[Sequence[Any]] | None = None,
    target_entities: Sequence[Sequence[Any]] | None = None,
) -> None:
    """Fill the support arrays of ``rows``: before = by ``notes`` (their unshortened text), after = by the note
    the result holds; entities already extracted may be passed in."""
    from dischargesum.data.target_support import extract_entities, supported_keys, target_entity_count

    if not rows:
        return
    if note_entities is None or target_entities is None:
        extracted = extract_entities([*summaries, *notes])
        target_entities, note_entities = extracted[: len(rows)], extracted[len(rows) :]
    changed = [m for m, i in enumerate(rows) if result.notes[i] != notes[m]]
    written = dict(zip(changed, extract_entities([result.notes[rows[m]] for m in changed])))
    for m, i in enumerate(rows):
        target = target_entities[m]
        result.target_entities[i] = target_entity_count(target)
        result.supported_before[i] = len(supported_keys(target, note_entities[m]))
        result.supported_after[i] = (
            len(supported_keys(target, written[m])) if m in written else result.supported_before[i]
        )


def _shorten_over_budget(
    counter: TokenCounter,
    notes: list[str],
    summaries: list[str],
    result: BudgetResult,
    over: np.ndarray,
    *,
    max_seq_length: int,
    min_note_tokens: int,
    strategy: str,
    batch_size: int,
    rank_by_target: Sequence[bool] | None,
    entity_support: str,
) -> None:
    """:func:`fit_to_budget` for the rows ``over`` the budget (reject, or shorten until they fit)."""
    prompt, completion, total = result.prompt_tokens.copy(), result.completion_tokens, result.total_tokens.copy()
    over_summaries = [summaries[i] for i in over]
    bare_prompt, _, bare_total = _count(counter, [MARKER] * len(over), over_summaries, batch_size)
    feasible: list[int] = []
    for k, i in enumerate(over):
        room = max_seq_length - int(bare_total[k])
        if room < min_note_tokens:
            result.rejected[int(i)] = (
                f"summary turn {int(completion[i])} tokens + prompt frame {int(bare_prompt[k])} = "
                f"{int(bare_total[k])} tokens leaves {room} of max_seq_length {max_seq_length} for the note "
                f"(min_note_tokens {min_note_tokens})"
            )
        else:
            feasible.append(k)
    # characters per note token, from this note's own tokenisation (note tokens = prompt - bare prompt frame)
    ratio = {k: len(notes[over[k]]) / max(1, int(prompt[over[k]] - bare_prompt[k]) + 1) for k in feasible}
    remove = {k: math.ceil((int(total[over[k]]) - max_seq_length) * ratio[k]) for k in feasible}
    ranked = [k for k in feasible if strategy == "sections" and rank_by_target is not None and rank_by_target[over[k]]]
    measured = feasible if entity_support != "off" else ranked
    entities = _entities_of(measured, [summaries[over[k]] for k in measured], [notes[over[k]] for k in measured])
    support: dict[int, list[int]] = {}
    if ranked:
        from dischargesum.data.target_support import section_support

        for k in ranked:
            target, note_entities = entities[k]
            support[k] = section_support(find_sections(notes[over[k]]), note_entities, target)
            result.stats["ranked_by_target"] += 1
    pending = feasible
    for round_ in range(1, _MAX_FIT_ROUNDS + 1):
        if not pending:
            break
        attempts = {
            k: shorten_note(notes[over[k]], remove[k], strategy, support.get(k))  # type: ignore[arg-type]
            for k in pending
        }
        if round_ == _MAX_FIT_ROUNDS:
            for k in pending:  # give up estimating: the bare marker fits (checked above)
                attempts[k].text = MARKER
        p, c, t = _count(
            counter, [attempts[k].text for k in pending], [summaries[over[k]] for k in pending], batch_size
        )
        still = []
        for j, k in enumerate(pending):
            if t[j] <= max_seq_length:
                i = int(over[k])
                attempt = attempts[k]
                result.notes[i] = attempt.text
                result.prompt_tokens[i], result.completion_tokens[i], result.total_tokens[i] = p[j], c[j], t[j]
                result.shortened[i] = True
                result.stats[f"fit_rounds_{round_}"] += 1
                result.stats["sections_dropped"] += len(attempt.dropped)
                for name in attempt.dropped:
                    result.stats[f"dropped:{name}"] += 1
                if attempt.trimmed:
                    result.stats[f"trimmed:{attempt.trimmed}"] += 1
                if attempt.middle_cut_chars:
                    result.stats["middle_cuts"] += 1
            else:
                # asked for too little: add the remaining excess, at this note's ratio, plus a small margin
                remove[k] += math.ceil((int(t[j]) - max_seq_length) * ratio[k]) + 8
                still.append(k)
        pending = still
    if entity_support != "off" and measured:
        rows = [int(over[k]) for k in measured]
        _measure_support(
            result,
            rows,
            [summaries[i] for i in rows],
            [notes[i] for i in rows],
            note_entities=[entities[k][1] for k in measured],
            target_entities=[entities[k][0] for k in measured],
        )


def _entities_of(
    keys: Sequence[int], summaries: list[str], notes: list[str]
) -> dict[int, tuple[list[Any], list[Any]]]:
    """``{key: (summary entities, note entities)}``, extracted in one batch."""
    if not keys:
        return {}
    from dischargesum.data.target_support import extract_entities

    extracted = extract_entities([*summaries, *notes])
    return {key: (extracted[m], extracted[len(keys) + m]) for m, key in enumerate(keys)}
