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
