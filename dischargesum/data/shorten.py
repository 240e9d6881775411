"""Shortening a note to the token budget — the note only; the summary is never touched.

Why sections first. The target is the brief hospital course: what happened during the stay — the presenting
problem (chief complaint, history of present illness), procedures, results, treatments and the discharge
medications and diagnoses. Some sections of a MIMIC discharge note contribute little to it and are long:
patient-facing discharge instructions, follow-up logistics, family and social history, the discharge condition
boilerplate and the head-to-toe physical exam. Cutting the *middle* of a note (a common default) removes the
pertinent results and the medication lists first, because that is where they sit; cutting the *end* (TRL's
default truncation, and the seed's) removes the discharge medications and diagnoses. So ``sections`` removes
whole sections in :data:`DROP_ORDER` (least useful for a BHC first), trims the tail of the last one it needs to
touch (the head of a section carries its summary line), and only when every droppable section is gone cuts the
middle of what remains (keeping the opening — complaint and history — and the end — discharge medications and
diagnoses). ``middle`` is the plain middle cut, kept for comparison (``note_shortening: middle``).

Why rank by the target on training data. A fixed order is blind to what the summary says: on held-out notes at a
small budget, the first 20 training notes lost every dose ("Medications on Admission" goes early) while their
targets cite doses, which teaches the model to write facts that are not in its input. So when the pipeline knows
the target (``shortening_rank_by_target``), it passes ``section_support`` — per section, how many of the target's
entities the section supports that the text shortening never drops does not already support (a dose repeated in
Discharge Medications is no reason to keep Medications on Admission; :mod:`dischargesum.data.target_support`) — and
the droppable sections go in order of that support: sections that support no target entity first, then one, ...;
:data:`DROP_ORDER` breaks ties. Only the train and validation splits are ranked. The test split keeps the fixed
:data:`DROP_ORDER` because it is what generate and eval feed the model, and at inference there is no target to rank
by: ranking test notes by their reference summaries would hand the model inputs shortened with knowledge of the
answer, inputs no real note would get, and inflate every score measured on them.

Every removal leaves the marker :data:`MARKER` so neither the model nor a reader mistakes a shortened note for a
complete one. Sections are recognised in both layouts: Kaggle plain text (``Family History:`` at a line start)
and PhysioNet tags (``<FAMILY HISTORY>``). A note without recognised sections gets the middle cut.

The functions here work in characters; the pipeline converts the token excess to characters with the note's own
characters-per-token ratio, re-counts exactly with the tokenizer and asks again for more when the estimate fell
short (see :func:`dischargesum.data.prepare`), so the result always fits exactly and removes little more than
needed.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

MARKER = "[...]"

# Least useful for writing a brief hospital course first. Sections not listed are never dropped (chief complaint,
# history of present illness, procedures, discharge medications, discharge diagnosis, the header block); they are
# shortened only by the final middle cut.
DROP_ORDER: tuple[str, ...] = (
    "followup instructions",
    "discharge instructions",
    "family history",
    "social history",
    "discharge condition",
    "discharge disposition",
    "physical exam",
    "medications on admission",
    "past surgical history",
    "past medical history",
    "pertinent results",
)
_ALIASES = {
    "follow-up instructions": "followup instructions",
    "follow up instructions": "followup instructions",
    "physical examination": "physical exam",
    "admission physical exam": "physical exam",
    "pmh": "past medical history",
    "social hx": "social history",
    "family hx": "family history",
}
# Headers that delimit sections (besides DROP_ORDER): a dropped section ends where the next one starts.
_OTHER_HEADERS = (
    "chief complaint",
    "major surgical or invasive procedure",
    "history of present illness",
    "discharge medications",
    "discharge diagnosis",
    "brief hospital course",
    "transitional issues",
    "allergies",
    "attending",
    "service",
    "sex",
    "name",
    "unit no",
    "admission date",
    "discharge date",
    "date of birth",
    "facility",
)
_HEADER_NAMES = sorted({*DROP_ORDER, *_ALIASES, *_OTHER_HEADERS}, key=len, reverse=True)
_NAMES_RE = "|".join(re.escape(name) for name in _HEADER_NAMES)
_PLAIN_HEADER = re.compile(rf"(?im)^(?:{_NAMES_RE})[ \t]*:")
_TAG_HEADER = re.compile(rf"(?i)<(?:{_NAMES_RE})>")
_PRIORITY = {name: rank for rank, name in enumerate(DROP_ORDER)}


@dataclass(frozen=True)
class Section:
    name: str  # canonical lower-case name
    start: int  # header start (character offset in the note)
    body_start: int  # first character after the header
    end: int  # start of the next section (or len(note))


@dataclass
class ShortenResult:
    text: str
    dropped: list[str] = field(default_factory=list)  # sections removed whole
    trimmed: str | None = None  # section whose tail was cut
    middle_cut_chars: int = 0  # characters removed by the middle cut


def find_sections(note: str) -> list[Section]:
    """Known section headers of ``note`` (plain ``Header:`` lines or PhysioNet ``<TAG>`` tags), in order."""
    matches = list(_TAG_HEADER.finditer(note)) or list(_PLAIN_HEADER.finditer(note))
    sections = []
    for i, match in enumerate(matches):
        raw = match.group(0).strip("<>:").strip().lower()
        name = _ALIASES.get(raw, raw)
        end = matches[i + 1].start() if i + 1 < len(matches) else len(note)
        sections.append(Section(name, match.start(), match.end(), end))
    return sections


def _snap_back(text: str, pos: int, floor: int) -> int:
    """Move ``pos`` back to just after a whitespace so no word is cut (not before ``floor``)."""
    cut = max(text.rfind(" ", floor, pos), text.rfind("\n", floor, pos))
    return cut + 1 if cut >= floor else pos


def middle_cut(text: str, remove_chars: int) -> tuple[str, int]:
    """Remove about ``remove_chars`` characters from the middle of ``text`` (at word boundaries), leave MARKER."""
    if remove_chars <= 0:
        return text, 0
    if remove_chars >= len(text) - len(MARKER):
        return MARKER, len(text)
    keep = len(text) - remove_chars - len(MARKER) - 2
    head_end = _snap_back(text, max(keep // 2, 1), 0)
    tail_start = len(text) - (keep - keep // 2)
    next_space = min((i for i in (text.find(" ", tail_start), text.find("\n", tail_start)) if i >= 0), default=-1)
    if next_space >= 0:
        tail_start = next_space + 1
    if tail_start <= head_end:
        return MARKER, len(text)
    head, tail = text[:head_end].rstrip(), text[tail_start:].lstrip()
    return f"{head}\n{MARKER}\n{tail}", tail_start - head_end


def is_droppable(section: Section) -> bool:
    """Whether ``sections`` shortening may drop ``section`` whole (its name is in :data:`DROP_ORDER`)."""
    return section.name in _PRIORITY


def shorten_note(
    note: str,
    remove_chars: int,
    strategy: Literal["sections", "middle"] = "sections",
    section_support: Sequence[int] | None = None,
) -> ShortenResult:
    """``note`` with at least about ``remove_chars`` characters removed (net of markers), by ``strategy``.

    ``section_support`` (``sections`` only; training data): one count per section of :func:`find_sections`
    ``(note)``, the target entities that section supports; droppable sections then go fewest-supported first,
    :data:`DROP_ORDER` breaking ties. None keeps the fixed :data:`DROP_ORDER` (inference: no target).

    Monotone: asking for more removal never gives a longer text, which the pipeline's fitting loop relies on.

    Raises:
        ValueError: ``section_support`` does not have one entry per section of ``note``.
    """
    if remove_chars <= 0:
        return ShortenResult(note)
    sections = find_sections(note) if strategy == "sections" else []
    support = {s.start: 0 for s in sections}
    if section_support is not None and strategy == "sections":
        if len(section_support) != len(sections):
            raise ValueError(
                f"section_support has {len(section_support)} entries for a note with {len(sections)} sections"
            )
        support = {s.start: count for s, count in zip(sections, section_support)}
    droppable = sorted(
        (s for s in sections if is_droppable(s)),
        key=lambda s: (support[s.start], _PRIORITY[s.name], -s.start),
    )
    if not droppable:
        text, cut = middle_cut(note, remove_chars)
        return ShortenResult(text, middle_cut_chars=cut)
    replacement: dict[int, str] = {}  # section start -> new text of the section
    result = ShortenResult(note)
    needed = remove_chars
    for section in droppable:
        if needed <= 0:
            break
        header = note[section.start : section.body_start]
        body = note[section.body_start : section.end]
        stub = f"{header} {MARKER}\n" if body.endswith("\n") else f"{header} {MARKER} "
        if len(body) - len(stub) + len(header) <= needed:
            replacement[section.start] = stub
            needed -= len(body) + len(header) - len(stub)
            result.dropped.append(section.name)
            continue
        keep = len(body) - needed - len(MARKER) - 2
        if keep <= 0 or not body[: _snap_back(body, keep, 0)].strip():
            replacement[section.start] = stub
            needed -= len(body) + len(header) - len(stub)
            result.dropped.append(section.name)
            continue
        cut = _snap_back(body, keep, 0)
        trail = "\n" if body.endswith("\n") else " "
        replacement[section.start] = f"{header}{body[:cut].rstrip()} {MARKER}{trail}"
        result.trimmed = section.name
        needed = 0  # cut <= keep, so the trim removed at least `needed`
        break
    pieces, cursor = [], 0
    for section in sections:
        if section.start in replacement:
            pieces.append(note[cursor : section.start])
            pieces.append(replacement[section.start])
            cursor = section.end
    pieces.append(note[cursor:])
    text = "".join(pieces)
    if needed > 0:
        text, cut = middle_cut(text, needed)
        result.middle_cut_chars = cut
    result.text = text
    return result
