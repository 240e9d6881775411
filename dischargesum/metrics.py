"""Eval metrics: BERTScore, ROUGE, clinical entity fidelity, numeric fidelity, compression statistics.

What is compared with what (``mode``):

- ``stage1``: the generated summary (*output*) against the reference BHC (*reference*) and the note it was
  generated from (*source*).
- ``stage2``: the compressed summary (*output*) against its stage-1 summary (*reference*) and the note (*source*).

Definitions (every number in ``metrics.json`` is one of these; per-sample values are in ``per_sample.csv``):

BERTScore (output vs reference)
    bert_score's greedy cosine matching (``bert_score.utils.greedy_cos_idf``, no idf weighting, no baseline
    rescaling) over the hidden states of layer ``bertscore_num_layers`` of ``bertscore_model`` (loaded as
    ``bert_score.utils.get_model`` loads it, dropping the layers above, but with ``trust_remote_code=False`` and
    safetensors weights: see :func:`load_bertscore_encoder`). Encoders see at most a window of tokens
    (512 for BERT, including [CLS]/[SEP]); bert_score itself truncates silently to the tokenizer's
    ``model_max_length`` — and Bio_ClinicalBERT's tokenizer declares none, so bert_score feeds it over-long inputs.
    Here the window is ``min(tokenizer.model_max_length, max_position_embeddings)`` and longer texts are handled by
    ``bertscore_long_text``:

    - ``chunk`` (default): the text's tokens are cut into windows of ``W`` content tokens overlapping by
      ``bertscore_chunk_overlap``; every token takes its embedding from the window where it sits farthest from an
      edge (the overlap is split in half), the first window's [CLS] and the last window's [SEP] frame the text,
      and greedy matching runs over *all* tokens of both texts — so precision and recall cover the whole text, and
      a text within one window scores exactly as bert_score scores it.
    - ``truncate``: only the first window is embedded; per sample, ``bertscore_truncated_tokens`` records how many
      tokens (output + reference) were dropped, and metrics.json counts the samples.

    An empty output scores 0 (bert_score's convention). Tokenisation uses the encoder's (fast) tokenizer.

ROUGE-1/2/L/Lsum (output vs reference)
    rouge_score's ``RougeScorer`` with a tokenizer chosen by ``rouge_tokenizer``: ``clinical`` (default) keeps case
    and keeps decimals, ratios, dates and times as single tokens (``1.4``, ``132/78``, ``3/14``, ``14:30``); a
    number glued to a unit is split from it (``40mg`` -> ``40``, ``mg``, so it equals ``40 mg``); words are
    letter-initial alphanumeric runs (``SpO2``, ``q6h``, ``T2DM`` stay whole); ``%`` is a token; other punctuation
    and MIMIC's ``___`` blanks are dropped; no stemming. ``default`` is rouge_score's own tokenizer (lowercase,
    every non-alphanumeric character becomes a space, so ``1.4`` -> ``1``, ``4``; optional Porter stemming), for
    comparison with published numbers. ROUGE-Lsum treats each line of a text as one summary unit (rouge_score's
    newline convention); no sentence splitter runs (NLTK's punkt data is not available offline).

Entities (``dischargesum.evaluation.entities``, the one extractor compression also uses)
    ``compare_entities(output, X)`` with set semantics on normalised keys, for X = reference (``vs_reference``) and
    X = source (``vs_source``); plus ``reference_vs_source`` — the reference compared with the source, a baseline
    for how many entities a *human* summary "adds" (extractor noise, or facts the shortened note no longer holds).
    Recall = retained / X's keys; precision = supported / output keys; F1 their harmonic mean; undefined values are
    None and are left out of means. *micro* sums the counts over samples then divides; *macro* averages the
    per-sample values.

Hallucinated entities
    Output entities not supported by the source (``vs_source`` extra). Rate = extra / output keys; micro and macro
    as above; ``samples_with_any`` counts outputs with at least one.

Numeric fidelity
    ``extract_numbers`` of output and source as sets; unsupported = output numbers absent from the source;
    fidelity = 1 - unsupported / output numbers (None for an output without numbers). Numeric recall vs the
    reference = reference numbers present in the output / reference numbers.

Compression
    Per sample, ratio = output length / reference length (and / source length), in characters and in tokens
    (``tokenizer_name_or_path``, else the BERTScore encoder's tokenizer, else whitespace words — metrics.json names
    the counter). Reported as mean / median / sample std (n - 1) of the per-sample ratios *and* the ratio of totals
    (sum of output lengths / sum of the other lengths): one short note with a long summary moves the mean of ratios
    a lot and the ratio of totals barely (the seed's mean of ratios was 1.71 while its ratio of totals was 0.62).

Length buckets
    Every aggregate is repeated per bucket of the source length in characters (of the reference when there is no
    source), with ``length_buckets`` as upper bounds: ``[1500, 3000]`` gives ``<1500``, ``1500-3000`` (lower bound
    inclusive, upper exclusive) and ``>=3000``.
"""

from __future__ import annotations

import difflib
import itertools
import math
import multiprocessing
import os
import re
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dischargesum.artifacts import OUR_OUTPUT_FILES, read_jsonl
from dischargesum.cli import UserError
from dischargesum.config import ConfigError, EvalConfig
from dischargesum.data.schema import SPLIT_FILES
from dischargesum.logging_utils import get_logger, show_progress
from dischargesum.manifest import RESOLVED_CONFIG_NAME, fingerprint_file, read_manifest, require_artifact

if TYPE_CHECKING:
    from dischargesum.evaluation.entities import EntityComparison

logger = get_logger(__name__)

ROLES = ("note_id", "prediction", "reference", "source")
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")

# Field names of our own JSONL outputs, per mode. generate writes one line per note with the summary; compress
# writes the compressed summary next to the stage-1 summary it came from. A user's column_mapping overrides these.
DEFAULT_PREDICTION_COLUMNS: dict[str, dict[str, str]] = {
    "stage1": {"note_id": "note_id", "prediction": "summary"},
    "stage2": {"note_id": "note_id", "prediction": "summary", "reference": "stage1_summary"},
}
# The files generate and compress write (dischargesum.inference.STAGE1_FILE and compress's output; a unit test
# keeps these equal without importing torch-heavy modules here).
# prepare_data's column names (dischargesum.data.schema) for the dataset split / a references file.
DEFAULT_REFERENCE_COLUMNS: dict[str, str] = {"note_id": "note_id", "reference": "summary", "source": "note"}
ROLE_LABELS: dict[str, dict[str, str]] = {
    "stage1": {"prediction": "generated summary", "reference": "reference BHC", "source": "source note"},
    "stage2": {"prediction": "compressed summary", "reference": "stage-1 summary", "source": "source note"},
}


# ================================================================================================================
# Inputs
# ================================================================================================================


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


