"""The names of every artifact one stage writes and another reads, and the one JSONL reader.

A stage's output directory always holds ``manifest.json`` (what ran, on what inputs, whether it finished) and
``run_config.yaml`` (the resolved configuration). Besides those:

- prepare_data: ``train.parquet`` / ``validation.parquet`` / ``test.parquet`` (columns in
  :mod:`dischargesum.data.schema`), ``rejects.jsonl``, ``data_card.json``.
- sft_qlora: ``final/`` (adapter + tokenizer + ``data_fingerprint.json`` + model card ``README.md``),
  ``checkpoint-N/`` while training, ``metrics.jsonl``, ``tensorboard/``.
- generate: ``stage1.jsonl`` (one record per note, input order), ``parts/`` (per-process shards while running).
- compress: ``stage2.jsonl``, ``parts/``.
- eval: ``metrics.json``, ``per_sample.csv``, ``report.md``, ``tensorboard/``.

Every module that names one of these files imports the name from here.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

MANIFEST_NAME = "manifest.json"
RESOLVED_CONFIG_NAME = "run_config.yaml"

# prepare_data
SPLITS = ("train", "validation", "test")
SPLIT_FILES = {split: f"{split}.parquet" for split in SPLITS}
REJECTS_FILE = "rejects.jsonl"
DATA_CARD_FILE = "data_card.json"

# sft_qlora
FINAL_DIR = "final"
DATA_FINGERPRINT_FILE = "data_fingerprint.json"
MODEL_CARD_FILE = "README.md"
TRAIN_METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"

# generate / compress
STAGE1_FILE = "stage1.jsonl"
STAGE2_FILE = "stage2.jsonl"
PARTS_DIR = "parts"
# which file each of our prediction-writing stages produces (eval recognises them by the manifest's stage)
OUR_OUTPUT_FILES: dict[str, str] = {"generate": STAGE1_FILE, "compress": STAGE2_FILE}

# eval
EVAL_METRICS_FILE = "metrics.json"
PER_SAMPLE_FILE = "per_sample.csv"
REPORT_FILE = "report.md"


class ArtifactError(RuntimeError):
    """An input artifact is missing, incomplete or produced by the wrong stage; the message says what to rerun.

    Defined here, beside the artifact names and the reader that raises it, so this module imports nothing of the
    package (``manifest`` imports from here, never the other way).
    """


def read_jsonl(
    path: str | Path,
    *,
    error: Callable[[str], Exception] | None = None,
    label: str | None = None,
    columns: set[str] | None = None,
) -> list[dict[str, Any]]:
    """Records of a JSONL file (one JSON object per line; blank lines skipped), in file order.

    Args:
        error: the exception type to raise on a bad line (default :class:`ArtifactError`,
            for files a stage wrote; eval passes ``UserError`` for files a user points it at).
        label: how to name the file in messages (default: its path), e.g. "`predictions` = x.jsonl".
        columns: keep only these keys of each record.

    Raises:
        the ``error`` type: a line is not valid JSON (a truncated last line means the writing stage was interrupted)
            or not a JSON object; the message names the file and the line.
    """
    if error is None:
        error = ArtifactError
    name = label or str(path)
    records = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise error(
                    f"{name}: line {number} is not valid JSON ({exc.msg}); a truncated last line means the writing "
                    "stage was interrupted — rerun it."
                ) from None
            if not isinstance(record, dict):
                raise error(f"{name}: line {number} is not a JSON object.")
            records.append(record if columns is None else {k: v for k, v in record.items() if k in columns})
    return records
