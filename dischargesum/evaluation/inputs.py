"""Eval inputs: read the predictions and references, join them on note_id, decide the mode, validate.

Predictions are our generate / compress JSONL (checked against their run's manifest) or any CSV / TSV / JSONL /
Parquet with a column mapping; references come from prepare_data's split (``dataset_dir``), a ``references`` file,
or columns of the predictions file. Everything is validated here, before any model loads; rows that cannot be
scored are skipped with a reason.
"""

from __future__ import annotations

import difflib
import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dischargesum.artifacts import OUR_OUTPUT_FILES, read_jsonl
from dischargesum.cli import UserError
from dischargesum.config import EvalConfig
from dischargesum.data.schema import SPLIT_FILES
from dischargesum.logging_utils import get_logger
from dischargesum.manifest import RESOLVED_CONFIG_NAME, fingerprint_file, read_manifest, require_artifact

logger = get_logger(__name__)

# Field names of our own JSONL outputs, per mode. generate writes one line per note with the summary; compress
# writes the compressed summary next to the stage-1 summary it came from. A user's column_mapping overrides these.
DEFAULT_PREDICTION_COLUMNS: dict[str, dict[str, str]] = {
    "stage1": {"note_id": "note_id", "prediction": "summary"},
    "stage2": {"note_id": "note_id", "prediction": "summary", "reference": "stage1_summary"},
}
# prepare_data's column names (dischargesum.data.schema) for the dataset split / a references file.
DEFAULT_REFERENCE_COLUMNS: dict[str, str] = {"note_id": "note_id", "reference": "summary", "source": "note"}
ROLE_LABELS: dict[str, dict[str, str]] = {
    "stage1": {"prediction": "generated summary", "reference": "reference BHC", "source": "source note"},
    "stage2": {"prediction": "compressed summary", "reference": "stage-1 summary", "source": "source note"},
}


@dataclass
class EvalSample:
    """One prediction to score, with the texts it is compared to (None: that role is not available)."""

    note_id: str
    prediction: str
    reference: str | None
    source: str | None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalInputs:
    """Everything ``evaluate`` needs, validated: samples in prediction-file order, skips with reasons."""

    mode: str
    samples: list[EvalSample]
    skipped: list[tuple[str, str]]  # (note_id or "row <n>", reason)
    prediction_rows: int
    references_without_prediction: int | None
    columns: dict[str, str]  # role -> "predictions:<col>" / "dataset:<col>" / "references:<col>"
    inputs: dict[str, Any]  # for the manifest
    unpredicted_reason: str | None = None  # why references lack a prediction, when a run's `limit` explains it

    @property
    def has_reference(self) -> bool:
        return "reference" in self.columns

    @property
    def has_source(self) -> bool:
        return "source" in self.columns

    def skip_counts(self) -> dict[str, int]:
        return dict(Counter(reason for _, reason in self.skipped))