def _has_digit(text: str) -> bool:
    return any(ch.isdigit() for ch in text)


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


# ================================================================================================================
# ROUGE
# ================================================================================================================

_CLINICAL_TOKEN_RE = re.compile(r"\d+(?:[.,/:]\d+)*|[^\W\d_][^\W_]*|%")


class ClinicalRougeTokenizer:
    """rouge_score tokenizer that keeps case, decimals, ratios, dates and times (see the module docstring)."""

    def tokenize(self, text: str) -> list[str]:
        return _CLINICAL_TOKEN_RE.findall(text)


def make_rouge_scorer(tokenizer: str = "clinical", use_stemmer: bool = False) -> Any:
    """A ``rouge_score.rouge_scorer.RougeScorer`` for ROUGE-1/2/L/Lsum with the chosen tokenizer.

    Raises:
        ValueError: unknown ``tokenizer``, or stemming requested with the clinical tokenizer.
    """
    from rouge_score import rouge_scorer

    if tokenizer == "clinical":
        if use_stemmer:
            raise ValueError("stemming is only available with rouge_score's default tokenizer")
        return rouge_scorer.RougeScorer(list(ROUGE_TYPES), tokenizer=ClinicalRougeTokenizer())
    if tokenizer == "default":
        return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=use_stemmer)
    raise ValueError(f"unknown ROUGE tokenizer {tokenizer!r}; use 'clinical' or 'default'")


def rouge_scores(scorer: Any, prediction: str, reference: str) -> dict[str, float]:
    """``{"rouge1_precision": ..., "rouge1_recall": ..., "rouge1_f1": ..., ...}`` for one pair."""
    scores = scorer.score(reference, prediction)  # rouge_score's order is (target, prediction)
    out = {}
    for name in ROUGE_TYPES:
        out[f"{name}_precision"] = float(scores[name].precision)
        out[f"{name}_recall"] = float(scores[name].recall)
        out[f"{name}_f1"] = float(scores[name].fmeasure)
    return out


# ================================================================================================================
# Statistics
# ================================================================================================================


def describe(values: Iterable[float | int | None]) -> dict[str, float | int | None]:
    """n / mean / median / std / min / max of the defined values (None and NaN are left out).

    std is the sample standard deviation (n - 1 in the denominator, what pandas and most papers report; 0.0 for a
    single value), so the numbers compare with a peer's ``df.std()``.
    """
    defined = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not defined:
        return {"n": 0, "mean": None, "median": None, "std": None, "min": None, "max": None}
    return {
        "n": len(defined),
        "mean": statistics.fmean(defined),
        "median": statistics.median(defined),
        "std": statistics.stdev(defined) if len(defined) > 1 else 0.0,
        "min": min(defined),
        "max": max(defined),
    }


def compression_statistics(output_lengths: Sequence[int], other_lengths: Sequence[int]) -> dict[str, Any]:
    """Per-sample ratios output/other (mean, median, std, min, max) AND the ratio of totals.

    Pairs whose other length is 0 are left out (no ratio exists); ``n`` counts the pairs used.

    Raises:
        ValueError: the two sequences differ in length.
    """
    if len(output_lengths) != len(other_lengths):
        raise ValueError(f"{len(output_lengths)} output lengths but {len(other_lengths)} other lengths")
    pairs = [(o, r) for o, r in zip(output_lengths, other_lengths) if r > 0]
    ratios = describe(o / r for o, r in pairs)
    out_total = sum(o for o, _ in pairs)
    other_total = sum(r for _, r in pairs)
    return {
        "n": len(pairs),
        "mean_of_ratios": ratios["mean"],
        "median_ratio": ratios["median"],
        "std_ratio": ratios["std"],
        "min_ratio": ratios["min"],
        "max_ratio": ratios["max"],
        "ratio_of_totals": out_total / other_total if other_total else None,
        "output_total": out_total,
        "other_total": other_total,
    }


def numeric_fidelity(output_numbers: Iterable[str], source_numbers: Iterable[str]) -> dict[str, Any]:
    """Numbers of the output absent from the source (set semantics on ``extract_numbers`` tokens).

    Returns ``{"output_numbers", "unsupported", "unsupported_numbers", "fidelity"}``; fidelity is None when the
    output has no numbers.
    """
    output_set = set(output_numbers)
    unsupported = sorted(output_set - set(source_numbers))
    return {
        "output_numbers": len(output_set),
        "unsupported": len(unsupported),
        "unsupported_numbers": unsupported,
        "fidelity": 1.0 - len(unsupported) / len(output_set) if output_set else None,
    }


def numeric_recall(output_numbers: Iterable[str], reference_numbers: Iterable[str]) -> dict[str, Any]:
    """Reference numbers present in the output; recall is None when the reference has no numbers."""
    reference_set = set(reference_numbers)
    kept = reference_set & set(output_numbers)
    return {
        "reference_numbers": len(reference_set),
        "retained": len(kept),
        "recall": len(kept) / len(reference_set) if reference_set else None,
    }


