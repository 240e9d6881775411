"""Which of a target summary's entities a note — or one section of it — supports.

"Supported" means what eval means by it: the one extractor (:mod:`dischargesum.evaluation.entities`) reads both
texts and :func:`~dischargesum.evaluation.entities.compare_entities` ``(target, source)`` counts the target's
entities (one per matching key) that some source entity *covers* — same type, canonical name and negation, and
the same dose / value / year when the target states one. That is eval's ``reference_vs_source`` comparison, so the
data card's fractions and eval's numbers for the same notes agree.

prepare_data uses it for two things, both only where a note is over the token budget (extraction is the costly
part of the stage): ranking a training note's droppable sections by the target entities each supports
(:func:`section_support`, see :mod:`dischargesum.data.shorten`), and the data card's fraction of target entities
supported by the model input before (the whole normalised note) and after shortening (the note written).

The extractor is imported inside the functions: it loads its vocabularies on first use, and the stage must not pay
for that when neither ranking nor the card statistics are on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from dischargesum.data.shorten import Section, is_droppable

if TYPE_CHECKING:
    from dischargesum.evaluation.entities import Entity


def extract_entities(texts: Sequence[str]) -> list[list[Entity]]:
    """The entities of each text (the project's one extractor, batched)."""
    from dischargesum.evaluation.entities import extract_entities_batch

    return extract_entities_batch(texts) if texts else []


def target_entity_count(target: Sequence[Entity]) -> int:
    """Distinct target entities (one per matching key), the denominator of every support fraction."""
    return len({entity.key for entity in target})


def supported_keys(target: Sequence[Entity], source: Sequence[Entity]) -> set[str]:
    """Keys of the target's entities that some entity of ``source`` covers (eval's matching policy)."""
    from dischargesum.evaluation.entities import compare_entities

    return {entity.key for entity in compare_entities(target, source).supported}


def section_support(
    sections: Sequence[Section], note_entities: Sequence[Entity], target: Sequence[Entity]
) -> list[int]:
    """Per section: target entities it supports that nothing shortening keeps anyway supports.

    An entity belongs to the section its first character lies in. The text shortening never drops (the header
    block and the sections not in :data:`~dischargesum.data.shorten.DROP_ORDER`) is counted once, up front: a
    target entity it already supports (a dose repeated in Discharge Medications) gives no reason to keep a
    droppable section, so it counts for none. Non-droppable sections get 0 (they are never ranked).
    """
    if not sections:
        return []
    members: list[list[Entity]] = [[] for _ in sections]
    kept: list[Entity] = []
    starts = [section.start for section in sections]
    for entity in note_entities:
        index = _section_index(starts, entity.start)
        if index is None or not is_droppable(sections[index]):
            kept.append(entity)
        else:
            members[index].append(entity)
    already = supported_keys(target, kept)
    return [
        len(supported_keys(target, members[i]) - already) if is_droppable(section) and members[i] else 0
        for i, section in enumerate(sections)
    ]


def _section_index(starts: Sequence[int], offset: int) -> int | None:
    """Index of the section holding character ``offset`` (None: before the first header)."""
    import bisect

    index = bisect.bisect_right(starts, offset) - 1
    return index if index >= 0 else None
