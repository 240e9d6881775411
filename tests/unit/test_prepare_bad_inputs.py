"""Bad inputs prepare_data must read correctly or refuse with exit code 2 (issue #18): odd CSV headers and line
endings, truncated .gz files, sparse JSONL keys, duplicated columns, exact row provenance, header-only inputs,
and what the data card and the output files reveal about patients."""

from __future__ import annotations

import gzip
import json
import stat
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from dischargesum.cli import UserError
from dischargesum.config import ConfigError, PrepareDataConfig
from dischargesum.data import schema
from dischargesum.data.prepare import run_prepare_data
from dischargesum.data.readers import inspect_source, iter_chunks
from dischargesum.data.validate import ValidationOptions, validate_chunk
from dischargesum.manifest import read_manifest

pytestmark = pytest.mark.unit

OPTS = ValidationOptions(normalization="clinical", utf8_errors="strict", max_note_chars=100_000, use_input_split=False)
HEADER = "note_id,subject_id,input,target"


def _row(i: int, note: str = "Chest pain. Aspirin 81 mg daily.") -> str:
    return f'{i}-DS-1,{i},"{note}","Admitted for chest pain, discharged home."'


def _read(tmp_path: Path, source: Path, **kw) -> tuple[dict[int, str], dict[int, str], int]:
    """(kept row -> note_id, rejected row -> reason, rows read) of ``source``, chunked by 2 rows."""
    cfg = PrepareDataConfig(output_dir=str(tmp_path / "out"), source=str(source), chunk_rows=2, **kw)
    kept, rejected, read = {}, {}, 0
    for raw in iter_chunks(inspect_source(cfg), cfg):
        chunk = validate_chunk(raw, OPTS)
        kept.update(zip(chunk.rows, chunk.note_id))
        rejected.update({r["row"]: r["reason"] for r in chunk.rejects})
        read += chunk.rows_read
    return kept, rejected, read


def test_csv_header_with_spaces_after_commas_is_read(tmp_path: Path) -> None:
    src = tmp_path / "spaces.csv"
    src.write_text("note_id, subject_id, input, target\n" + "\n".join(_row(i) for i in range(3)) + "\n")
    kept, rejected, read = _read(tmp_path, src)
    assert (read, len(kept), rejected) == (3, 3, {})


def test_csv_with_cr_only_line_endings_is_read(tmp_path: Path) -> None:
    src = tmp_path / "cr.csv"
    src.write_bytes(("\r".join([HEADER, *(_row(i) for i in range(3))]) + "\r").encode())
    kept, rejected, read = _read(tmp_path, src)
    assert (read, len(kept), rejected) == (3, 3, {})


def test_source_row_after_a_malformed_csv_row_is_exact(tmp_path: Path) -> None:
    # a quoted newline before the bad row: line numbers and record numbers differ, row numbers must not drift
    lines = [HEADER, _row(0, "Line one.\nLine two."), "1-DS-1,1,only three fields", _row(2), _row(3), _row(4)]
    src = tmp_path / "bad.csv"
    src.write_text("\n".join(lines) + "\n")
    kept, rejected, read = _read(tmp_path, src)
    assert read == 5
    assert rejected == {1: "malformed_row"}
    assert kept == {0: "0-DS-1", 2: "2-DS-1", 3: "3-DS-1", 4: "4-DS-1"}


