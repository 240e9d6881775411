"""Prepared datasets for the tests of later stages (sft_qlora, generate, eval).

``make_prepared_dataset`` returns a completed prepare_data output directory — the files of
:mod:`dischargesum.data.schema` plus a completed manifest — built from synthetic rows. Call it from a
module-scoped fixture::

    @pytest.fixture(scope="module")
    def dataset_dir(tmp_path_factory, tiny_model_dir):
        return make_prepared_dataset(tmp_path_factory.mktemp("data"), tiny_model_dir)
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from dischargesum.config import PrepareDataConfig
from dischargesum.data import schema
from dischargesum.data.budget import count_tokens, load_tokenizer
from dischargesum.data.formatting import DEFAULT_INSTRUCTION
from dischargesum.data.normalize import normalize_clinical_note, normalize_entities_json, normalize_whitespace
from dischargesum.data.split import assign_split
from dischargesum.data.synthetic import generate_rows
from dischargesum.manifest import canonical_hash, fingerprint_file, finish_run, start_run


def make_prepared_dataset(
    out_dir: Path,
    tokenizer_dir: Path,
    *,
    n_rows: int = 64,
    profile: str = "tiny",
    seed: int = 0,
    max_seq_length: int = 512,
) -> Path:
    """Write a completed prepare_data output directory for ``n_rows`` synthetic Kaggle-schema rows; return it."""
    out_dir = Path(out_dir)
    cfg = PrepareDataConfig(
        output_dir=str(out_dir),
        seed=seed,
        source="synthetic",
        synthetic_rows=n_rows,
        synthetic_profile=profile,  # type: ignore[arg-type]
        tokenizer_name_or_path=str(tokenizer_dir),
        max_seq_length=max_seq_length,
        validation_fraction=0.2,
        test_fraction=0.2,
    )
    start_run(out_dir, cfg)
    tokenizer = load_tokenizer(str(tokenizer_dir))
    rows = list(generate_rows(n_rows, profile=profile, schema="kaggle", seed=seed))
    notes = [normalize_clinical_note(r["input"])[0] for r in rows]
    summaries = [normalize_whitespace(r["target"]) for r in rows]
    prompt, completion, total = count_tokens(tokenizer, notes, summaries, DEFAULT_INSTRUCTION)
    if int(total.max()) > max_seq_length:
        raise ValueError(f"fixture rows exceed max_seq_length={max_seq_length} (longest {int(total.max())})")
    columns: dict[str, dict[str, list]] = {split: {c: [] for c in schema.PREPARED_COLUMNS} for split in schema.SPLITS}
    for i, row in enumerate(rows):
        split = assign_split(str(row["subject_id"]), seed=seed, validation_fraction=0.2, test_fraction=0.2)
        values = {
            "note_id": row["note_id"],
            "subject_id": str(row["subject_id"]),
            "source_row": i,
            "note": notes[i],
            "summary": summaries[i],
            "note_chars_original": len(notes[i]),
            "note_shortened": False,
            "prompt_tokens": int(prompt[i]),
            "completion_tokens": int(completion[i]),
            "gt_entities": normalize_entities_json(row.get("gt_entities")),
        }
        for column, value in values.items():
            columns[split][column].append(value)
    arrow_schema = pa.schema(
        [
            ("note_id", pa.string()),
            ("subject_id", pa.string()),
            ("source_row", pa.int64()),
            ("note", pa.string()),
            ("summary", pa.string()),
            ("note_chars_original", pa.int64()),
            ("note_shortened", pa.bool_()),
            ("prompt_tokens", pa.int64()),
            ("completion_tokens", pa.int64()),
            ("gt_entities", pa.string()),
        ]
    )
    outputs = {}
    for split in schema.SPLITS:
        path = out_dir / schema.SPLIT_FILES[split]
        pq.write_table(pa.table(columns[split], schema=arrow_schema), path)
        outputs[path.name] = fingerprint_file(path, out_dir)
    (out_dir / schema.REJECTS_FILE).write_text("", encoding="utf-8")
    card = {
        "instruction": DEFAULT_INSTRUCTION,
        "tokenizer_name_or_path": str(tokenizer_dir),
        "max_seq_length": max_seq_length,
        "normalization": "clinical",
        "rows_read": n_rows,
        "splits": {split: {"rows": len(columns[split]["note_id"])} for split in schema.SPLITS},
    }
    (out_dir / schema.DATA_CARD_FILE).write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    for name in (schema.REJECTS_FILE, schema.DATA_CARD_FILE):
        outputs[name] = fingerprint_file(out_dir / name, out_dir)
    fingerprint = canonical_hash([outputs[schema.SPLIT_FILES[s]]["sha256"] for s in schema.SPLITS])
    finish_run(out_dir, outputs, data_fingerprint=fingerprint)
    return out_dir
