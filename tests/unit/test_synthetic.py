"""The synthetic BHC generator: schemas, determinism, lengths, ground-truth entities, defects and writers."""

from __future__ import annotations

import json
import re
import statistics
from datetime import datetime

import pandas as pd
import pytest

from dischargesum.data import synthetic
from dischargesum.data.synthetic import (
    DEFECTS,
    ENTITY_TYPES,
    INSTRUCTION_PREFIXES,
    INVALID_UTF8_TEXT,
    KAGGLE_COLUMNS,
    PHYSIONET_COLUMNS,
    PROFILES,
    SCHEMAS,
    generate_rows,
    write_synthetic,
)

pytestmark = pytest.mark.unit

MIMIC_NOTE_ID = re.compile(r"^(1\d{7})-DS-(\d+)$")
# Sample sizes per profile: enough for the ±15% mean check, small enough for a fast tier.
SAMPLE_ROWS = {"kaggle": 1500, "physionet": 400, "tiny": 1000}


@pytest.fixture(scope="module")
def samples() -> dict[tuple[str, str], list[dict]]:
    """One shared sample per (profile, schema) used by the length, entity and content tests."""
    out = {}
    for profile, schema in (
        ("kaggle", "kaggle"),
        ("physionet", "physionet"),
        ("tiny", "kaggle"),
        ("tiny", "physionet"),
    ):
        out[profile, schema] = list(generate_rows(SAMPLE_ROWS[profile], profile=profile, schema=schema, seed=7))
    return out


def test_same_seed_same_rows_and_different_seed_different_rows() -> None:
    first = list(generate_rows(30, seed=3))
    assert first == list(generate_rows(30, seed=3))
    other = list(generate_rows(30, seed=4))
    assert all(a["input"] != b["input"] for a, b in zip(first, other))


def test_prefix_stable_rows_do_not_depend_on_n() -> None:
    for schema in SCHEMAS:
        long = list(generate_rows(100, schema=schema, seed=1))
        short = list(generate_rows(37, schema=schema, seed=1))
        assert long[:37] == short


@pytest.mark.parametrize("schema", SCHEMAS)
def test_schema_columns_exactly(schema: str) -> None:
    expected = list(KAGGLE_COLUMNS if schema == "kaggle" else PHYSIONET_COLUMNS)
    with_gt = next(generate_rows(1, schema=schema))
    without = next(generate_rows(1, schema=schema, with_entities=False))
    assert list(with_gt) == [*expected, "gt_entities"]
    assert list(without) == expected


@pytest.mark.parametrize("key", [("kaggle", "kaggle"), ("physionet", "physionet"), ("tiny", "kaggle")])
def test_length_profile_means_within_15_percent(samples: dict, key: tuple[str, str]) -> None:
    profile = PROFILES[key[0]]
    rows = samples[key]
    mean_input = statistics.mean(len(r["input"]) for r in rows)
    mean_target = statistics.mean(len(r["target"]) for r in rows)
    assert abs(mean_input / profile.input_mean_chars - 1) < 0.15, mean_input
    assert abs(mean_target / profile.target_mean_chars - 1) < 0.15, mean_target


def test_kaggle_profile_has_long_tail_capped_near_15k(samples: dict) -> None:
    lengths = [len(r["input"]) for r in samples["kaggle", "kaggle"]]
    assert sum(n > 8000 for n in lengths) >= 5
    assert max(lengths) <= PROFILES["kaggle"].input_max_chars + 500


@pytest.mark.parametrize(
    "key", [("kaggle", "kaggle"), ("physionet", "physionet"), ("tiny", "kaggle"), ("tiny", "physionet")]
)
def test_every_ground_truth_entity_occurs_in_note_and_target(samples: dict, key: tuple[str, str]) -> None:
    types_seen = set()
    negated_seen = False
    for row in samples[key]:
        entities = json.loads(row["gt_entities"])
        assert entities, row["note_id"]
        for entity in entities:
            assert entity["type"] in ENTITY_TYPES
            assert isinstance(entity["negated"], bool)
            assert entity["text"] in row["input"], (row["note_id"], entity)
            assert entity["text"] in row["target"], (row["note_id"], entity)
            types_seen.add(entity["type"])
            negated_seen |= entity["negated"]
    assert types_seen == set(ENTITY_TYPES)
    assert negated_seen


def test_medication_entities_carry_dose_unit_route_frequency(samples: dict) -> None:
    meds = [e for r in samples["kaggle", "kaggle"] for e in json.loads(r["gt_entities"]) if e["type"] == "medication"]
    full = [e for e in meds if "route" in e]
    assert full and len(full) < len(meds)  # both "name dose unit route freq" and the short "name dose unit"
    for e in full:
        assert e["text"] == f"{e['name']} {e['dose']} {e['unit']} {e['route']} {e['frequency']}"