def test_truncated_csv_gz_is_refused_naming_file_and_fix(tmp_path: Path) -> None:
    src = tmp_path / "cut.csv.gz"
    body = gzip.compress(("\n".join([HEADER, *(_row(i) for i in range(400))]) + "\n").encode())
    src.write_bytes(body[: len(body) * 2 // 3])
    with pytest.raises(ConfigError, match=r"cut\.csv\.gz.*data rows.*gzip -t"):
        _read(tmp_path, src)


def test_truncated_jsonl_gz_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "cut.jsonl.gz"
    records = [{"note_id": f"{i}-DS-1", "input": "Chest pain. " * 20, "target": "Admitted."} for i in range(400)]
    body = gzip.compress("".join(json.dumps(r) + "\n" for r in records).encode())
    src.write_bytes(body[: len(body) // 2])
    with pytest.raises(ConfigError, match=r"cut\.jsonl\.gz.*fetch it again"):
        _read(tmp_path, src)


def test_jsonl_columns_come_from_all_records_not_the_first(tmp_path: Path) -> None:
    src = tmp_path / "sparse.jsonl"
    records = [{"note_id": "n0", "input": "Chest pain.", "target": "Admitted."}]  # first record: no subject_id
    records += [{"note_id": f"n{i}", "subject_id": str(i), "input": "Chest pain.", "target": "Admitted."}
                for i in range(1, 20)]  # fmt: skip
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    kept, rejected, read = _read(tmp_path, src)
    # n0 has no subject_id and a non-MIMIC note_id: the only reject
    assert read == 20 and rejected == {0: "missing_subject_id"} and len(kept) == 19


def test_duplicated_used_column_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "dup.csv"
    src.write_text("note_id,subject_id,input,target,input\n1-DS-1,1,Chest pain.,Admitted.,Other text.\n")
    with pytest.raises(ConfigError, match=r"more than one column named \['input'\]"):
        _read(tmp_path, src)


def _cfg(tmp_path: Path, tokenizer: Path, source: Path, **kw) -> PrepareDataConfig:
    return PrepareDataConfig(
        output_dir=str(tmp_path / "out"),
        source=str(source),
        tokenizer_name_or_path=str(tokenizer),
        num_workers=0,
        plots=False,
        **kw,
    )


def test_header_only_input_is_refused_and_manifest_failed(tmp_path: Path, tiny_model_dir: Path) -> None:
    src = tmp_path / "empty.csv"
    src.write_text(HEADER + "\n")
    with pytest.raises(UserError, match="no row to train on"):
        run_prepare_data(_cfg(tmp_path, tiny_model_dir, src))
    assert (read_manifest(tmp_path / "out") or {}).get("status") == "failed"


def test_unreadable_source_marks_the_manifest_failed(tmp_path: Path, tiny_model_dir: Path) -> None:
    src = tmp_path / "cut.csv.gz"
    body = gzip.compress(("\n".join([HEADER, *(_row(i) for i in range(400))]) + "\n").encode())
    src.write_bytes(body[: len(body) * 2 // 3])
    with pytest.raises(ConfigError):
        run_prepare_data(_cfg(tmp_path, tiny_model_dir, src))
    manifest = read_manifest(tmp_path / "out") or {}
    assert manifest.get("status") == "failed" and "cut.csv.gz" in manifest.get("failure", "")


def test_card_has_no_prefix_text_and_patient_files_are_private(tmp_path: Path, tiny_model_dir: Path) -> None:
    src = tmp_path / "phi.csv"
    prefix = "Summarize the discharge note for patient Jane Roe (MRN 5551234, DOB 1950-01-02):"
    rows = [f'{i}-DS-1,{i},"{prefix}\nChest pain. Aspirin 81 mg.","Admitted, discharged home."' for i in range(8)]
    src.write_text("\n".join([HEADER, *rows]) + "\n")
    out = run_prepare_data(_cfg(tmp_path, tiny_model_dir, src, validation_fraction=0.0, test_fraction=0.0))
    card_text = (tmp_path / "out" / schema.DATA_CARD_FILE).read_text()
    for secret in ("Jane", "5551234", "1950-01-02", "Summarize the discharge"):
        assert secret not in card_text
    assert out.card["instruction_prefix"]["rows_stripped"] == 8
    assert [e["rows"] for e in out.card["instruction_prefix"]["most_common"]] == [8]
    assert pq.read_table(tmp_path / "out" / schema.SPLIT_FILES["train"]).num_rows == 8
    for name in (*schema.SPLIT_FILES.values(), schema.REJECTS_FILE):
        assert stat.S_IMODE((tmp_path / "out" / name).stat().st_mode) == 0o600, name
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o700


def test_truncated_parquet_is_refused(tmp_path: Path) -> None:
    import pyarrow as pa

    ids = [f"{i}-DS-1" for i in range(200)]
    table = pa.table({"note_id": ids, "input": ["Cough."] * 200, "target": ["Ok."] * 200})
    full = tmp_path / "full.parquet"
    pq.write_table(table, full, row_group_size=50)
    src = tmp_path / "cut.parquet"
    src.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(ConfigError, match=r"cut\.parquet: it is not a readable Parquet file.*fetch it again"):
        _read(tmp_path, src)
