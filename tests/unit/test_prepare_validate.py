"""Reading and validation: schema detection, a missing column, and one reason code per defect kind."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest

from dischargesum.config import ConfigError, PrepareDataConfig
from dischargesum.data.readers import MALFORMED, RawChunk, inspect_source, iter_chunks
from dischargesum.data.synthetic import DEFECTS, generate_rows, write_synthetic
from dischargesum.data.validate import REASONS, ValidationOptions, validate_chunk

pytestmark = pytest.mark.unit

# defect kind -> reason code (missing_subject_id is recoverable from a MIMIC note_id: the row is kept)
EXPECTED_REASON = {
    "empty_note": "empty_note",
    "whitespace_target": "empty_target",
    "empty_target": "empty_target",
    "invalid_utf8": "invalid_utf8",
    "missing_subject_id": None,
    "missing_subject_id_underivable": "missing_subject_id",
    "duplicate_note_id": None,  # decided by the pipeline (first kept row wins); see test_prepare_pipeline
    "giant_row": "note_too_long",
    "non_string": "non_string",
}
OPTS = ValidationOptions(normalization="clinical", utf8_errors="strict", max_note_chars=100_000, use_input_split=False)


def _cfg(tmp_path: Path, source: str, **kw) -> PrepareDataConfig:
    return PrepareDataConfig(output_dir=str(tmp_path / "out"), source=source, chunk_rows=16, **kw)


def _reasons(tmp_path: Path, source: str, **kw) -> tuple[dict[int, str], int, int]:
    cfg = _cfg(tmp_path, source, **kw)
    info = inspect_source(cfg)
    reasons, kept, read = {}, 0, 0
    for raw in iter_chunks(info, cfg):
        chunk = validate_chunk(raw, OPTS)
        reasons.update({r["row"]: r["reason"] for r in chunk.rejects})
        kept += len(chunk)
        read += chunk.rows_read
    return reasons, kept, read


def test_expected_reasons_cover_every_defect() -> None:
    assert set(EXPECTED_REASON) == set(DEFECTS)
    assert {r for r in EXPECTED_REASON.values() if r} <= set(REASONS)


@pytest.mark.parametrize(("suffix", "schema"), [(".csv", "kaggle"), (".jsonl", "kaggle"), (".csv", "physionet")])
def test_each_defect_gets_its_reason(tmp_path: Path, suffix: str, schema: str) -> None:
    src = tmp_path / f"in{suffix}"
    written = write_synthetic(
        src, 40, profile="tiny", schema=schema, seed=3, defects=DEFECTS, show_progress=False, workers=1
    )
    reasons, kept, read = _reasons(tmp_path, str(src))
    assert read == 40 and kept + len(reasons) == 40
    for defect, row in written.defect_rows.items():
        assert reasons.get(row) == EXPECTED_REASON[defect], defect
    assert len(reasons) == sum(1 for r in EXPECTED_REASON.values() if r)


def test_utf8_replace_keeps_the_row(tmp_path: Path) -> None:
    rows = list(generate_rows(3, profile="tiny", seed=0, defects=("invalid_utf8",)))
    values = {name: [r.get(name) for r in rows] for name in ("note_id", "subject_id", "input", "target")}
    values["gt_entities"] = [None] * 3
    values["split"] = [None] * 3
    replace = ValidationOptions("clinical", "replace", 0, False)
    assert validate_chunk(RawChunk(0, values), OPTS).rejects[0]["reason"] == "invalid_utf8"
    chunk = validate_chunk(RawChunk(0, values), replace)
    assert not chunk.rejects and "\ufffd" in chunk.note[1] and chunk.stats["utf8_replaced"] == 1


def _one(**overrides) -> RawChunk:
    values = {
        "note_id": ["10000032-DS-21"],
        "subject_id": [10000032],
        "input": ["summarize:\nChief Complaint:\nCough"],
        "target": ["Admitted with cough."],
        "gt_entities": [None],
        "split": [None],
    }
    values.update({k: [v] for k, v in overrides.items()})
    return RawChunk(7, values)


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"note_id": MALFORMED}, "malformed_row"),
        ({"note_id": "  "}, "missing_note_id"),
        ({"input": b"Cough \xff\xfe"}, "invalid_utf8"),
        ({"target": 12345}, "non_string"),
        ({"target": " 12345 "}, "non_string"),  # a bare number in a CSV text field
        ({"input": ["a", "list"]}, "non_string"),
        ({"input": "summarize:\n  "}, "empty_note"),  # nothing left after the prefix
        ({"target": None}, "empty_target"),
        ({"subject_id": 999}, "subject_id_mismatch"),
        ({"subject_id": None, "note_id": "note-7"}, "missing_subject_id"),
    ],
)
def test_row_checks(overrides: dict, reason: str) -> None:
    chunk = validate_chunk(_one(**overrides), OPTS)
    assert [r["reason"] for r in chunk.rejects] == [reason]
    assert chunk.rejects[0]["row"] == 7
    assert "Cough" not in json.dumps(chunk.rejects)  # no patient text in rejects


def test_ids_are_normalised_and_subject_derived() -> None:
    chunk = validate_chunk(_one(subject_id=10000032.0), OPTS)
    assert chunk.subject_id == ["10000032"]
    chunk = validate_chunk(_one(subject_id=None), OPTS)
    assert chunk.subject_id == ["10000032"] and chunk.stats["subject_id_derived"] == 1
    assert chunk.note == ["Chief Complaint:\nCough"]


@pytest.mark.parametrize(("schema", "expected"), [("kaggle", "kaggle"), ("physionet", "physionet")])
def test_schema_detection(tmp_path: Path, schema: str, expected: str) -> None:
    for suffix in (".csv", ".jsonl"):
        src = tmp_path / f"{schema}{suffix}"
        write_synthetic(src, 3, profile="tiny", schema=schema, show_progress=False, workers=1)
        info = inspect_source(_cfg(tmp_path, str(src)))
        assert info.schema == expected
        assert ("subject_id" in info.mapping) == (schema == "kaggle")


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_missing_column_names_columns_and_mapping_key(tmp_path: Path) -> None:
    src = _write_csv(tmp_path / "x.csv", ["note_id", "text", "bhc"], [["1-DS-1", "a", "b"]])
    with pytest.raises(ConfigError) as info:
        inspect_source(_cfg(tmp_path, str(src)))
    message = str(info.value)
    assert "['input', 'target']" in message and "'text'" in message and "'bhc'" in message
    assert "column_mapping" in message


def test_column_mapping_reads_custom_columns(tmp_path: Path) -> None:
    src = _write_csv(tmp_path / "x.csv", ["id", "text", "bhc"], [["1-DS-1", "Cough.", "Admitted."]])
    cfg = _cfg(tmp_path, str(src), column_mapping={"note_id": "id", "input": "text", "target": "bhc"})
    info = inspect_source(cfg)
    assert info.schema == "custom"
    chunk = validate_chunk(next(iter_chunks(info, cfg)), OPTS)
    assert chunk.note_id == ["1-DS-1"] and chunk.subject_id == ["1"]


def test_malformed_records_are_rows_too(tmp_path: Path) -> None:
    src = tmp_path / "x.jsonl"
    good = {"note_id": "1-DS-1", "input": "Cough.", "target": "Admitted."}
    src.write_text(json.dumps(good) + "\n{not json\n\n[1, 2]\n", encoding="utf-8")
    reasons, kept, read = _reasons(tmp_path, str(src))
    assert (read, kept) == (3, 1) and reasons == {1: "malformed_row", 2: "malformed_row"}
    src = tmp_path / "x.csv"
    src.write_text('note_id,input,target\n1-DS-1,"Cough.",Admitted.\n2-DS-1,only two\n', encoding="utf-8")
    reasons, kept, read = _reasons(tmp_path, str(src))
    assert (read, kept) == (2, 1) and list(reasons.values()) == ["malformed_row"]


def test_source_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is not a file"):
        inspect_source(_cfg(tmp_path, str(tmp_path / "missing.csv")))
    (tmp_path / "x.txt").write_text("a")
    with pytest.raises(ConfigError, match="suffix"):
        inspect_source(_cfg(tmp_path, str(tmp_path / "x.txt")))
    if importlib.util.find_spec("kagglehub") is None:  # installed, it would try the network: not in tests
        with pytest.raises(ConfigError, match="PhysioNet"):
            inspect_source(_cfg(tmp_path, "kagglehub:aminexdr/bhc-mimic-iv-summary"))
