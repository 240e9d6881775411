"""Shortening ranked by the target (issue #15 item 6): train/validation notes keep the sections their summary
cites, test notes keep the fixed DROP_ORDER, and the data card reports the target-entity support before/after."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from dischargesum.config import ConfigError, PrepareDataConfig
from dischargesum.data import schema
from dischargesum.data.budget import TokenCounter, count_tokens, fit_to_budget
from dischargesum.data.card import target_entity_support
from dischargesum.data.prepare import run_prepare_data
from dischargesum.data.shorten import find_sections, shorten_note
from dischargesum.data.target_support import extract_entities, section_support, supported_keys
from dischargesum.modeling import load_tokenizer

pytestmark = pytest.mark.unit

SECTIONS = {
    "past medical history": "Remote appendectomy in childhood, tonsillectomy as a teenager, knee arthroscopy. " * 5,
    "medications on admission": "1. metoprolol 25 mg PO BID\n2. lisinopril 10 mg PO daily\n"
    "3. atorvastatin 40 mg PO daily",
    "family history": "Mother with hypertension. Father had a stroke at age seventy. " * 4,
    "social history": "Lives with his wife, retired teacher, walks daily. " * 3,
    "physical exam": "Well appearing, lungs clear to auscultation, abdomen soft and nontender. " * 3,
}
NOTE = (
    "Sex: M\nService: MEDICINE\n\nChief Complaint:\nchest pain\n\n"
    "History of Present Illness:\nMr. ___ presented with two days of exertional chest pain.\n\n"
    + "".join(f"{name.title()}:\n{body.strip()}\n\n" for name, body in SECTIONS.items())
    + "Discharge Medications:\n1. aspirin 81 mg PO daily\n\nDischarge Diagnosis:\nchest pain\n"
)
# Cites the admission doses (not repeated in Discharge Medications) and the chief complaint (never dropped).
TARGET = (
    "Mr. ___ was admitted with chest pain. His home metoprolol 25 mg BID, lisinopril 10 mg daily and "
    "atorvastatin 40 mg daily were continued."
)
ADMISSION_DOSES = ("metoprolol 25 mg", "lisinopril 10 mg", "atorvastatin 40 mg")
# Enough to need every zero-support section the fixed order drops before Medications on Admission, and that section
# too; still less than the zero-support sections (Past Medical History included) that ranking drops instead.
FIXED_ORDER_LOSS = sum(len(SECTIONS[name]) for name in ("family history", "social history", "physical exam"))
REMOVE = FIXED_ORDER_LOSS + len(SECTIONS["medications on admission"]) + 60


@pytest.fixture(scope="module")
def entities() -> tuple[list, list]:
    target, note = extract_entities([TARGET, NOTE])
    return target, note


def _section_support(entities) -> list[int]:
    target, note = entities
    return section_support(find_sections(NOTE), note, target)


def test_section_support_counts_only_what_the_kept_text_does_not_support(entities) -> None:
    support = dict(zip((s.name for s in find_sections(NOTE)), _section_support(entities)))
    assert support["medications on admission"] == 3  # the three doses; "chest pain" is in the chief complaint
    assert all(count == 0 for name, count in support.items() if name != "medications on admission")


def test_ranking_keeps_the_admission_doses_the_fixed_order_drops(entities) -> None:
    assert sum(len(SECTIONS[n]) for n in SECTIONS if n != "medications on admission") > REMOVE
    fixed = shorten_note(NOTE, REMOVE, "sections")
    ranked = shorten_note(NOTE, REMOVE, "sections", _section_support(entities))
    assert "medications on admission" in fixed.dropped
    assert not any(dose in fixed.text for dose in ADMISSION_DOSES)
    assert "medications on admission" not in ranked.dropped and ranked.trimmed != "medications on admission"
    assert all(dose in ranked.text for dose in ADMISSION_DOSES)
    assert len(ranked.text) <= len(NOTE) - REMOVE and len(fixed.text) <= len(NOTE) - REMOVE
    target = entities[0]
    assert len(supported_keys(target, extract_entities([ranked.text])[0])) == 4
    assert len(supported_keys(target, extract_entities([fixed.text])[0])) == 1  # only the chief complaint


def test_section_support_must_match_the_sections() -> None:
    with pytest.raises(ValueError, match="section_support has 2 entries"):
        shorten_note(NOTE, REMOVE, "sections", [0, 1])


def _budget(tokenizer) -> int:
    """A budget that needs about REMOVE characters off NOTE (the fitting loop re-counts exactly)."""
    probe = NOTE[: len(NOTE) - REMOVE]
    return int(count_tokens(tokenizer, [probe], [TARGET])[2][0])


def test_fit_to_budget_ranks_only_the_rows_it_is_told_to(tiny_model_dir: Path) -> None:
    tokenizer = load_tokenizer(str(tiny_model_dir))
    limit = _budget(tokenizer)
    counter = TokenCounter(tokenizer, mode="exact")
    fitted = fit_to_budget(
        counter,
        [NOTE, NOTE],
        [TARGET, TARGET],
        max_seq_length=limit,
        min_note_tokens=16,
        strategy="sections",
        rank_by_target=[True, False],  # a training row, a test row
        entity_support="shortened",
    )
    assert fitted.shortened.tolist() == [True, True] and not fitted.rejected
    assert all(dose in fitted.notes[0] for dose in ADMISSION_DOSES)
    assert not any(dose in fitted.notes[1] for dose in ADMISSION_DOSES)
    # the existing invariant: each example fits, and the counts are the exact ones of the written notes
    _, _, total = count_tokens(tokenizer, fitted.notes, [TARGET, TARGET])
    assert total.tolist() == fitted.total_tokens.tolist() and max(total) <= limit
    assert fitted.target_entities.tolist() == [4, 4]
    assert fitted.supported_before.tolist() == [4, 4] and fitted.supported_after.tolist() == [4, 1]
    assert fitted.stats["ranked_by_target"] == 1


def test_card_support_block_by_hand() -> None:
    arrays = {
        "note_shortened": np.array([1, 1, 0, 0]),
        "target_entities": np.array([4, 6, 5, -1]),  # -1: not measured (a note within budget, mode shortened)
        "supported_before": np.array([4, 5, 5, -1]),
        "supported_after": np.array([1, 3, 5, -1]),
    }
    block = target_entity_support(arrays, "shortened")
    assert block == {
        "shortened": {
            "notes": 2,
            "target_entities": 10,
            "supported_before": 9,
            "supported_after": 4,
            "fraction_before": 0.9,
            "fraction_after": 0.4,
        }
    }
    arrays["target_entities"][3] = arrays["supported_before"][3] = arrays["supported_after"][3] = 0
    assert target_entity_support(arrays, "all")["all"] == {
        "notes": 4,
        "target_entities": 15,
        "supported_before": 14,
        "supported_after": 9,
        "fraction_before": round(14 / 15, 4),
        "fraction_after": 0.6,
    }
    assert target_entity_support(arrays, "off") is None


def _presplit_source(tmp_path: Path) -> Path:
    rows = [
        {"note_id": f"{10_000_000 + i}-DS-1", "subject_id": str(10_000_000 + i), "input": NOTE, "target": TARGET}
        for i in range(3)
    ]
    for row, split in zip(rows, ("train", "validation", "test")):
        row["split"] = split
    src = tmp_path / "presplit.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return src


def _presplit_config(tmp_path: Path, tiny_model_dir: Path, **overrides: object) -> PrepareDataConfig:
    """prepare_data on the three pre-split notes, at a budget that forces shortening."""
    return PrepareDataConfig(
        output_dir=str(tmp_path / "out"),
        source=str(_presplit_source(tmp_path)),
        input_split_column="split",
        tokenizer_name_or_path=str(tiny_model_dir),
        max_seq_length=_budget(load_tokenizer(str(tiny_model_dir))),
        min_note_tokens=16,
        num_workers=0,
        plots=False,
        **overrides,  # type: ignore[arg-type]
    )


def test_pipeline_ranks_train_and_validation_not_test_and_cards_the_support(tmp_path: Path, tiny_model_dir) -> None:
    cfg = _presplit_config(tmp_path, tiny_model_dir, entity_support_stats="all")
    assert cfg.shortening_rank_by_target  # the default
    result = run_prepare_data(cfg)
    notes = {
        s: pq.read_table(tmp_path / "out" / schema.SPLIT_FILES[s]).column("note").to_pylist() for s in schema.SPLITS
    }
    assert all(dose in notes["train"][0] and dose in notes["validation"][0] for dose in ADMISSION_DOSES)
    assert not any(dose in notes["test"][0] for dose in ADMISSION_DOSES)
    support = {s: result.card["splits"][s]["target_entity_support"] for s in schema.SPLITS}
    for split, after in (("train", 4), ("validation", 4), ("test", 1)):
        expected = {"notes": 1, "target_entities": 4, "supported_before": 4, "supported_after": after}
        expected |= {"fraction_before": 1.0, "fraction_after": after / 4}
        assert support[split] == {"shortened": expected, "all": expected}
    assert "test: drop_order" in result.card["length_budget"]["rank_by_target"]


def test_fixed_order_everywhere_when_switched_off(tmp_path: Path, tiny_model_dir) -> None:
    cfg = _presplit_config(tmp_path, tiny_model_dir, shortening_rank_by_target=False, entity_support_stats="off")
    result = run_prepare_data(cfg)
    train = pq.read_table(tmp_path / "out" / schema.SPLIT_FILES["train"]).column("note").to_pylist()
    assert not any(dose in train[0] for dose in ADMISSION_DOSES)
    assert result.card["splits"]["train"]["target_entity_support"] is None
    assert result.card["length_budget"]["rank_by_target"] is None


def test_entity_support_stats_is_checked() -> None:
    with pytest.raises(ConfigError, match="entity_support_stats"):
        PrepareDataConfig(entity_support_stats="some")  # type: ignore[arg-type]