def test_notes_contain_digits_units_negations_and_blanks(samples: dict) -> None:
    rows = samples["kaggle", "kaggle"]
    for row in rows[:200]:
        note = row["input"]
        assert "___" in note
        assert re.search(r"\d", note)
        assert re.search(r"\b(mg|mcg|units|mEq|g)\b", note)
    notes = " ".join(r["input"] for r in rows[:200])
    for phrase in ("denies", "no evidence of", "negative for", "HD #", "mg/dL", "Discharge Medications:"):
        assert phrase in notes, phrase


def test_kaggle_ids_times_prefix_and_patient_order(samples: dict) -> None:
    rows = samples["kaggle", "kaggle"]
    admissions: dict[int, list[dict]] = {}
    previous_subject = 0
    for row in rows:
        match = MIMIC_NOTE_ID.match(row["note_id"])
        assert match and int(match.group(1)) == row["subject_id"] and int(match.group(2)) == row["note_seq"]
        assert re.fullmatch(r"2\d{7}", str(row["hadm_id"]))
        assert row["note_type"] == "DS"
        chart = datetime.strptime(row["charttime"], "%Y-%m-%d %H:%M:%S")
        store = datetime.strptime(row["storetime"], "%Y-%m-%d %H:%M:%S")
        assert 2110 <= chart.year <= 2200 and store > chart
        assert row["input"].startswith(INSTRUCTION_PREFIXES)
        assert row["input_length"] == len(row["input"]) and row["target_length"] == len(row["target"])
        assert row["subject_id"] >= previous_subject  # ordered by patient
        previous_subject = row["subject_id"]
        admissions.setdefault(row["subject_id"], []).append(row)
    counts = [len(v) for v in admissions.values()]
    assert max(counts) <= 5 and min(counts) >= 1 and statistics.mean(counts) > 1.5
    for visits in admissions.values():
        seqs = [v["note_seq"] for v in visits]
        times = [v["charttime"] for v in visits]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs) and times == sorted(times)
    assert len({r["hadm_id"] for r in rows}) == len(rows)
    assert len({r["input"].split("\n", 1)[0] for r in rows}) > 3  # prefixes vary


def test_physionet_tags_no_prefix_and_token_approximation(samples: dict) -> None:
    for row in samples["physionet", "physionet"][:200]:
        assert row["input"].startswith("<SEX> ")
        for tag in ("<SERVICE>", "<ALLERGIES>", "<CHIEF COMPLAINT>", "<HISTORY OF PRESENT ILLNESS>"):
            assert tag in row["input"]
        assert MIMIC_NOTE_ID.match(row["note_id"])
        assert row["input_tokens"] == round(len(row["input"]) / 4)
        assert row["target_tokens"] == round(len(row["target"]) / 4)


def test_rows_are_not_near_duplicates(samples: dict) -> None:
    rows = samples["kaggle", "kaggle"][:300]
    assert len({r["input"] for r in rows}) == len(rows)
    assert len({r["target"][:200] for r in rows}) == len(rows)
    section_orders = {tuple(re.findall(r"^([A-Z][A-Za-z ]+):$", r["input"], re.M)) for r in rows}
    assert len(section_orders) > 20


@pytest.mark.parametrize("schema", SCHEMAS)
def test_each_defect_at_its_reported_row(schema: str) -> None:
    n = 40
    placements = synthetic.defect_rows(n, DEFECTS)
    assert sorted(placements) == sorted(DEFECTS) and len(set(placements.values())) == len(DEFECTS)
    assert 0 not in placements.values()
    rows = list(generate_rows(n, schema=schema, defects=DEFECTS, seed=2))
    clean = list(generate_rows(n, schema=schema, seed=2))
    at = {name: rows[i] for name, i in placements.items()}
    assert at["empty_note"]["input"] == ""
    assert at["whitespace_target"]["target"] != "" and at["whitespace_target"]["target"].strip() == ""
    assert at["empty_target"]["target"] == ""
    assert INVALID_UTF8_TEXT in at["invalid_utf8"]["input"]
    assert isinstance(at["non_string"]["target"], int)
    assert len(at["giant_row"]["input"]) >= 150_000
    assert at["duplicate_note_id"]["note_id"] == rows[0]["note_id"]
    assert MIMIC_NOTE_ID.match(at["missing_subject_id"]["note_id"])
    assert not MIMIC_NOTE_ID.match(at["missing_subject_id_underivable"]["note_id"])
    if schema == "kaggle":
        assert at["missing_subject_id"]["subject_id"] is None
        assert at["missing_subject_id_underivable"]["subject_id"] is None
        assert at["duplicate_note_id"]["subject_id"] == rows[0]["subject_id"]
    defect_indices = set(placements.values())
    for i, (row, base) in enumerate(zip(rows, clean)):
        if i not in defect_indices:
            assert row == base  # defects touch only their own rows


