"""Per-row validation with reason codes, plus normalisation: raw chunk -> kept rows + rejects.

Every input row ends in exactly one place: a split file or ``rejects.jsonl`` with one of :data:`REASONS`. The
checks here look at one row at a time, so chunks can be validated in worker processes; the checks that need the
whole input (``duplicate_note_id``) or the tokenizer (``summary_too_long``) run in the pipeline
(:mod:`dischargesum.data.prepare`). Reject records hold ids, a reason and a detail — never note or summary text.

Order of the checks (the first failing one names the reason): malformed_row, missing_note_id, invalid_utf8,
non_string, note_too_long, empty_note, empty_target, missing_subject_id, subject_id_mismatch,
unknown_input_split; then in the pipeline duplicate_note_id and summary_too_long.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from dischargesum.data.normalize import (
    count_words,
    normalize_clinical_note,
    normalize_entities_json,
    normalize_seed,
    normalize_whitespace,
    strip_instruction_prefix,
)
from dischargesum.data.readers import MALFORMED, RawChunk
from dischargesum.data.split import normalise_input_split

REASONS: dict[str, str] = {
    "malformed_row": "the record could not be parsed (CSV field count, invalid JSON, not a JSON object)",
    "missing_note_id": "note_id is empty or missing",
    "invalid_utf8": "a text field holds bytes that are not valid UTF-8 (utf8_errors: strict)",
    "non_string": "the note or summary is not text: a number, list or object (a bare number in a CSV field too)",
    "note_too_long": "the note has more than max_note_chars characters (likely concatenated records)",
    "empty_note": "the note is empty or whitespace, or nothing is left after removing the instruction prefix",
    "empty_target": "the summary is empty or whitespace",
    "missing_subject_id": "no subject_id, and note_id does not follow MIMIC's <subject_id>-<type>-<seq> pattern",
    "subject_id_mismatch": "subject_id differs from the patient number at the start of a MIMIC note_id",
    "unknown_input_split": "the input_split_column value is not train/validation/test (or val/dev/valid)",
    "duplicate_note_id": "note_id was already kept from an earlier row (the first occurrence is kept)",
    "summary_too_long": "the summary with the prompt frame leaves fewer than min_note_tokens of max_seq_length",
}

MIMIC_NOTE_ID = re.compile(r"^(\d+)-[A-Za-z]+-\d+$")
_BARE_NUMBER = re.compile(r"[-+]?(?:\d+(?:[.,]\d*)?|\.\d+)(?:[eE][-+]?\d+)?")
_INTEGRAL_FLOAT = re.compile(r"^(\d+)\.0+$")


@dataclass(frozen=True)
class ValidationOptions:
    normalization: str  # clinical | seed
    utf8_errors: str  # strict | replace
    max_note_chars: int  # 0 disables the check
    use_input_split: bool


@dataclass
class ValidatedChunk:
    """Rows of one chunk that passed the per-row checks (normalised), and the rejects, in row order."""

    rows: list[int] = field(default_factory=list)
    note_id: list[str] = field(default_factory=list)
    subject_id: list[str] = field(default_factory=list)
    note: list[str] = field(default_factory=list)
    summary: list[str] = field(default_factory=list)
    gt_entities: list[str | None] = field(default_factory=list)
    input_split: list[str | None] = field(default_factory=list)
    rejects: list[dict[str, Any]] = field(default_factory=list)
    rows_read: int = 0
    stats: Counter[str] = field(default_factory=Counter)
    prefixes: Counter[str] = field(default_factory=Counter)  # prefix_digest -> rows
    word_counts: Counter[str] | None = None

    def __len__(self) -> int:
        return len(self.rows)


class RowRejected(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


def prefix_digest(prefix: str) -> str:
    """How the data card names a stripped instruction prefix: the first 16 hex digits of sha256 of its UTF-8 text."""
    return hashlib.sha256(prefix.encode("utf-8", errors="surrogateescape")).hexdigest()[:16]


def reject_record(row: int | None, note_id: str | None, reason: str, detail: str) -> dict[str, Any]:
    """One line of rejects.jsonl (ids and reason only — no patient text)."""
    if reason not in REASONS:
        raise ValueError(f"unknown reject reason {reason!r}")
    return {"row": row, "note_id": note_id, "reason": reason, "detail": detail}


def _decode(name: str, value: Any, utf8_errors: str, stats: Counter[str]) -> str | None:
    """Text of a raw value: bytes are decoded strictly; lone surrogates (undecodable bytes) are invalid UTF-8.

    Returns None for a missing value. Raises RowRejected(invalid_utf8 / non_string).
    """
    if value is None:
        return None
    if isinstance(value, bytes | bytearray):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as exc:
            if utf8_errors == "replace":
                stats["utf8_replaced"] += 1
                return value.decode("utf-8", errors="replace")
            raise RowRejected("invalid_utf8", f"{name}: invalid UTF-8 at byte {exc.start}") from None
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            if utf8_errors == "replace":
                stats["utf8_replaced"] += 1
                return value.encode("utf-8", errors="surrogateescape").decode("utf-8", errors="replace")
            raise RowRejected("invalid_utf8", f"{name}: invalid UTF-8 at character {exc.start}") from None
        return value
    raise RowRejected("non_string", f"{name}: a {type(value).__name__}, not text")


def _identifier(value: Any) -> str | None:
    """An id as text: ints as digits, integral floats (CSV columns with gaps) without ``.0``; empty -> None."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, float):
        if value != value:  # NaN
            return None
        value = int(value) if value.is_integer() else value
    if isinstance(value, bytes | bytearray):
        value = value.decode("utf-8", errors="replace")
    text = str(value).strip()
    if not text or text.lower() in ("nan", "none", "null"):
        return None
    match = _INTEGRAL_FLOAT.match(text)
    return match.group(1) if match else text


