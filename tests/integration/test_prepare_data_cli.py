"""prepare_data as a user runs it: through `accelerate launch` with accelerate_configs/cpu.yaml."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from dischargesum.data import schema
from dischargesum.manifest import require_artifact
from tests.helpers import ROOT, accelerate_launch, run_script

pytestmark = pytest.mark.integration


def test_demo_recipe_through_accelerate_launch(tmp_path: Path, tiny_model_dir: Path) -> None:
    out = tmp_path / "data"
    proc = accelerate_launch(
        "prepare_data.py",
        [
            "--config",
            str(ROOT / "recipes/demo/prepare_data.yaml"),
            "--output_dir",
            str(out),
            "--tokenizer_name_or_path",
            str(tiny_model_dir),
            "--synthetic_rows",
            "80",
            "--plots",
            "false",
        ],
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = [*schema.SPLIT_FILES.values(), schema.REJECTS_FILE, schema.DATA_CARD_FILE]
    manifest = require_artifact(out, stage="prepare_data", field="dataset_dir", files=names)
    card = json.loads((out / schema.DATA_CARD_FILE).read_text())
    assert manifest["data_fingerprint"] == card["data_fingerprint"]
    assert card["accounting"]["invariant_holds"] and card["accounting"]["rows_read"] == 80
    # the recipe's injected defects: each ends in rejects.jsonl with its reason
    reasons = {json.loads(line)["reason"] for line in (out / schema.REJECTS_FILE).read_text().splitlines()}
    assert reasons == {"empty_note", "empty_target", "missing_subject_id", "duplicate_note_id"}
    rows = sum(pq.read_metadata(out / schema.SPLIT_FILES[s]).num_rows for s in schema.SPLITS)
    assert rows == card["accounting"]["rows_kept"]
    assert "Hello" not in proc.stderr  # nothing of a note is logged (notes start "Sex:"/"Name:")
    assert "Sex:" not in proc.stderr


def test_missing_column_exits_2_with_a_helpful_message(tmp_path: Path, tiny_model_dir: Path) -> None:
    src = tmp_path / "notes.csv"
    with open(src, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["note_id", "subject_id", "text", "bhc"])
        writer.writerow(["10000032-DS-21", "10000032", "Chief Complaint: cough", "Admitted with cough."])
    args = [
        "--output_dir",
        str(tmp_path / "out"),
        "--source",
        str(src),
        "--tokenizer_name_or_path",
        str(tiny_model_dir),
    ]
    proc = run_script("prepare_data.py", args, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    message = proc.stderr
    assert "['input', 'target']" in message and "'text'" in message and "'bhc'" in message
    assert "column_mapping" in message and "Traceback" not in message
    assert not (tmp_path / "out" / "manifest.json").exists()  # refused before any work
    # accelerate launch reports a failed single-process script as its own exit 1 (CalledProcessError) and
    # prints the script's status: the user still sees the message and "exit status 2".
    proc = accelerate_launch("prepare_data.py", args, timeout=300)
    assert proc.returncode != 0 and "returned non-zero exit status 2" in proc.stderr
    assert "column_mapping" in proc.stderr