def test_write_csv_round_trip_with_invalid_utf8_bytes(tmp_path) -> None:
    path = tmp_path / "bhc.csv"
    result = write_synthetic(
        path, 60, defects=("invalid_utf8", "missing_subject_id", "non_string"), show_progress=False
    )
    raw = path.read_bytes()
    assert b"\xff\xfe" in raw
    with pytest.raises(UnicodeDecodeError):
        raw.decode("utf-8")
    # pandas' arrow-backed strings reject surrogates, so a reader must replace undecodable bytes.
    frame = pd.read_csv(path, encoding_errors="replace", keep_default_na=False, dtype=str)
    rows = list(generate_rows(60, defects=("invalid_utf8", "missing_subject_id", "non_string")))
    assert list(frame.columns) == [*KAGGLE_COLUMNS, "gt_entities"]
    assert frame["input"].tolist() == [r["input"].replace(INVALID_UTF8_TEXT, "\ufffd\ufffd") for r in rows]
    assert frame["target"].tolist() == [str(r["target"]) for r in rows]
    assert frame.loc[result.defect_rows["missing_subject_id"], "subject_id"] == ""
    assert result.rows == 60 and result.path == path and result.seconds > 0


def test_write_jsonl_round_trip_keeps_numeric_target(tmp_path) -> None:
    path = tmp_path / "bhc.jsonl"
    result = write_synthetic(path, 30, schema="physionet", defects=("non_string", "empty_note"), show_progress=False)
    frame = pd.read_json(path, lines=True, dtype=False)
    rows = list(generate_rows(30, schema="physionet", defects=("non_string", "empty_note")))
    assert list(frame.columns) == [*PHYSIONET_COLUMNS, "gt_entities"]
    assert frame["input"].tolist() == [r["input"] for r in rows]
    line = path.read_text(encoding="utf-8").splitlines()[result.defect_rows["non_string"]]
    assert json.loads(line)["target"] == synthetic.NON_STRING_TARGET


def test_write_parquet_round_trip_and_refuses_unrepresentable_defects(tmp_path) -> None:
    path = tmp_path / "bhc.parquet"
    write_synthetic(
        path, 25, profile="tiny", with_entities=False, defects=("missing_subject_id",), show_progress=False
    )
    frame = pd.read_parquet(path)
    rows = list(generate_rows(25, profile="tiny", with_entities=False, defects=("missing_subject_id",)))
    assert list(frame.columns) == list(KAGGLE_COLUMNS)
    assert frame["target"].tolist() == [r["target"] for r in rows]
    assert frame["subject_id"].isna().sum() == 1
    for defect in ("invalid_utf8", "non_string"):
        with pytest.raises(ValueError, match="defects"):
            write_synthetic(tmp_path / "x.parquet", 10, defects=(defect,), show_progress=False)


def test_write_is_identical_across_worker_counts_and_chunks(tmp_path) -> None:
    one = write_synthetic(tmp_path / "a.csv", 90, profile="tiny", chunk_rows=90, workers=1, show_progress=False)
    two = write_synthetic(tmp_path / "b.csv", 90, profile="tiny", chunk_rows=25, workers=2, show_progress=False)
    assert one.path.read_bytes() == two.path.read_bytes()
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"profile": "huge"}, "profile"),
        ({"schema": "mimic"}, "schema"),
        ({"defects": ("bad_defect",)}, "defects"),
        ({"defects": ("empty_note", "empty_note")}, "defects"),
        ({"defects": "empty_note"}, "defects"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_argument(kwargs: dict, argument: str, tmp_path) -> None:
    with pytest.raises(ValueError, match=argument):
        list(generate_rows(5, **kwargs))
    with pytest.raises(ValueError, match=argument):
        write_synthetic(tmp_path / "x.csv", 5, show_progress=False, **kwargs)


def test_bad_suffix_and_too_few_rows_raise_value_error(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"path=.*\.txt.*\.csv"):
        write_synthetic(tmp_path / "x.txt", 5, show_progress=False)
    with pytest.raises(ValueError, match="n=2"):
        list(generate_rows(2, defects=("empty_note", "empty_target")))
    with pytest.raises(ValueError, match="chunk_rows"):
        write_synthetic(tmp_path / "x.csv", 5, chunk_rows=0, show_progress=False)