def read_table(path: str | Path, *, field_name: str, columns: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """Rows of a CSV / TSV / JSONL / Parquet file as dicts (CSV/TSV cells are strings; nothing is NA-converted).

    Raises:
        UserError: the file is missing, unreadable, not valid JSONL / CSV / Parquet, or a JSONL line is not an
            object; the message names ``field_name``, the file and (for JSONL) the line.
    """
    p = Path(path)
    if not p.is_file():
        raise UserError(f"`{field_name}` = {path}: no such file. Fix the path (or run the stage that writes it).")
    suffix = p.suffix.lower()
    wanted = set(columns) if columns is not None else None
    try:
        if suffix == ".jsonl":
            return read_jsonl(p, error=UserError, label=f"`{field_name}` = {path}", columns=wanted)
        import pandas as pd

        if suffix in (".csv", ".tsv"):
            frame = pd.read_csv(p, sep="\t" if suffix == ".tsv" else ",", dtype=str, keep_default_na=False)
        elif suffix == ".parquet":
            frame = pd.read_parquet(p)
        else:
            raise UserError(
                f"`{field_name}` = {path}: unsupported extension {suffix!r}; use .jsonl, .csv, .tsv or .parquet."
            )
    except UserError:
        raise
    except UnicodeDecodeError as exc:
        raise UserError(f"`{field_name}` = {path} is not valid UTF-8 ({exc.reason} at byte {exc.start}).") from None
    except Exception as exc:  # pandas/pyarrow raise many types for a malformed file
        raise UserError(f"`{field_name}` = {path} could not be read as {suffix[1:]}: {exc}") from None
    if wanted is not None:
        frame = frame[[c for c in frame.columns if c in wanted]]
    return frame.to_dict("records")


def _table_columns(rows: list[dict[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for row in rows[:1000]:
        seen.update(dict.fromkeys(row))
    return list(seen)


def _text_value(value: Any) -> str | None:
    """A text cell as a string: None/NaN -> "" (missing), a non-string -> None (a bad row)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, str):
        return value
    return None


def _id_value(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


# `column_mapping.note_id: __row__` (or `reference_column_mapping.note_id: __row__`): a file without an id column
# is keyed by its 1-based data row number, so a peer's CSV can be scored without editing it.
ROW_NUMBER_ID = "__row__"
# An id longer than this (characters or words), or one with a line break, is text: a mapping like `note_id: input`
# would otherwise put whole notes into per_sample.csv's id column (and into the report).
MAX_ID_CHARS = 128
MAX_ID_WORDS = 8
# Column-name evidence for `mode: auto` on a foreign file: the prediction is a compressed (stage-2) summary, or the
# text it is compared with is a model's (stage-1) output rather than a reference BHC.
_STAGE2_PREDICTION_RE = re.compile(r"compress|stage[ _-]?2|short", re.IGNORECASE)
_STAGE1_OUTPUT_RE = re.compile(r"stage[ _-]?1|generat|predict|model|output", re.IGNORECASE)
_REFERENCE_NAME_RE = re.compile(r"ref|target|gold|bhc|truth|label", re.IGNORECASE)


def resolve_mode(cfg: EvalConfig, columns: Sequence[str] = ()) -> tuple[str, dict[str, Any] | None, str]:
    """The mode to score in, the manifest of the stage that wrote ``predictions`` (None for a foreign file) and why.

    A predictions file that a generate / compress run writes (its output file name, or a file its manifest
    records) must come from a completed run. ``mode: auto`` is stage2 for compress's output, stage1 for generate's;
    for a foreign file it is decided from its ``columns`` as mapped: stage2 when the file has compress's
    ``stage1_summary`` column (and ``column_mapping.reference`` is unset), when the prediction column names a
    compressed / stage-2 text, or when the column it is compared with names a model output rather than a reference
    (``stage1``, ``generated``, ``prediction``, ``output``); then by the file name (``stage2`` / ``compress``);
    otherwise stage1.

    Raises:
        ArtifactError: the predictions come from a generate / compress run that did not complete.
    """
    path = Path(cfg.predictions)
    manifest = read_manifest(path.parent)
    stage = manifest.get("stage") if manifest else None
    recorded = manifest.get("outputs", {}) if manifest else {}
    ours = stage in OUR_OUTPUT_FILES and (
        path.name == OUR_OUTPUT_FILES[stage] or (isinstance(recorded, dict) and path.name in recorded)
    )
    if ours:
        manifest = require_artifact(path.parent, stage=str(stage), field="predictions")
    else:
        manifest, stage = None, None
    if cfg.mode != "auto":
        return cfg.mode, manifest, "set by `mode`"
    if stage is not None:
        return ("stage2" if stage == "compress" else "stage1"), manifest, f"written by a {stage} run (its manifest)"
    mapping = cfg.column_mapping
    stage1_column = DEFAULT_PREDICTION_COLUMNS["stage2"]["reference"]
    if "reference" not in mapping and stage1_column in columns:
        return "stage2", None, f"the file has compress's `{stage1_column}` column (compared with it as the reference)"
    prediction = mapping.get("prediction", "")
    if _STAGE2_PREDICTION_RE.search(prediction):
        return "stage2", None, f"the prediction column `{prediction}` names a compressed / stage-2 summary"
    reference = mapping.get("reference", "")
    if _STAGE1_OUTPUT_RE.search(reference) and not _REFERENCE_NAME_RE.search(reference):
        return "stage2", None, f"the reference column `{reference}` names a model's summary, not a reference BHC"
    if re.search(r"stage[ _-]?2|compress", path.name, re.IGNORECASE):
        return "stage2", None, f"the file name `{path.name}` says stage 2"
    return "stage1", None, "no mapped column or the file name names a stage-2 (compressed) summary"


def _require_column(rows: list[dict[str, Any]], column: str, *, role: str, key: str, path: str) -> None:
    """Raise UserError when ``column`` is not in ``rows``, suggesting the closest existing column.

    Raises:
        UserError: the column is missing; the message lists the columns and names a case-insensitive or close match.
    """
    if column == ROW_NUMBER_ID or not rows:
        return
    columns = _table_columns(rows)
    if column in columns:
        return
    available = ", ".join(columns) or "(none)"
    same_case = [c for c in columns if c.lower() == column.lower()]
    close = same_case or difflib.get_close_matches(column, columns, n=1, cutoff=0.6)
    suggestion = f" Did you mean {close[0]!r}?" if close else ""
    if role == "note_id" and not close:
        mapping_key = key.split(".")[0]
        suggestion = f" A file without an id column can use the row number: `{mapping_key}.note_id: {ROW_NUMBER_ID}`."
    raise UserError(
        f"`{key}`: column {column!r} (for {role}) is not in {path}; its columns are: {available}.{suggestion} "
        f"Set `{key}` to the right column."
    )


def _row_ids(rows: list[dict[str, Any]], column: str, *, key: str, path: str) -> list[str]:
    """The id of every row: the ``column`` cell, or the 1-based row number for :data:`ROW_NUMBER_ID`.

    Raises:
        UserError: the id column holds text (a line break, more than :data:`MAX_ID_CHARS` characters or
            :data:`MAX_ID_WORDS` words).
    """
    if column == ROW_NUMBER_ID:
        return [str(number) for number in range(1, len(rows) + 1)]
    ids = [_id_value(row.get(column)) for row in rows]
    for number, note_id in enumerate(ids, 1):
        words = len(note_id.split())
        if "\n" in note_id or len(note_id) > MAX_ID_CHARS or words >= MAX_ID_WORDS:
            shape = "has line breaks" if "\n" in note_id else f"is {len(note_id)} characters / {words} words long"
            raise UserError(
                f"`{key}` = {column!r}: the value in row {number} of {path} {shape} — that column holds text, not "
                f"an id. Map `{key}` to an id column, or use the row number: `{key}: {ROW_NUMBER_ID}`."
            )
    return ids


def load_eval_inputs(cfg: EvalConfig) -> EvalInputs:
    """Read predictions and references, join them on note_id and validate everything before any model loads.

    Skips (recorded, not fatal): a row without note_id (``missing_note_id``), a repeated note_id
    (``duplicate_note_id``, the first is kept), a note_id absent from the references
    (``note_id_not_in_references``), a non-string text (``non_string_<role>``), an empty reference or source
    (``empty_reference`` / ``empty_source``) and — with ``empty_prediction: skip`` — an empty prediction.

    Raises:
        UserError: missing file or column, nothing to compare against, no rows, duplicate note_ids in the
            references, nothing left to score, or more than ``max_skip_fraction`` of the predictions skipped.
        ArtifactError: ``dataset_dir`` is not a completed prepare_data output with the split, or the predictions
            come from an incomplete generate / compress run.
    """
    rows = read_table(cfg.predictions, field_name="predictions")
    if not rows:
        raise UserError(f"`predictions` = {cfg.predictions} has no rows: nothing to score.")
    mode, manifest, why = resolve_mode(cfg, _table_columns(rows))
    labels = ROLE_LABELS[mode]
    logger.info("mode %s (%s vs %s): %s", mode, labels["prediction"], labels["reference"], why)
    inputs: dict[str, Any] = {
        "predictions": fingerprint_file(cfg.predictions) if Path(cfg.predictions).is_file() else None,
        "mode_reason": why,
    }
    if manifest is not None:
        inputs["predictions_manifest"] = {k: manifest.get(k) for k in ("stage", "config_hash", "finished_at")}

    pred_columns = {**DEFAULT_PREDICTION_COLUMNS[mode], **cfg.column_mapping}
    for role, column in pred_columns.items():
        key = f"column_mapping.{role}" if role in cfg.column_mapping else "column_mapping"
        _require_column(rows, column, role=role, key=key, path=cfg.predictions)

    ref_rows: list[dict[str, Any]] | None = None
    ref_label = ""
    ref_columns: dict[str, str] = {}
    if cfg.dataset_dir:
        split_file = SPLIT_FILES[cfg.split]
        ds_manifest = require_artifact(cfg.dataset_dir, stage="prepare_data", field="dataset_dir", files=[split_file])
        ref_path = str(Path(cfg.dataset_dir) / split_file)
        ref_label = "dataset"
        inputs["dataset_dir"] = {
            "path": cfg.dataset_dir,
            "split": cfg.split,
            "data_fingerprint": ds_manifest.get("data_fingerprint"),
        }
    elif cfg.references:
        ref_path = cfg.references
        ref_label = "references"
        inputs["references"] = fingerprint_file(ref_path) if Path(ref_path).is_file() else None
    if cfg.dataset_dir or cfg.references:
        ref_rows = read_table(ref_path, field_name="dataset_dir" if cfg.dataset_dir else "references")
        available = _table_columns(ref_rows)
        mapping = {**DEFAULT_REFERENCE_COLUMNS, **cfg.reference_column_mapping}
        for role, column in mapping.items():
            if role != "note_id" and role in pred_columns:
                continue  # the predictions file supplies it
            if column in available or (role == "note_id" and column == ROW_NUMBER_ID):
                ref_columns[role] = column
            elif role in cfg.reference_column_mapping or role == "note_id" or cfg.dataset_dir:
                _require_column(ref_rows, column, role=role, key=f"reference_column_mapping.{role}", path=ref_path)
        if "note_id" not in ref_columns:
            raise UserError(f"`reference_column_mapping.note_id`: {ref_path} has no rows to join on.")

    columns = {role: f"predictions:{col}" for role, col in pred_columns.items()}
    columns.update({role: f"{ref_label}:{col}" for role, col in ref_columns.items() if role != "note_id"})
    if "reference" not in columns and "source" not in columns:
        raise UserError(
            "nothing to compare the predictions with: set `dataset_dir` (prepare_data's output) or `references`, "
            "or map `column_mapping.reference` / `column_mapping.source` to columns of the predictions file."
        )

    ref_index: dict[str, dict[str, Any]] = {}
    if ref_rows is not None:
        ref_ids = _row_ids(ref_rows, ref_columns["note_id"], key="reference_column_mapping.note_id", path=ref_path)
        for note_id, row in zip(ref_ids, ref_rows):
            if note_id in ref_index:
                raise UserError(
                    f"`{'dataset_dir' if cfg.dataset_dir else 'references'}`: note_id {note_id!r} appears twice in "
                    f"{ref_path}; references must be unique per note_id."
                )
            ref_index[note_id] = row

    samples: list[EvalSample] = []
    skipped: list[tuple[str, str]] = []
    seen: set[str] = set()
    pred_ids = _row_ids(rows, pred_columns["note_id"], key="column_mapping.note_id", path=cfg.predictions)
    for number, (row, note_id) in enumerate(zip(rows, pred_ids), 1):
        if not note_id:
            skipped.append((f"row {number}", "missing_note_id"))
            continue
        if note_id in seen:
            skipped.append((note_id, "duplicate_note_id"))
            continue
        seen.add(note_id)
        texts: dict[str, str | None] = {}
        reason = None
        for role in ("prediction", "reference", "source"):
            if role in pred_columns:
                raw = row.get(pred_columns[role])
            elif role in ref_columns:
                if note_id not in ref_index:
                    reason = "note_id_not_in_references"
                    break
                raw = ref_index[note_id].get(ref_columns[role])
            else:
                texts[role] = None
                continue
            value = _text_value(raw)
            if value is None:
                reason = f"non_string_{role}"
                break
            if not value.strip() and (role != "prediction" or cfg.empty_prediction == "skip"):
                reason = f"empty_{role}"
                break
            texts[role] = value
        if reason is None and ref_rows is not None and note_id not in ref_index:
            reason = "note_id_not_in_references"
        if reason is not None:
            skipped.append((note_id, reason))
            continue
        extra: dict[str, Any] = {}
        if note_id in ref_index and "note_shortened" in ref_index[note_id]:
            extra["note_shortened"] = bool(ref_index[note_id]["note_shortened"])
        if mode == "stage2" and isinstance(row.get("fallback"), bool):
            extra["fallback"] = row["fallback"]  # compress kept the stage-1 summary (no accepted compression)
        samples.append(EvalSample(note_id, texts["prediction"] or "", texts["reference"], texts["source"], extra))

    without = len(set(ref_index) - seen) if ref_rows is not None else None
    result = EvalInputs(mode, samples, skipped, len(rows), without, columns, inputs)
    fraction = len(skipped) / len(rows)
    if not samples or fraction > cfg.max_skip_fraction:
        examples: dict[str, list[str]] = {}
        for note_id, reason in skipped:
            examples.setdefault(reason, []).append(note_id)
        detail = "; ".join(f"{reason}: {len(ids)} (e.g. {', '.join(ids[:3])})" for reason, ids in examples.items())
        hint = ""
        if "note_id_not_in_references" in examples:
            hint = " note_ids do not match the references: check `dataset_dir` / `split` / `references`."
        raise UserError(
            f"{len(skipped)} of {len(rows)} predictions ({fraction:.1%}) were skipped, more than "
            f"`max_skip_fraction` = {cfg.max_skip_fraction:g} — {detail}.{hint}"
        )
    if skipped:
        logger.warning("skipped %d of %d predictions: %s", len(skipped), len(rows), result.skip_counts())
    if without:
        limited = _limited_run(Path(cfg.predictions).parent) if manifest is not None else None
        if limited is not None:
            # By design (the demo's generate recipe has `limit: 8`): not worth a warning, worth a sentence.
            result.unpredicted_reason = "the {} run limited itself to {} notes (`limit` in {})".format(*limited)
            logger.info("%d reference notes have no prediction: %s", without, result.unpredicted_reason)
        else:
            logger.warning("%d reference notes have no prediction (generation incomplete or a subset?)", without)
    return result


def _limited_run(run_dir: Path, depth: int = 2) -> tuple[str, int, str] | None:
    """``(stage, limit, config file)`` when the generate / compress run that wrote ``run_dir`` (or, for compress,
    the run that wrote its input) was given a positive ``limit``; None otherwise."""
    import yaml

    config_path = run_dir / RESOLVED_CONFIG_NAME
    try:
        resolved = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    if not isinstance(resolved, dict):
        return None
    limit = resolved.get("limit")
    if isinstance(limit, int) and limit > 0:
        manifest = read_manifest(run_dir) or {}
        return str(manifest.get("stage", "generate")), limit, str(config_path)
    upstream = resolved.get("input")
    if depth > 1 and isinstance(upstream, str) and upstream:
        return _limited_run(Path(upstream).parent, depth - 1)
    return None