def _safe_div(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator else None


def aggregate_entity_comparisons(comparisons: Sequence[EntityComparison | None]) -> dict[str, Any]:
    """Micro (pooled counts) and macro (mean of per-sample values) recall / precision / F1, overall and per type.

    ``hallucination_rate`` is extra / output keys (1 - precision), micro and macro; ``samples_with_extra`` counts
    samples with at least one unsupported output entity.
    """
    from dischargesum.evaluation.entities import ENTITY_TYPES

    valid = [c for c in comparisons if c is not None]

    def micro(entity_type: str | None) -> dict[str, Any]:
        totals: Counter[str] = Counter()
        for comparison in valid:
            totals.update(comparison.counts(entity_type))
        recall = _safe_div(totals["retained"], totals["retained"] + totals["missing"])
        precision = _safe_div(totals["supported"], totals["supported"] + totals["extra"])
        f1 = None
        if recall is not None:
            f1 = 0.0 if not precision or precision + recall == 0 else 2 * precision * recall / (precision + recall)
        return {
            "retained": totals["retained"],
            "missing": totals["missing"],
            "supported": totals["supported"],
            "extra": totals["extra"],
            "recall": recall,
            "precision": precision,
            "f1": f1,
            "hallucination_rate": None if precision is None else 1.0 - precision,
        }

    def macro(entity_type: str | None) -> dict[str, Any]:
        return {
            "recall": describe(c.recall(entity_type) for c in valid)["mean"],
            "precision": describe(c.precision(entity_type) for c in valid)["mean"],
            "f1": describe(c.f1(entity_type) for c in valid)["mean"],
            "hallucination_rate": describe(c.hallucination_rate(entity_type) for c in valid)["mean"],
            "n_recall_defined": describe(c.recall(entity_type) for c in valid)["n"],
            "n_precision_defined": describe(c.precision(entity_type) for c in valid)["n"],
        }

    return {
        "n": len(valid),
        "samples_with_extra": sum(1 for c in valid if c.counts()["extra"] > 0),
        "micro": {"overall": micro(None), "per_type": {t: micro(t) for t in ENTITY_TYPES}},
        "macro": {"overall": macro(None), "per_type": {t: macro(t) for t in ENTITY_TYPES}},
    }


def length_bucket_labels(bounds: Sequence[int]) -> list[str]:
    """``[1500, 3000]`` -> ``["<1500", "1500-3000", ">=3000"]`` (lower bound inclusive); ``[]`` -> ``["all"]``."""
    if not bounds:
        return ["all"]
    labels = [f"<{bounds[0]}"]
    labels += [f"{low}-{high}" for low, high in itertools.pairwise(bounds)]
    labels.append(f">={bounds[-1]}")
    return labels


def length_bucket(length: int, bounds: Sequence[int]) -> str:
    labels = length_bucket_labels(bounds)
    for index, bound in enumerate(bounds):
        if length < bound:
            return labels[index]
    return labels[-1]


# ================================================================================================================
# Per-sample CPU work: entities, numbers, ROUGE, words (runs in worker processes)
# ================================================================================================================


@dataclass
class TextScores:
    """CPU-side results for one sample (entity comparisons keep their entities, for the report's diffs)."""

    words: dict[str, int]
    entity_counts: dict[str, int] = field(default_factory=dict)
    vs_reference: EntityComparison | None = None
    vs_source: EntityComparison | None = None
    reference_vs_source: EntityComparison | None = None
    numbers_vs_source: dict[str, Any] | None = None
    numbers_recall_vs_reference: dict[str, Any] | None = None
    reference_numbers_vs_source: dict[str, Any] | None = None
    rouge: dict[str, float] | None = None
    generic_recall_vs_reference: float | None = None


@dataclass(frozen=True)
class TextScoringOptions:
    entities: bool = True
    numbers: bool = True
    numbers_vs_source: bool = True
    rouge: bool = True
    rouge_tokenizer: str = "clinical"
    rouge_use_stemmer: bool = False
    generic_entities: bool = False
    entity_batch_size: int = 64


_WORKER_OPTIONS: TextScoringOptions | None = None
_WORKER_ROUGE: Any = None


def _init_worker(options: TextScoringOptions) -> None:
    global _WORKER_OPTIONS, _WORKER_ROUGE
    _WORKER_OPTIONS = options
    _WORKER_ROUGE = make_rouge_scorer(options.rouge_tokenizer, options.rouge_use_stemmer) if options.rouge else None


def _unique_key_count(entities: Sequence[Any]) -> int:
    return len({entity.key for entity in entities})


def _score_text_chunk(chunk: list[tuple[str, str | None, str | None]]) -> list[TextScores]:
    """Score a chunk of (prediction, reference, source) triples with the worker's options."""
    options = _WORKER_OPTIONS
    if options is None:  # pragma: no cover - the pool initializer always runs first
        raise RuntimeError("text scoring worker used before _init_worker")
    results = [
        TextScores(
            words={
                role: len(t.split()) for role, t in zip(("prediction", "reference", "source"), triple) if t is not None
            }
        )
        for triple in chunk
    ]
    if options.entities:
        from dischargesum.evaluation.entities import compare_entities, extract_entities_batch

        texts: list[str] = []
        slots: list[tuple[int, int]] = []  # (sample, role index)
        for index, triple in enumerate(chunk):
            for role_index, text in enumerate(triple):
                if text is not None:
                    texts.append(text)
                    slots.append((index, role_index))
        extracted = extract_entities_batch(texts, batch_size=options.entity_batch_size)
        per_sample: list[list[Any]] = [[None, None, None] for _ in chunk]
        for (index, role_index), entities in zip(slots, extracted):
            per_sample[index][role_index] = entities
        for result, (output, reference, source) in zip(results, per_sample):
            result.entity_counts = {
                role: _unique_key_count(ents)
                for role, ents in (("prediction", output), ("reference", reference), ("source", source))
                if ents is not None
            }
            if reference is not None:
                result.vs_reference = compare_entities(output, reference)
            if source is not None:
                result.vs_source = compare_entities(output, source)
                if reference is not None:
                    result.reference_vs_source = compare_entities(reference, source)
    if options.numbers:
        from dischargesum.evaluation.entities import extract_numbers

        for result, (prediction, reference, source) in zip(results, chunk):
            output_numbers = extract_numbers(prediction)
            if source is not None and options.numbers_vs_source:
                source_numbers = extract_numbers(source)
                result.numbers_vs_source = numeric_fidelity(output_numbers, source_numbers)
                if reference is not None:
                    result.reference_numbers_vs_source = numeric_fidelity(extract_numbers(reference), source_numbers)
            if reference is not None:
                result.numbers_recall_vs_reference = numeric_recall(output_numbers, extract_numbers(reference))
    if options.rouge and _WORKER_ROUGE is not None:
        for result, (prediction, reference, _source) in zip(results, chunk):
            if reference is not None:
                result.rouge = rouge_scores(_WORKER_ROUGE, prediction, reference)
    if options.generic_entities:
        from dischargesum.evaluation.entities import extract_generic_entities

        for result, (prediction, reference, _source) in zip(results, chunk):
            if reference is not None:
                ref_set = {e.lower() for e in extract_generic_entities(reference)}
                out_set = {e.lower() for e in extract_generic_entities(prediction)}
                result.generic_recall_vs_reference = len(ref_set & out_set) / len(ref_set) if ref_set else None
    return results


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS / Windows
        return os.cpu_count() or 1


MIN_SAMPLES_FOR_WORKERS = 64


class TextScoringJob:
    """Runs ``_score_text_chunk`` over all samples, in worker processes or in this process.

    ``start()`` submits the work and returns at once (so the GPU can run BERTScore meanwhile); ``results()``
    waits and returns one ``TextScores`` per sample, in order. Workers are spawned, not forked: forking a process
    that holds CUDA or OpenMP state is unsafe.
    """

    def __init__(
        self,
        triples: list[tuple[str, str | None, str | None]],
        options: TextScoringOptions,
        num_workers: int | None,
        progress: bool = True,
    ) -> None:
        self.triples = triples
        self.options = options
        # Default: one process per CPU but one, which stays with the main process (BERTScore / feeding the GPU).
        workers = max(1, min(available_cpus() - 1, 32)) if num_workers is None else num_workers
        self.chunk_size = max(1, min(32, math.ceil(len(triples) / max(1, workers * 4))))
        # A pool costs ~1-2 s of spawn + imports per worker: not worth it for a few dozen samples. One worker is
        # worth it for more: it runs while this process computes BERTScore.
        self.workers = workers if workers >= 1 and len(triples) >= MIN_SAMPLES_FOR_WORKERS else 0
        self.progress = progress
        self._executor: ProcessPoolExecutor | None = None
        self._futures: list[Future] = []
        self._bar: Any = None

    def start(self) -> TextScoringJob:
        if self.workers == 0:
            return self
        from tqdm.auto import tqdm

        self._bar = tqdm(total=len(self.triples), desc="entities/ROUGE", unit="sample", disable=not self.progress)
        self._executor = ProcessPoolExecutor(
            max_workers=self.workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(self.options,),
        )
        for start in range(0, len(self.triples), self.chunk_size):
            chunk = self.triples[start : start + self.chunk_size]
            future = self._executor.submit(_score_text_chunk, chunk)
            future.add_done_callback(self._make_progress_callback(len(chunk)))
            self._futures.append(future)
        return self

    def done(self) -> bool:
        """True when no work is pending in worker processes (always true in-process, where results() does it)."""
        return all(future.done() for future in self._futures)

    def _make_progress_callback(self, n: int) -> Callable[[Future], None]:
        def update(_future: Future) -> None:
            self._bar.update(n)

        return update

    def results(self) -> list[TextScores]:
        if self.workers == 0:
            from tqdm.auto import tqdm

            _init_worker(self.options)
            out: list[TextScores] = []
            with tqdm(total=len(self.triples), desc="entities/ROUGE", unit="sample", disable=not self.progress) as bar:
                for start in range(0, len(self.triples), self.chunk_size):
                    chunk = self.triples[start : start + self.chunk_size]
                    out.extend(_score_text_chunk(chunk))
                    bar.update(len(chunk))
            return out
        try:
            out = [score for future in self._futures for score in future.result()]
        finally:
            if self._executor is not None:
                self._executor.shutdown()
            if self._bar is not None:
                self._bar.close()
        return out


# ================================================================================================================
# BERTScore
# ================================================================================================================

_ROBERTA_LIKE = {"roberta", "xlm-roberta", "camembert", "longformer", "bertweet"}


@dataclass
class BertScoreOutput:
    precision: list[float]
    recall: list[float]
    f1: list[float]
    prediction_windows: list[int]
    reference_windows: list[int]
    truncated_tokens: list[int]  # tokens dropped (prediction + reference); always 0 with the chunk policy
    prediction_tokens: list[int]  # content tokens (no special tokens)
    reference_tokens: list[int]


def resolve_device(device: str) -> str:
    """``auto`` -> the device accelerate assigns this process (cpu under accelerate_configs/cpu.yaml)."""
    if device != "auto":
        return device
    from accelerate import PartialState

    return str(PartialState().device)


def load_bertscore_encoder(model_name_or_path: str, num_layers: int, *, allow_bin_weights: bool = False) -> Any:
    """The encoder bert_score's ``get_model`` builds (the encoder of an encoder-decoder, cut to ``num_layers``
    layers), loaded with ``trust_remote_code=False`` and from safetensors.

    Why not ``bert_score.utils.get_model``: it calls ``AutoModel.from_pretrained(name)`` with neither flag, so an
    encoder directory with ``auto_map`` prompts to run its code, and pickled ``pytorch_model.bin`` weights load
    silently. A ``.bin``-only encoder is refused unless ``allow_bin_weights`` (transformers then unpickles with
    ``weights_only=True``).

    Raises:
        ConfigError: no safetensors weights (and ``allow_bin_weights`` is off), the model cannot be loaded, or its
            layer list is not one bert_score cuts the same way (BERT/RoBERTa ``encoder.layer``, DistilBERT
            ``transformer.layer``, ``layers``, ``layer``).
    """
    import torch
    from transformers import AutoModel

    unloadable = f"eval: `bertscore_model` = {model_name_or_path!r} could not be loaded"
    try:
        model = AutoModel.from_pretrained(model_name_or_path, trust_remote_code=False, use_safetensors=True)
    except OSError as exc:
        if "safetensors" not in str(exc):
            raise ConfigError(f"{unloadable} ({exc})") from None
        if not allow_bin_weights:
            raise ConfigError(
                f"eval: `bertscore_model` = {model_name_or_path!r} has no safetensors weights, only pickled ones "
                "(pytorch_model.bin), which can run code when loaded. Convert it to safetensors (load it once in a "
                "trusted environment and `save_pretrained(dir, safe_serialization=True)`), or, if you trust its "
                "source, set `bertscore_allow_bin_weights: true`."
            ) from None
        logger.warning("loading pickled weights of %s (bertscore_allow_bin_weights is set)", model_name_or_path)
        model = AutoModel.from_pretrained(model_name_or_path, trust_remote_code=False, use_safetensors=False)
    except ValueError as exc:
        raise ConfigError(f"{unloadable} ({exc})") from None
    model.eval()
    if hasattr(model, "decoder") and hasattr(model, "encoder"):
        model = model.encoder
    for owner, name in (
        (getattr(model, "encoder", None), "layer"),
        (getattr(model, "transformer", None), "layer"),
        (model, "layers"),
        (model, "layer"),
    ):
        layers = getattr(owner, name, None) if owner is not None else None
        if isinstance(layers, torch.nn.ModuleList):
            setattr(owner, name, torch.nn.ModuleList(list(layers)[:num_layers]))
            return model
    raise ConfigError(
        f"eval: `bertscore_model` = {model_name_or_path!r} ({type(model).__name__}) has no layer list BERTScore "
        "knows how to cut at `bertscore_num_layers`; use a BERT-family encoder."
    )


class BertScorer:
    """BERTScore with a deliberate long-text policy (see the module docstring).

    Raises (constructor):
        ConfigError: the model or its tokenizer cannot be loaded, ``num_layers`` exceeds the model's layers, the
            tokenizer has no pad token, or the window is too small for ``chunk_overlap``.
    """

    def __init__(
        self,
        model_name_or_path: str,
        num_layers: int,
        *,
        device: str = "cpu",
        dtype: str = "float32",
        batch_size: int = 64,
        long_text: str = "chunk",
        chunk_overlap: int = 128,
        allow_bin_weights: bool = False,
    ) -> None:
        import torch
        from transformers import AutoConfig, AutoTokenizer

        if long_text not in ("chunk", "truncate"):
            raise ConfigError(f"eval: `bertscore_long_text` = {long_text!r}; use chunk or truncate.")
        self.model_name_or_path = model_name_or_path
        self.num_layers = num_layers
        self.batch_size = batch_size
        self.long_text = long_text
        self.device = torch.device(device)
        try:
            # trust_remote_code=False: an encoder directory with `auto_map` must never run its code (left unset,
            # transformers asks "run the custom code? [y/N]" and runs it on yes).
            config = AutoConfig.from_pretrained(model_name_or_path, trust_remote_code=False)
            self.tokenizer = AutoTokenizer.from_pretrained(model_name_or_path, trust_remote_code=False)
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"eval: `bertscore_model` = {model_name_or_path!r} could not be loaded ({exc}). Use a local "
                "directory, or download the model into the Hugging Face cache first (this machine may be offline)."
            ) from None
        total_layers = getattr(config, "num_hidden_layers", None)
        if total_layers is not None and not 1 <= num_layers <= total_layers:
            raise ConfigError(
                f"eval: `bertscore_num_layers` = {num_layers} but {model_name_or_path} has {total_layers} layers; "
                f"use 1..{total_layers}."
            )
        if self.tokenizer.pad_token_id is None:
            raise ConfigError(f"eval: the tokenizer of `bertscore_model` = {model_name_or_path!r} has no pad token.")
        with_special = self.tokenizer("a", verbose=False)["input_ids"]
        content = self.tokenizer("a", add_special_tokens=False, verbose=False)["input_ids"]
        at = next(i for i in range(len(with_special)) if with_special[i : i + len(content)] == content)
        self.prefix = list(with_special[:at])
        self.suffix = list(with_special[at + len(content) :])
        max_positions = getattr(config, "max_position_embeddings", None) or 512
        if getattr(config, "model_type", "") in _ROBERTA_LIKE:
            max_positions -= (config.pad_token_id or 0) + 1  # positions start after the padding index
        model_max = self.tokenizer.model_max_length
        max_length = min(max_positions, model_max) if model_max and model_max < 1_000_000 else max_positions
        self.max_length = max_length
        self.window = max_length - len(self.prefix) - len(self.suffix)
        if self.window < 8:
            raise ConfigError(f"eval: `bertscore_model` window is {self.window} tokens; too small for BERTScore.")
        self.overlap = min(chunk_overlap, self.window // 2)
        if self.overlap != chunk_overlap and long_text == "chunk":
            logger.warning(
                "bertscore_chunk_overlap %d is more than half the %d-token window; using %d",
                chunk_overlap,
                self.window,
                self.overlap,
            )
        self.model = load_bertscore_encoder(model_name_or_path, num_layers, allow_bin_weights=allow_bin_weights)
        self.model.to(self.device, dtype=getattr(torch, dtype)).eval()

    # ---- tokens -----------------------------------------------------------------------------------------------

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Content token ids (no special tokens) of each stripped text."""
        if not texts:
            return []
        return list(self.tokenizer([t.strip() for t in texts], add_special_tokens=False, verbose=False)["input_ids"])

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return [len(ids) for ids in self.token_ids(texts)]

    def windows(self, n_tokens: int) -> list[tuple[int, int, int, int]]:
        """(start, end, keep_from, keep_to) token ranges covering ``n_tokens`` under the long-text policy."""
        if n_tokens <= self.window or self.long_text == "truncate":
            end = min(n_tokens, self.window)
            return [(0, end, 0, end)]
        stride = self.window - self.overlap
        spans = []
        start = 0
        while True:
            end = min(start + self.window, n_tokens)
            spans.append((start, end))
            if end == n_tokens:
                break
            start += stride
        out = []
        for index, (start, end) in enumerate(spans):
            keep_from = start + (self.overlap // 2 if index > 0 else 0)
            keep_to = end - (self.overlap - self.overlap // 2) if index < len(spans) - 1 else end
            out.append((start, end, keep_from, keep_to))
        return out

    # ---- embeddings -------------------------------------------------------------------------------------------

    def _embed(self, id_lists: list[list[int]], progress: Callable[[int], Any] | None = None) -> list[tuple[Any, Any]]:
        """Per text: (embeddings [L, d] float32, weights [L]) with specials framing the kept content tokens."""
        import torch

        jobs = []  # (text index, window index, ids, keep_from, keep_to relative to the window)
        plans = []
        for text_index, ids in enumerate(id_lists):
            spans = self.windows(len(ids))
            plans.append(spans)
            for window_index, (start, end, keep_from, keep_to) in enumerate(spans):
                jobs.append((text_index, window_index, ids[start:end], keep_from - start, keep_to - start))
        jobs.sort(key=lambda job: len(job[2]), reverse=True)
        pieces: dict[tuple[int, int], tuple[Any, Any, Any]] = {}
        pad = self.tokenizer.pad_token_id
        n_prefix = len(self.prefix)
        with torch.inference_mode():
            for batch_start in range(0, len(jobs), self.batch_size):
                batch = jobs[batch_start : batch_start + self.batch_size]
                sequences = [self.prefix + job[2] + self.suffix for job in batch]
                width = max(len(s) for s in sequences)
                input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for row, sequence in enumerate(sequences):
                    input_ids[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
                    mask[row, : len(sequence)] = 1
                hidden = self.model(input_ids.to(self.device), attention_mask=mask.to(self.device))[0].float()
                if progress is not None:
                    progress(len(batch))
                for row, (text_index, window_index, ids, keep_from, keep_to) in enumerate(batch):
                    h = hidden[row]
                    pieces[(text_index, window_index)] = (
                        h[:n_prefix],
                        h[n_prefix + keep_from : n_prefix + keep_to],
                        h[n_prefix + len(ids) : n_prefix + len(ids) + len(self.suffix)],
                    )
        out = []
        for text_index, spans in enumerate(plans):
            last = len(spans) - 1
            parts = [pieces[(text_index, 0)][0]]
            parts += [pieces[(text_index, w)][1] for w in range(len(spans))]
            parts.append(pieces[(text_index, last)][2])
            embedding = torch.cat(parts, dim=0)
            weights = torch.zeros(embedding.shape[0], device=embedding.device)
            weights[len(self.prefix) : embedding.shape[0] - len(self.suffix)] = 1.0
            out.append((embedding, weights))
        return out

    # ---- scoring ----------------------------------------------------------------------------------------------

    def score(
        self,
        predictions: Sequence[str],
        references: Sequence[str],
        *,
        progress: bool = True,
        block_pairs: int = 256,
        max_matrix_elements: int = 1 << 27,
        after_batch: Callable[[], Any] | None = None,
    ) -> BertScoreOutput:
        """BERTScore P/R/F1 of each prediction against its reference, with windows and truncation per sample.

        Raises:
            ValueError: the two sequences differ in length.
        """
        from bert_score.utils import greedy_cos_idf
        from torch.nn.utils.rnn import pad_sequence
        from tqdm.auto import tqdm

        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
        n = len(predictions)
        pred_ids = self.token_ids(predictions)
        ref_ids = self.token_ids(references)
        precision = [0.0] * n
        recall = [0.0] * n
        f1 = [0.0] * n
        pred_windows = [len(self.windows(len(ids))) if ids else 0 for ids in pred_ids]
        ref_windows = [len(self.windows(len(ids))) if ids else 0 for ids in ref_ids]
        truncated = [
            (max(0, len(p) - self.window) + max(0, len(r) - self.window)) if self.long_text == "truncate" else 0
            for p, r in zip(pred_ids, ref_ids)
        ]
        # Empty texts score 0 (bert_score's convention) and are not embedded.
        order = [i for i in range(n) if pred_ids[i] and ref_ids[i]]
        order.sort(key=lambda i: max(len(pred_ids[i]), len(ref_ids[i])))
        # Unique texts per block of pairs (a text embedded once per block); the bar counts encoder windows.
        blocks = []
        for block_start in range(0, len(order), block_pairs):
            block = order[block_start : block_start + block_pairs]
            texts: dict[tuple[int, ...], int] = {}
            id_lists: list[list[int]] = []
            for i in block:
                for ids in (pred_ids[i], ref_ids[i]):
                    key = tuple(ids)
                    if key not in texts:
                        texts[key] = len(id_lists)
                        id_lists.append(ids)
            blocks.append((block, texts, id_lists))
        total_windows = sum(len(self.windows(len(ids))) for _b, _t, id_lists in blocks for ids in id_lists)
        with tqdm(total=total_windows, desc="BERTScore", unit="window", disable=not progress) as bar:
            for block, texts, id_lists in blocks:

                def advance(windows: int) -> None:
                    bar.update(windows)
                    if after_batch is not None:
                        after_batch()

                embedded = self._embed(id_lists, advance)
                position = 0
                while position < len(block):
                    # As many pairs as fit the similarity-matrix budget (B x longest prediction x longest reference).
                    end = position
                    longest_hyp = longest_ref = 0
                    while end < len(block):
                        i = block[end]
                        hyp_len = max(longest_hyp, embedded[texts[tuple(pred_ids[i])]][0].shape[0])
                        ref_len = max(longest_ref, embedded[texts[tuple(ref_ids[i])]][0].shape[0])
                        if end > position and (end + 1 - position) * hyp_len * ref_len > max_matrix_elements:
                            break
                        longest_hyp, longest_ref = hyp_len, ref_len
                        end += 1
                    pairs = block[position:end]
                    hyp = [embedded[texts[tuple(pred_ids[i])]] for i in pairs]
                    ref = [embedded[texts[tuple(ref_ids[i])]] for i in pairs]
                    hyp_emb = pad_sequence([e for e, _ in hyp], batch_first=True, padding_value=2.0)
                    ref_emb = pad_sequence([e for e, _ in ref], batch_first=True, padding_value=2.0)
                    hyp_idf = pad_sequence([w for _, w in hyp], batch_first=True)
                    ref_idf = pad_sequence([w for _, w in ref], batch_first=True)
                    hyp_mask = _length_mask([e.shape[0] for e, _ in hyp], hyp_emb.device)
                    ref_mask = _length_mask([e.shape[0] for e, _ in ref], ref_emb.device)
                    p, r, f = greedy_cos_idf(ref_emb, ref_mask, ref_idf, hyp_emb, hyp_mask, hyp_idf)
                    for i, p_i, r_i, f_i in zip(pairs, p.tolist(), r.tolist(), f.tolist()):
                        precision[i], recall[i], f1[i] = p_i, r_i, f_i
                    position = end
        return BertScoreOutput(
            precision,
            recall,
            f1,
            pred_windows,
            ref_windows,
            truncated,
            [len(i) for i in pred_ids],
            [len(i) for i in ref_ids],
        )


def _length_mask(lengths: list[int], device: Any) -> Any:
    import torch

    lens = torch.tensor(lengths, device=device)
    return torch.arange(int(lens.max()), device=device)[None, :] < lens[:, None]


# ================================================================================================================
# The evaluation
# ================================================================================================================


@dataclass
class EvalResult:
    """Everything the report writes: aggregates, one numeric row per prediction row, and the texts for examples."""

    mode: str
    metrics: dict[str, Any]
    rows: list[dict[str, Any]]  # per_sample.csv (numbers and ids only), scored samples then skipped rows
    samples: list[EvalSample]
    text_scores: list[TextScores]
    buckets: list[str]  # per scored sample


def _token_counter(cfg: EvalConfig, scorer: BertScorer | None) -> tuple[str, Callable[[Sequence[str]], list[int]]]:
    if cfg.tokenizer_name_or_path:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer_name_or_path)
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"eval: `tokenizer_name_or_path` = {cfg.tokenizer_name_or_path!r} could not be loaded ({exc}); use a "
                "local directory or `none`."
            ) from None

        def count(texts: Sequence[str]) -> list[int]:
            if not texts:
                return []
            return [len(ids) for ids in tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]]

        return cfg.tokenizer_name_or_path, count
    if scorer is not None:
        return f"{scorer.model_name_or_path} (BERTScore encoder)", scorer.count_tokens
    return "whitespace words", lambda texts: [len(t.split()) for t in texts]


def _aggregate(
    samples: Sequence[EvalSample],
    scores: Sequence[TextScores],
    rows: Sequence[dict[str, Any]],
    families: set[str],
) -> dict[str, Any]:
    """All aggregate metrics over one set of samples (the whole run or one length bucket)."""
    out: dict[str, Any] = {"n": len(samples)}
    has_ref = any(s.reference is not None for s in samples)
    has_src = any(s.source is not None for s in samples)
    if "bertscore" in families and has_ref:
        out["bertscore"] = {k: describe(r.get(f"bertscore_{k}") for r in rows) for k in ("precision", "recall", "f1")}
    if "rouge" in families and has_ref:
        out["rouge"] = {
            name: {k: describe(r.get(f"{name}_{k}") for r in rows) for k in ("precision", "recall", "f1")}
            for name in ROUGE_TYPES
        }
    if "entities" in families:
        entities: dict[str, Any] = {}
        if has_ref:
            entities["vs_reference"] = aggregate_entity_comparisons([s.vs_reference for s in scores])
        if has_src:
            entities["vs_source"] = aggregate_entity_comparisons([s.vs_source for s in scores])
        if has_ref and has_src:
            entities["reference_vs_source"] = aggregate_entity_comparisons([s.reference_vs_source for s in scores])
        out["entities"] = entities
        if has_src:
            vs_source = entities["vs_source"]
            out["hallucination"] = {
                "rate_micro": vs_source["micro"]["overall"]["hallucination_rate"],
                "rate_macro": vs_source["macro"]["overall"]["hallucination_rate"],
                "extra_total": vs_source["micro"]["overall"]["extra"],
                "output_entities_total": vs_source["micro"]["overall"]["supported"]
                + vs_source["micro"]["overall"]["extra"],
                "samples_with_any": vs_source["samples_with_extra"],
                "per_type_rate_micro": {t: v["hallucination_rate"] for t, v in vs_source["micro"]["per_type"].items()},
                "reference_baseline_rate_micro": (
                    entities["reference_vs_source"]["micro"]["overall"]["hallucination_rate"] if has_ref else None
                ),
            }
    if "numbers" in families:
        numbers: dict[str, Any] = {}
        if any(s.numbers_vs_source is not None for s in scores):  # not computed for sources without digits
            fid = [s.numbers_vs_source for s in scores if s.numbers_vs_source is not None]
            total = sum(f["output_numbers"] for f in fid)
            unsupported = sum(f["unsupported"] for f in fid)
            numbers["vs_source"] = {
                "output_numbers_total": total,
                "unsupported_total": unsupported,
                "fidelity_micro": 1.0 - unsupported / total if total else None,
                "fidelity_macro": describe(f["fidelity"] for f in fid)["mean"],
                "samples_with_unsupported": sum(1 for f in fid if f["unsupported"]),
            }
            base = [s.reference_numbers_vs_source for s in scores if s.reference_numbers_vs_source is not None]
            if base:
                base_total = sum(f["output_numbers"] for f in base)
                numbers["reference_vs_source"] = {
                    "fidelity_micro": 1.0 - sum(f["unsupported"] for f in base) / base_total if base_total else None,
                    "samples_with_unsupported": sum(1 for f in base if f["unsupported"]),
                }
        if has_ref:
            rec = [s.numbers_recall_vs_reference for s in scores if s.numbers_recall_vs_reference is not None]
            ref_total = sum(r["reference_numbers"] for r in rec)
            numbers["recall_vs_reference"] = {
                "reference_numbers_total": ref_total,
                "retained_total": sum(r["retained"] for r in rec),
                "recall_micro": sum(r["retained"] for r in rec) / ref_total if ref_total else None,
                "recall_macro": describe(r["recall"] for r in rec)["mean"],
            }
        out["numbers"] = numbers
    if "compression" in families:
        compression: dict[str, Any] = {}
        for role, present in (("reference", has_ref), ("source", has_src)):
            if present:
                compression[f"vs_{role}"] = {
                    unit: compression_statistics(
                        [r[f"prediction_{unit}"] for r in rows], [r[f"{role}_{unit}"] for r in rows]
                    )
                    for unit in ("chars", "tokens")
                }
        out["compression"] = compression
    if any(s.generic_recall_vs_reference is not None for s in scores):
        out["generic_entity_recall_vs_reference"] = describe(s.generic_recall_vs_reference for s in scores)
    return out


def _sample_row(sample: EvalSample, scores: TextScores, bucket: str) -> dict[str, Any]:
    """The numeric part of one per_sample.csv row (BERTScore and token columns are added later)."""
    from dischargesum.evaluation.entities import ENTITY_TYPES

    row: dict[str, Any] = {"note_id": sample.note_id, "status": "scored", "length_bucket": bucket}
    row.update(sample.extra)
    row["prediction_chars"] = len(sample.prediction)
    row["reference_chars"] = len(sample.reference) if sample.reference is not None else None
    row["source_chars"] = len(sample.source) if sample.source is not None else None
    for role, count in scores.words.items():
        row[f"{role}_words"] = count
    for role, count in scores.entity_counts.items():
        row[f"{role}_entities"] = count
    for name, comparison in (("vs_reference", scores.vs_reference), ("vs_source", scores.vs_source)):
        if comparison is None:
            continue
        counts = comparison.counts()
        row[f"entity_recall_{name}"] = comparison.recall()
        row[f"entity_precision_{name}"] = comparison.precision()
        row[f"entity_f1_{name}"] = comparison.f1()
        row[f"entities_missing_{name}"] = counts["missing"]
        row[f"entities_extra_{name}"] = counts["extra"]
        if name == "vs_reference":
            for entity_type in ENTITY_TYPES:
                row[f"recall_{entity_type}_{name}"] = comparison.recall(entity_type)
    if scores.vs_source is not None:
        row["hallucinated_entities"] = scores.vs_source.counts()["extra"]
        row["hallucination_rate"] = scores.vs_source.hallucination_rate()
    if scores.reference_vs_source is not None:
        row["reference_hallucination_rate"] = scores.reference_vs_source.hallucination_rate()
    if scores.numbers_vs_source is not None:
        row["output_numbers"] = scores.numbers_vs_source["output_numbers"]
        row["numbers_unsupported_vs_source"] = scores.numbers_vs_source["unsupported"]
        row["numeric_fidelity_vs_source"] = scores.numbers_vs_source["fidelity"]
    if scores.numbers_recall_vs_reference is not None:
        row["numeric_recall_vs_reference"] = scores.numbers_recall_vs_reference["recall"]
    if scores.rouge is not None:
        row.update(scores.rouge)
    if scores.generic_recall_vs_reference is not None:
        row["generic_entity_recall_vs_reference"] = scores.generic_recall_vs_reference
    return row


def evaluate(inputs: EvalInputs, cfg: EvalConfig, *, progress: bool | None = None) -> EvalResult:
    """Score every sample: CPU work (entities, numbers, ROUGE) in worker processes while BERTScore runs here.

    Raises:
        ConfigError: the BERTScore encoder or the token-count tokenizer cannot be loaded, or a layer is invalid.
        UserError: ``generic_entities`` is on but scispaCy's en_core_sci_sm is not installed.
    """
    show = show_progress() if progress is None else progress
    families = set(cfg.metrics)
    samples = inputs.samples
    timing: dict[str, float] = {}
    evaluate_started = time.perf_counter()
    if cfg.generic_entities:
        from dischargesum.evaluation.entities import generic_channel_available

        if not generic_channel_available():
            raise UserError(
                "`generic_entities: true` needs scispaCy's en_core_sci_sm model, which is not installed (it needs "
                "network to install); set `generic_entities: false`."
            )
    not_computed = []
    if not inputs.has_reference:
        not_computed += [f for f in ("bertscore", "rouge") if f in families]
    warnings: list[str] = []
    numbers_vs_source = "numbers" in families and inputs.has_source
    if numbers_vs_source and not any(_has_digit(s.source or "") for s in samples):
        # A preprocessing that stripped digits (the seed's NLTK cleaning does) would make every number of every
        # summary "unsupported": a numeric fidelity of 0 that measures the preprocessing, not the summaries.
        numbers_vs_source = False
        warnings.append(
            f"no {ROLE_LABELS[inputs.mode]['source']} contains a digit (were digits stripped in preprocessing?): "
            "numeric fidelity vs the source is not computed"
        )
        logger.warning("%s", warnings[-1])
    scorer: BertScorer | None = None
    started = time.perf_counter()
    if "bertscore" in families and inputs.has_reference:
        device = resolve_device(cfg.device)
        scorer = BertScorer(
            cfg.bertscore_model,
            cfg.bertscore_num_layers,
            device=device,
            dtype=cfg.bertscore_dtype,
            batch_size=cfg.bertscore_batch_size,
            long_text=cfg.bertscore_long_text,
            chunk_overlap=cfg.bertscore_chunk_overlap,
            allow_bin_weights=cfg.bertscore_allow_bin_weights,
        )
        timing["bertscore_model_load_s"] = time.perf_counter() - started
        logger.info(
            "BERTScore: %s layer %d on %s (%s), window %d tokens, long texts: %s",
            cfg.bertscore_model,
            cfg.bertscore_num_layers,
            device,
            cfg.bertscore_dtype,
            scorer.window,
            cfg.bertscore_long_text,
        )

    options = TextScoringOptions(
        entities="entities" in families,
        numbers="numbers" in families,
        numbers_vs_source=numbers_vs_source,
        rouge="rouge" in families and inputs.has_reference,
        rouge_tokenizer=cfg.rouge_tokenizer,
        rouge_use_stemmer=cfg.rouge_use_stemmer,
        generic_entities=cfg.generic_entities,
        entity_batch_size=cfg.entity_batch_size,
    )
    triples = [(s.prediction, s.reference, s.source) for s in samples]
    started = time.perf_counter()
    job = TextScoringJob(triples, options, cfg.num_workers, progress=show).start()
    logger.info(
        "entities/ROUGE: %d samples on %s", len(samples), f"{job.workers} workers" if job.workers else "1 process"
    )

    bert: BertScoreOutput | None = None
    if scorer is not None:
        import torch

        threads = torch.get_num_threads()
        if scorer.device.type == "cpu" and job.workers:
            # The workers hold job.workers CPUs: more torch threads than the CPUs left only spin and wait (measured
            # here: a tiny linear layer 80x slower with 2 threads on 2 busy CPUs than with 1). Once the workers are
            # done, the encoder gets every thread back.
            torch.set_num_threads(max(1, available_cpus() - job.workers))

        def restore_threads_when_workers_finish() -> None:
            if torch.get_num_threads() != threads and job.done():
                torch.set_num_threads(threads)

        bert_started = time.perf_counter()
        try:
            bert = scorer.score(
                [s.prediction for s in samples],
                [s.reference or "" for s in samples],
                progress=show,
                after_batch=restore_threads_when_workers_finish,
            )
        finally:
            torch.set_num_threads(threads)
        timing["bertscore_s"] = time.perf_counter() - bert_started
    counter_name, count_tokens = _token_counter(cfg, scorer)
    token_counts = {
        role: count_tokens([getattr(s, role) or "" for s in samples]) for role in ("prediction", "reference", "source")
    }
    text_scores = job.results()
    timing["entities_rouge_wall_s"] = time.perf_counter() - started

    basis = "source" if inputs.has_source else ("reference" if inputs.has_reference else "prediction")
    buckets = [length_bucket(len(getattr(s, basis) or ""), cfg.length_buckets) for s in samples]
    rows = []
    for index, (sample, scores, bucket) in enumerate(zip(samples, text_scores, buckets)):
        row = _sample_row(sample, scores, bucket)
        for role in ("prediction", "reference", "source"):
            text = getattr(sample, role)
            row[f"{role}_tokens"] = token_counts[role][index] if text is not None else None
        for role in ("reference", "source"):
            if getattr(sample, role) is None:
                continue
            for unit in ("chars", "tokens"):
                other = row[f"{role}_{unit}"]
                row[f"compression_{unit}_vs_{role}"] = row[f"prediction_{unit}"] / other if other else None
        if bert is not None:
            row["bertscore_precision"] = bert.precision[index]
            row["bertscore_recall"] = bert.recall[index]
            row["bertscore_f1"] = bert.f1[index]
            row["bertscore_prediction_windows"] = bert.prediction_windows[index]
            row["bertscore_reference_windows"] = bert.reference_windows[index]
            row["bertscore_truncated_tokens"] = bert.truncated_tokens[index]
        rows.append(row)

    metrics: dict[str, Any] = {
        "mode": inputs.mode,
        "roles": {
            role: {"label": ROLE_LABELS[inputs.mode][role], "column": column}
            for role, column in inputs.columns.items()
            if role != "note_id"
        },
        "counts": {
            "prediction_rows": inputs.prediction_rows,
            "scored": len(samples),
            "skipped": inputs.skip_counts(),
            "skipped_total": len(inputs.skipped),
            "skipped_fraction": len(inputs.skipped) / inputs.prediction_rows,
            "empty_predictions_scored": sum(1 for s in samples if not s.prediction.strip()),
            "references_without_prediction": inputs.references_without_prediction,
            "references_without_prediction_reason": inputs.unpredicted_reason,
            "notes_shortened": sum(1 for s in samples if s.extra.get("note_shortened")),
            "compression_fallbacks": (
                sum(1 for s in samples if s.extra.get("fallback"))
                if any("fallback" in s.extra for s in samples)
                else None
            ),
        },
        "not_computed": not_computed,
        "warnings": warnings,
        "length_buckets": {"basis": f"{basis} characters", "bounds": list(cfg.length_buckets)},
        "token_counter": counter_name,
    }
    if scorer is not None and bert is not None:
        over = sum(1 for a, b in zip(bert.prediction_windows, bert.reference_windows) if max(a, b) > 1)
        metrics["bertscore_settings"] = {
            "model": cfg.bertscore_model,
            "num_layers": cfg.bertscore_num_layers,
            "window_tokens": scorer.window,
            "max_length": scorer.max_length,
            "long_text": cfg.bertscore_long_text,
            "chunk_overlap": scorer.overlap if cfg.bertscore_long_text == "chunk" else None,
            "dtype": cfg.bertscore_dtype,
            "device": str(scorer.device),
            "idf": False,
            "rescale_with_baseline": False,
            "samples_over_window": sum(
                1 for a, b in zip(bert.prediction_tokens, bert.reference_tokens) if max(a, b) > scorer.window
            ),
            "samples_chunked": over,
            "samples_truncated": sum(1 for t in bert.truncated_tokens if t > 0),
            "truncated_tokens_total": sum(bert.truncated_tokens),
        }
    if "rouge" in families and inputs.has_reference:
        metrics["rouge_settings"] = {
            "tokenizer": cfg.rouge_tokenizer,
            "use_stemmer": cfg.rouge_use_stemmer,
            "lsum_units": "lines",
        }
    metrics["overall"] = _aggregate(samples, text_scores, rows, families)
    by_bucket = {}
    for label in length_bucket_labels(cfg.length_buckets):
        members = [i for i, b in enumerate(buckets) if b == label]
        by_bucket[label] = _aggregate(
            [samples[i] for i in members], [text_scores[i] for i in members], [rows[i] for i in members], families
        )
    metrics["by_length_bucket"] = by_bucket
    timing["total_s"] = time.perf_counter() - evaluate_started
    metrics["timing_s"] = {k: round(v, 3) for k, v in timing.items()}
    skipped_rows = [{"note_id": note_id, "status": reason} for note_id, reason in inputs.skipped]
    return EvalResult(inputs.mode, metrics, rows + skipped_rows, samples, text_scores, buckets)