def _validate_row(
    raw: dict[str, Any], opts: ValidationOptions, stats: Counter[str], prefixes: Counter[str]
) -> tuple[str, str, str, str, str | None, str | None]:
    """``(note_id, subject_id, note, summary, gt_entities, input_split)`` of a valid row. Raises RowRejected."""
    if raw["note_id"] is MALFORMED:
        raise RowRejected("malformed_row", raw.get("_malformed_detail") or "unparsable record")
    note_id = _identifier(raw["note_id"])
    if note_id is None:
        raise RowRejected("missing_note_id", "note_id is empty")
    if "\ufffd" in note_id and isinstance(raw["note_id"], bytes | bytearray):
        raise RowRejected("invalid_utf8", "note_id: invalid UTF-8")
    note = _decode("input", raw["input"], opts.utf8_errors, stats)
    summary = _decode("target", raw["target"], opts.utf8_errors, stats)
    for name, text in (("input", note), ("target", summary)):
        if text is not None and _BARE_NUMBER.fullmatch(text.strip()):
            raise RowRejected("non_string", f"{name}: a bare number, not text")
    if opts.max_note_chars and note is not None and len(note) > opts.max_note_chars:
        raise RowRejected("note_too_long", f"input: {len(note)} characters > max_note_chars {opts.max_note_chars}")
    if not note or not note.strip():
        raise RowRejected("empty_note", "input is empty" if not note else "input is whitespace only")
    if not summary or not summary.strip():
        raise RowRejected("empty_target", "target is empty" if not summary else "target is whitespace only")
    if opts.normalization == "clinical":
        note, prefix = normalize_clinical_note(note)
        summary = normalize_whitespace(summary)
    else:
        stripped, prefix = strip_instruction_prefix(note)
        note, summary = normalize_seed(stripped), normalize_seed(summary)
    if prefix is not None:
        stats["instruction_prefix_stripped"] += 1
        # A hash, never the text: a prefix may name the patient ("... for patient <name> (MRN ..., DOB ...):").
        prefixes[prefix_digest(prefix)] += 1
    if not note:
        raise RowRejected("empty_note", f"nothing left after {opts.normalization} normalisation")
    if not summary:
        raise RowRejected("empty_target", f"nothing left after {opts.normalization} normalisation")
    subject_id = _identifier(raw["subject_id"])
    mimic = MIMIC_NOTE_ID.match(note_id)
    if subject_id is None:
        if mimic is None:
            raise RowRejected(
                "missing_subject_id", "subject_id is missing and note_id is not <subject_id>-<type>-<seq>"
            )
        subject_id = mimic.group(1)
        stats["subject_id_derived"] += 1
    elif mimic is not None and mimic.group(1) != subject_id:
        raise RowRejected("subject_id_mismatch", f"subject_id {subject_id} but note_id starts with {mimic.group(1)}")
    input_split = None
    if opts.use_input_split:
        input_split = normalise_input_split(raw["split"])
        if input_split is None:
            raise RowRejected("unknown_input_split", f"split value {str(raw['split'])[:40]!r}")
    entities = raw.get("gt_entities")
    if isinstance(entities, bytes | bytearray):
        entities = entities.decode("utf-8", errors="replace")
    if entities is not None and not isinstance(entities, str):
        entities = None
    if entities is not None and opts.normalization == "clinical":
        normalised = normalize_entities_json(entities)
        if normalised is None:
            stats["gt_entities_invalid"] += 1
        entities = normalised
    return note_id, subject_id, note, summary, entities, input_split


def validate_chunk(chunk: RawChunk, opts: ValidationOptions) -> ValidatedChunk:
    """Validate and normalise every row of ``chunk`` (a pure function: safe in worker processes)."""
    out = ValidatedChunk(rows_read=len(chunk) + len(chunk.malformed))
    for detail in chunk.malformed:
        out.rejects.append(reject_record(None, None, "malformed_row", detail))
    names = list(chunk.values)
    for i, values in enumerate(zip(*(chunk.values[name] for name in names))):
        raw = dict(zip(names, values))
        row = chunk.row_number(i)
        try:
            note_id, subject_id, note, summary, entities, split = _validate_row(raw, opts, out.stats, out.prefixes)
        except RowRejected as rejected:
            note_id_text = _identifier(raw["note_id"]) if raw["note_id"] is not MALFORMED else None
            if note_id_text is not None:
                note_id_text = note_id_text.encode("utf-8", errors="replace").decode("utf-8")
            out.rejects.append(reject_record(row, note_id_text, rejected.reason, rejected.detail))
            continue
        out.rows.append(row)
        out.note_id.append(note_id)
        out.subject_id.append(subject_id)
        out.note.append(note)
        out.summary.append(summary)
        out.gt_entities.append(entities)
        out.input_split.append(split)
    if opts.normalization == "seed":
        out.word_counts = count_words(out.note)
        out.word_counts.update(count_words(out.summary))
    return out
