"""The whole stage in-process: accounting, patient-level splits, summaries kept whole, reruns byte-identical."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from dischargesum.cli import UserError
from dischargesum.config import PrepareDataConfig
from dischargesum.data import schema
from dischargesum.data.normalize import normalize_whitespace
from dischargesum.data.prepare import debug_examples, run_prepare_data
from dischargesum.data.split import SplitTracker, assign_split, patient_unit_interval
from dischargesum.data.synthetic import DEFECTS, generate_rows, write_synthetic
from dischargesum.manifest import read_manifest, require_artifact
from tests.fixtures_data import make_prepared_dataset

pytestmark = pytest.mark.unit


def _cfg(tmp_path: Path, tokenizer: Path, name: str, **kw) -> PrepareDataConfig:
    base = dict(
        output_dir=str(tmp_path / name),
        tokenizer_name_or_path=str(tokenizer),
        synthetic_profile="tiny",
        num_workers=0,
        plots=False,
        max_reject_fraction=0.5,
    )
    base.update(kw)
    return PrepareDataConfig(**base)


def _read(out: Path) -> dict[str, list[dict]]:
    return {split: pq.read_table(out / schema.SPLIT_FILES[split]).to_pylist() for split in schema.SPLITS}


def _rejects(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / schema.REJECTS_FILE).read_text().splitlines()]


@pytest.mark.parametrize("seed", [11, 12, 13])
def test_accounting_invariant_random_inputs(tmp_path: Path, tiny_model_dir: Path, seed: int) -> None:
    rng = random.Random(seed)
    n = rng.randint(25, 60)
    defects = tuple(rng.sample(DEFECTS, rng.randint(0, len(DEFECTS))))
    src = tmp_path / f"in{rng.choice(['.csv', '.jsonl'])}"
    write_synthetic(src, n, profile="tiny", seed=seed, defects=defects, show_progress=False, workers=1)
    cfg = _cfg(
        tmp_path,
        tiny_model_dir,
        "out",
        source=str(src),
        seed=seed,
        chunk_rows=rng.randint(4, 20),
        max_seq_length=rng.choice([200, 300, 512]),
        min_note_tokens=16,
    )
    result = run_prepare_data(cfg)
    splits, rejects = _read(cfg_out := Path(cfg.output_dir)), _rejects(cfg_out)
    rows = [r["source_row"] for split in splits.values() for r in split] + [r["row"] for r in rejects]
    assert sorted(rows) == list(range(n))  # every input row exactly once
    card = result.card
    assert card["accounting"] == {
        "rows_read": n,
        "rows_kept": n - len(rejects),
        "rows_rejected": len(rejects),
        "invariant_holds": True,
    }
    assert sum(card["rejects_by_reason"].values()) == len(rejects)
    assert {s: card["splits"][s]["rows"] for s in schema.SPLITS} == {s: len(v) for s, v in splits.items()}
    # no patient in two splits
    owners: dict[str, set[str]] = {}
    for split, records in splits.items():
        for record in records:
            owners.setdefault(record["subject_id"], set()).add(split)
    assert all(len(v) == 1 for v in owners.values())
    # token columns are within the budget; prompt + completion = the training length for this template
    for records in splits.values():
        for record in records:
            assert record["prompt_tokens"] + record["completion_tokens"] <= cfg.max_seq_length


def test_summaries_are_never_shortened(tmp_path: Path, tiny_model_dir: Path) -> None:
    cfg = _cfg(tmp_path, tiny_model_dir, "out", source="synthetic", synthetic_rows=40, max_seq_length=220, seed=4)
    run_prepare_data(cfg)
    source = {r["note_id"]: r for r in generate_rows(40, profile="tiny", seed=4)}
    records = [r for split in _read(Path(cfg.output_dir)).values() for r in split]
    assert any(r["note_shortened"] for r in records)
    for record in records:
        assert record["summary"] == normalize_whitespace(source[record["note_id"]]["target"])
        if record["note_shortened"]:
            assert "[...]" in record["note"] and len(record["note"]) < record["note_chars_original"]
        else:
            assert len(record["note"]) == record["note_chars_original"]
    too_long = [r for r in _rejects(Path(cfg.output_dir)) if r["reason"] == "summary_too_long"]
    assert all("min_note_tokens" in r["detail"] for r in too_long)


def test_rerun_is_byte_identical_and_artifact_is_complete(tmp_path: Path, tiny_model_dir: Path) -> None:
    kw = dict(
        source="synthetic",
        synthetic_rows=30,
        synthetic_defects=["empty_note", "duplicate_note_id"],
        plots=True,
        max_seq_length=300,
    )
    first = run_prepare_data(_cfg(tmp_path, tiny_model_dir, "a", **kw))
    second = run_prepare_data(_cfg(tmp_path, tiny_model_dir, "b", **kw))
    names = [*schema.SPLIT_FILES.values(), schema.REJECTS_FILE, schema.DATA_CARD_FILE, "lengths_tokens.png"]
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    manifest = require_artifact(tmp_path / "a", stage="prepare_data", field="dataset_dir", files=names)
    assert manifest["data_fingerprint"] == first.card["data_fingerprint"] == second.card["data_fingerprint"]
    card = json.loads((tmp_path / "a" / schema.DATA_CARD_FILE).read_text())
    for key in ("instruction", "tokenizer_name_or_path", "max_seq_length", "normalization"):
        assert key in card
    assert card["rejects_by_reason"]["duplicate_note_id"] == 1 and card["rejects_by_reason"]["empty_note"] == 1
    assert list(pq.read_schema(tmp_path / "a" / "train.parquet").names) == list(schema.PREPARED_COLUMNS)


def test_too_many_rejects_fail_loudly(tmp_path: Path, tiny_model_dir: Path) -> None:
    cfg = _cfg(
        tmp_path,
        tiny_model_dir,
        "out",
        source="synthetic",
        synthetic_rows=20,
        synthetic_defects=["empty_note", "empty_target"],
        max_reject_fraction=0.05,
    )
    with pytest.raises(UserError, match=r"2 of 20 rows rejected.*max_reject_fraction"):
        run_prepare_data(cfg)
    manifest = read_manifest(cfg.output_dir)
    assert manifest is not None and manifest["status"] == "failed"
    assert len(_rejects(Path(cfg.output_dir))) == 2  # written for diagnosis


def test_presplit_input_overlap_fails_with_patient_count(tmp_path: Path, tiny_model_dir: Path) -> None:
    rows = list(generate_rows(30, profile="tiny", seed=2, with_entities=False))
    for i, row in enumerate(rows):
        row["split"] = ["train", "val", "test"][i % 3]  # consecutive rows of a patient land in different splits
    src = tmp_path / "presplit.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _cfg(tmp_path, tiny_model_dir, "out", source=str(src), input_split_column="split")
    patients = {}
    for i, row in enumerate(rows):
        patients.setdefault(str(row["subject_id"]), set()).add(i % 3)
    crossing = sum(1 for v in patients.values() if len(v) > 1)
    with pytest.raises(UserError, match=rf"{crossing} patient\(s\) have notes in more than one split"):
        run_prepare_data(cfg)
    for row in rows:  # a clean pre-split input keeps its assignment
        row["split"] = "test" if int(row["subject_id"]) % 2 else "train"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_prepare_data(_cfg(tmp_path, tiny_model_dir, "ok", source=str(src), input_split_column="split"))
    splits = _read(tmp_path / "ok")
    assert all(int(r["subject_id"]) % 2 for r in splits["test"]) and not splits["validation"]


def test_split_depends_only_on_subject_and_seed() -> None:
    kw = dict(seed=42, validation_fraction=0.1, test_fraction=0.1)
    subjects = [str(10_000_000 + i) for i in range(4000)]
    first = {s: assign_split(s, **kw) for s in subjects}
    again = {s: assign_split(s, **kw) for s in reversed([*subjects, "99999999"])}
    assert all(first[s] == again[s] for s in subjects)  # adding patients moves nobody
    counts = {name: list(first.values()).count(name) / len(subjects) for name in ("train", "validation", "test")}
    assert abs(counts["test"] - 0.1) < 0.02 and abs(counts["validation"] - 0.1) < 0.02
    assert assign_split("10000032", seed=1, validation_fraction=0.5, test_fraction=0.4) in {
        "train",
        "validation",
        "test",
    }
    assert 0 <= patient_unit_interval("10000032", 0) < 1
    other = {s: assign_split(s, seed=43, validation_fraction=0.1, test_fraction=0.1) for s in subjects}
    assert other != first
    tracker = SplitTracker()
    tracker.add("1", "train")
    tracker.add("1", "train")
    tracker.add("2", "test")
    assert tracker.crossing_patients == 0
    tracker.add("2", "validation")
    assert tracker.crossing_patients == 1 and tracker.patients_per_split() == {"train": 1, "validation": 1, "test": 1}


def test_seed_normalization_end_to_end(tmp_path: Path, tiny_model_dir: Path) -> None:
    cfg = _cfg(tmp_path, tiny_model_dir, "out", source="synthetic", synthetic_rows=30, normalization="seed")
    result = run_prepare_data(cfg)
    records = [r for split in _read(Path(cfg.output_dir)).values() for r in split]
    assert records
    for record in records:
        assert record["note"] == record["note"].lower() and not any(ch.isdigit() for ch in record["note"])
        assert " no " not in f" {record['note']} " and "___" not in record["note"]
    details = result.card["normalization_details"]
    assert "LOSSY" in details["warning"] and set(details["backends"]) == {"tokenizer", "stopwords", "lemmatizer"}


def test_debug_shows_the_loss_mask(tmp_path: Path, tiny_model_dir: Path) -> None:
    cfg = _cfg(tmp_path, tiny_model_dir, "out", source="synthetic", synthetic_rows=10, debug=2, max_seq_length=256)
    text = debug_examples(cfg)
    assert text.count("===== example") == 2 and text.count("model\n⟦") == 2
    trained = text.split("model\n⟦", 1)[1].split("⟧", 1)[0]
    assert trained.endswith("<end_of_turn>\n") and "<start_of_turn>" not in trained
    assert not Path(cfg.output_dir).exists()  # --debug writes nothing


def test_debug_shows_the_rows_the_full_run_keeps(tmp_path: Path, tiny_model_dir: Path) -> None:
    # At 200 tokens most tiny summaries still fit but some early rows are summary_too_long, and the defects add an
    # empty note and a duplicate: --debug must skip them as the full run does and still show N examples.
    kw = dict(source="synthetic", synthetic_rows=40, max_seq_length=200, max_reject_fraction=0.9)
    kw["synthetic_defects"] = ["empty_note", "duplicate_note_id"]
    result = run_prepare_data(_cfg(tmp_path, tiny_model_dir, "full", **kw))
    assert result.card["rejects_by_reason"]["summary_too_long"] > 0
    kept = sorted((r["source_row"], r["note_id"]) for rows in _read(tmp_path / "full").values() for r in rows)
    text = debug_examples(_cfg(tmp_path, tiny_model_dir, "dbg", debug=4, chunk_rows=7, **kw))
    shown = [line.split("note_id ", 1)[1].split(",", 1)[0] for line in text.splitlines() if "===== example" in line]
    assert shown == [note_id for _, note_id in kept[:4]]


def test_make_prepared_dataset_fixture(tmp_path: Path, tiny_model_dir: Path) -> None:
    out = make_prepared_dataset(tmp_path / "ds", tiny_model_dir, n_rows=24)
    manifest = require_artifact(out, stage="prepare_data", field="dataset_dir", files=schema.SPLIT_FILES.values())
    assert manifest["data_fingerprint"]
    assert sum(len(v) for v in _read(out).values()) == 24


def test_sample_fraction_keeps_the_same_rows_whatever_the_chunking(tmp_path: Path, tiny_model_dir: Path) -> None:
    from dischargesum.data.readers import row_in_sample

    src = tmp_path / "in.csv"
    write_synthetic(src, 80, profile="tiny", seed=5, defects=("empty_note",), show_progress=False, workers=1)
    kept: dict[tuple[float, int], set[str]] = {}
    for fraction, chunk_rows in [(0.3, 7), (0.3, 64)]:
        out = _cfg(
            tmp_path, tiny_model_dir, f"s{fraction}-{chunk_rows}", source=str(src), sample_fraction=fraction,
            chunk_rows=chunk_rows, seed=5,
        )  # fmt: skip
        card = run_prepare_data(out).card
        expected = [r for r in range(80) if row_in_sample(r, fraction, 5)]
        assert card["accounting"]["rows_read"] == len(expected)
        assert card["sample"] == {"fraction": fraction, "rows_skipped": 80 - len(expected)}
        assert card["accounting"]["invariant_holds"]
        rows = _read(Path(out.output_dir))
        kept[(fraction, chunk_rows)] = {r["note_id"] for split in rows.values() for r in split}
        # rejects keep their row number in the file, not in the sample
        assert {r["row"] for r in _rejects(Path(out.output_dir))} <= set(expected)
    assert 0 < len(kept[(0.3, 7)]) < 80
    assert kept[(0.3, 7)] == kept[(0.3, 64)]
    # a larger sample keeps every row of a smaller one
    assert all(row_in_sample(r, 0.6, 5) for r in range(1000) if row_in_sample(r, 0.3, 5))
    with pytest.raises(ValueError, match="sample_fraction"):
        _cfg(tmp_path, tiny_model_dir, "bad", sample_fraction=0.0)
