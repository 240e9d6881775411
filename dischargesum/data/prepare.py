"""The prepare_data pipeline: raw BHC rows -> train / validation / test parquet, rejects.jsonl, data card.

One pass over the input in bounded memory (``chunk_rows`` records at a time; ``seed`` normalisation adds a
second pass over a staging file because its rare-word filter needs corpus counts first):

1. :func:`dischargesum.data.readers.inspect_source` detects the schema and fails with exit code 2 on a missing
   column — before the tokenizer or any data is loaded.
2. Worker processes (``num_workers``; at most ``2 * num_workers`` chunks in flight) decode, validate and
   normalise each chunk (:func:`dischargesum.data.validate.validate_chunk`), count tokens exactly as TRL's
   SFTTrainer will (:class:`dischargesum.data.budget.TokenCounter`), shorten over-long notes
   (:mod:`dischargesum.data.shorten`) until they fit and reject rows whose summary alone cannot fit
   (:func:`dischargesum.data.budget.fit_to_budget`). A row's split is a function of the row, so the worker
   knows it: train and validation notes drop the sections that support the fewest summary entities first, test
   notes keep the fixed order (:mod:`dischargesum.data.target_support`, ``shortening_rank_by_target``).
3. The main process drops duplicate ``note_id`` rows (the first row that passed every other check wins),
   assigns patient-level splits (:mod:`dischargesum.data.split`) and appends to the split files.
4. The data card (:mod:`dischargesum.data.card`) proves the accounting (rows in = rows in splits + rejects),
   records per-split length statistics and sha256 fingerprints; the manifest is marked complete last.

Outputs are byte-identical across reruns with the same inputs and config (no timestamps outside the manifest;
rows keep input order; Parquet files are written with fixed settings).

Why one module (~700 lines): it is the stage's orchestration — the worker-pool streaming, the staging writer, the
resume/overwrite rules and ``--debug`` share one chunk loop and one set of worker globals; the steps themselves live
in the modules named above.
"""

from __future__ import annotations

import dataclasses
import itertools
import multiprocessing
import os
import shutil
import time
from collections import Counter, deque
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dischargesum.cli import UserError
from dischargesum.config import ConfigError, PrepareDataConfig
from dischargesum.data import schema
from dischargesum.data.budget import (
    BudgetResult,
    TokenCounter,
    chat_template_fingerprint,
    fit_to_budget,
    render_loss_mask,
    tokenize_examples,
)
from dischargesum.data.normalize import filter_rare_words, seed_backends
from dischargesum.data.readers import RawChunk, SourceInfo, inspect_source, iter_chunks, sample_chunks
from dischargesum.data.split import SplitTracker, assign_split
from dischargesum.data.validate import ValidatedChunk, ValidationOptions, reject_record, validate_chunk
from dischargesum.logging_utils import get_logger, is_main_process, show_progress
from dischargesum.manifest import (
    MANIFEST_NAME,
    atomic_write_json,
    canonical_hash,
    create_private,
    fingerprint_file,
    finish_run,
    open_private,
    private_dir,
    read_manifest,
    sha256_file,
    start_run,
    warn_if_replacing,
)
from dischargesum.modeling import load_tokenizer

logger = get_logger(__name__)

_STAGING_DIR = ".staging"
# --debug reads chunks of at least this many rows (a few rejects or duplicates rarely need a second chunk)
_DEBUG_CHUNK_ROWS = 256


def output_arrow_schema() -> Any:
    """Arrow types of :data:`dischargesum.data.schema.PREPARED_COLUMNS`, in that order."""
    import pyarrow as pa

    types = {
        "note_id": pa.string(),
        "subject_id": pa.string(),
        "source_row": pa.int64(),
        "note": pa.string(),
        "summary": pa.string(),
        "note_chars_original": pa.int64(),
        "note_shortened": pa.bool_(),
        "prompt_tokens": pa.int64(),
        "completion_tokens": pa.int64(),
        "gt_entities": pa.string(),
    }
    if list(types) != list(schema.PREPARED_COLUMNS):
        raise RuntimeError("output_arrow_schema is out of date with schema.PREPARED_COLUMNS")
    return pa.schema(list(types.items()))


# ----------------------------------------------------------------------------------------------------------------
# chunk work (runs in worker processes, or in-process with num_workers: 0)


@dataclass(frozen=True)
class ChunkParams:
    """Everything a worker needs to validate and fit a chunk (picklable)."""

    validation: ValidationOptions
    tokenizer_name_or_path: str
    instruction: str
    token_counting: str
    max_seq_length: int
    min_note_tokens: int
    note_shortening: str
    tokenize_batch_size: int
    shortening_rank_by_target: bool
    entity_support_stats: str
    seed: int
    validation_fraction: float
    test_fraction: float

    @classmethod
    def from_config(cls, cfg: PrepareDataConfig) -> ChunkParams:
        return cls(
            validation=ValidationOptions(
                normalization=cfg.normalization,
                utf8_errors=cfg.utf8_errors,
                max_note_chars=cfg.max_note_chars,
                use_input_split=cfg.input_split_column is not None,
            ),
            tokenizer_name_or_path=cfg.tokenizer_name_or_path,
            instruction=cfg.instruction,
            token_counting=cfg.token_counting,
            max_seq_length=cfg.max_seq_length,
            min_note_tokens=cfg.min_note_tokens,
            note_shortening=cfg.note_shortening,
            tokenize_batch_size=cfg.tokenize_batch_size,
            shortening_rank_by_target=cfg.shortening_rank_by_target,
            entity_support_stats=cfg.entity_support_stats,
            seed=cfg.seed,
            validation_fraction=cfg.validation_fraction,
            test_fraction=cfg.test_fraction,
        )


_WORKER: dict[str, Any] = {}


def _init_worker(params: ChunkParams, single_threaded: bool) -> None:
    if single_threaded:  # one tokenizer thread per worker process: the workers already fill the cores
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER.clear()
    _WORKER["params"] = params


def _worker_counter() -> TokenCounter:
    counter = _WORKER.get("counter")
    if counter is None:
        params: ChunkParams = _WORKER["params"]
        tokenizer = load_tokenizer(params.tokenizer_name_or_path, field="tokenizer_name_or_path")
        counter = TokenCounter(tokenizer, params.instruction, mode=params.token_counting)
        _WORKER["counter"] = counter
    return counter


def _fit_chunk(chunk: ValidatedChunk) -> tuple[ValidatedChunk, BudgetResult]:
    params: ChunkParams = _WORKER["params"]
    counter = _worker_counter()
    before = dict(counter.stats)
    fitted = fit_to_budget(
        counter,
        chunk.note,
        chunk.summary,
        max_seq_length=params.max_seq_length,
        min_note_tokens=params.min_note_tokens,
        strategy=params.note_shortening,
        batch_size=params.tokenize_batch_size,
        # the split is known here (a function of the row): rank by the target on training data only, never on test
        rank_by_target=[split != "test" for split in _row_splits(chunk, params)]
        if params.shortening_rank_by_target
        else None,
        entity_support=params.entity_support_stats,
    )
    for key, value in counter.stats.items():
        fitted.stats[f"token_counting:{key}"] += value - before.get(key, 0)
    return chunk, fitted


def _row_splits(chunk: ValidatedChunk, params: ChunkParams) -> list[str]:
    """The split of every row of ``chunk``: the input's own column, or a hash of subject_id and seed."""
    if params.validation.use_input_split:
        if None in chunk.input_split:  # validate_chunk rejects rows without a known split (a bug otherwise)
            raise RuntimeError("a validated row has no input split")
        return [str(split) for split in chunk.input_split]
    return [
        assign_split(
            subject,
            seed=params.seed,
            validation_fraction=params.validation_fraction,
            test_fraction=params.test_fraction,
        )
        for subject in chunk.subject_id
    ]


def _validate_only(raw: RawChunk) -> ValidatedChunk:
    return validate_chunk(raw, _WORKER["params"].validation)


def _validate_and_fit(raw: RawChunk) -> tuple[ValidatedChunk, BudgetResult]:
    return _fit_chunk(_validate_only(raw))


# ----------------------------------------------------------------------------------------------------------------
# streaming helpers


def _bounded_imap(fn: Callable[[Any], Any], items: Iterable[Any], workers: int, params: ChunkParams) -> Iterator[Any]:
    """``map(fn, items)`` in ``workers`` spawn processes, in order, with at most ``2 * workers`` items in flight.

    (``Pool.imap`` would read the whole input ahead into its task queue.) With ``workers == 0``, or a single
    item, everything runs in this process.
    """
    iterator = iter(items)
    first = next(iterator, None)
    if first is None:
        return
    second = next(iterator, None) if workers > 0 else None
    if second is None:
        if _WORKER.get("params") != params:
            _init_worker(params, single_threaded=False)
        yield fn(first)
        yield from map(fn, iterator)
        return
    # spawn, not fork: the parent holds tokenizer threads that fork would copy mid-lock.
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=_init_worker, initargs=(params, True)) as pool:
        pending: deque[Any] = deque([pool.apply_async(fn, (first,)), pool.apply_async(fn, (second,))])
        for item in iterator:
            while len(pending) >= 2 * workers:
                yield pending.popleft().get()
            pending.append(pool.apply_async(fn, (item,)))
        while pending:
            yield pending.popleft().get()


class _NoProgress:
    def update(self, n: int) -> None:
        pass


_NO_PROGRESS = _NoProgress()


def _progress(desc: str, total: int | None) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="rows", disable=not show_progress(), mininterval=2.0)


@dataclass
class _Totals:
    rows_read: int = 0
    rejects: list[dict[str, Any]] = field(default_factory=list)
    stats: Counter[str] = field(default_factory=Counter)
    prefixes: Counter[str] = field(default_factory=Counter)
    shortening: Counter[str] = field(default_factory=Counter)

    def absorb(self, chunk: ValidatedChunk) -> None:
        self.rows_read += chunk.rows_read
        self.rejects.extend(chunk.rejects)
        self.stats.update(chunk.stats)
        self.prefixes.update(chunk.prefixes)


def _fitted_chunks(
    info: SourceInfo, cfg: PrepareDataConfig, totals: _Totals, bar: Any, *, rare_word_filter: bool = True
) -> Generator[tuple[ValidatedChunk, BudgetResult], None, None]:
    """Validated, normalised and fitted chunks in input order (seed mode: via a staging file, see below).

    ``rare_word_filter=False`` (``--debug``) streams seed-mode chunks without the corpus-level rare-word filter,
    which would need the whole input and a staging file first.
    """
    params = ChunkParams.from_config(cfg)
    raw = iter_chunks(info, cfg)
    if cfg.sample_fraction < 1.0:
        raw = sample_chunks(raw, cfg.sample_fraction, cfg.seed, totals.stats)
    if cfg.normalization == "clinical" or not rare_word_filter:
        for chunk, fitted in _bounded_imap(_validate_and_fit, raw, cfg.num_workers, params):
            totals.absorb(chunk)
            bar.update(chunk.rows_read)
            yield chunk, fitted
        return
    staging = Path(cfg.output_dir) / _STAGING_DIR
    validated = _bounded_imap(_validate_only, raw, cfg.num_workers, params)

    def counted() -> Iterator[ValidatedChunk]:
        for chunk in validated:
            totals.absorb(chunk)
            bar.update(chunk.rows_read)
            yield chunk

    filtered = _staged_seed_chunks(counted(), staging, cfg, totals)
    yield from _bounded_imap(_fit_chunk, filtered, cfg.num_workers, params)


def _staged_seed_chunks(
    chunks: Iterator[ValidatedChunk], staging: Path, cfg: PrepareDataConfig, totals: _Totals
) -> Iterator[ValidatedChunk]:
    """Seed mode: stage every validated row, count words, then replay the rows with the rare-word filter."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = ("rows", "note_id", "subject_id", "note", "summary", "gt_entities", "input_split")
    arrow = pa.schema([("rows", pa.int64())] + [(name, pa.string()) for name in columns[1:]])
    private_dir(staging)
    path = create_private(staging / "seed_pass1.parquet")
    counts: Counter[str] = Counter()
    with pq.ParquetWriter(path, arrow) as writer:
        for chunk in chunks:
            counts.update(chunk.word_counts or {})
            writer.write_table(pa.table({name: getattr(chunk, name) for name in columns}, schema=arrow))
    totals.stats["seed_vocabulary"] = len(counts)
    totals.stats["seed_vocabulary_kept"] = sum(1 for v in counts.values() if v >= cfg.seed_min_word_count)
    for batch in pq.ParquetFile(path).iter_batches(batch_size=cfg.chunk_rows):
        data = batch.to_pydict()
        out = ValidatedChunk()
        for i, row in enumerate(data["rows"]):
            note = filter_rare_words(data["note"][i], counts, cfg.seed_min_word_count)
            summary = filter_rare_words(data["summary"][i], counts, cfg.seed_min_word_count)
            if not note or not summary:
                reason = "empty_note" if not note else "empty_target"
                totals.rejects.append(
                    reject_record(row, data["note_id"][i], reason, "nothing left after the rare-word filter")
                )
                continue
            out.rows.append(row)
            out.note_id.append(data["note_id"][i])
            out.subject_id.append(data["subject_id"][i])
            out.note.append(note)
            out.summary.append(summary)
            out.gt_entities.append(data["gt_entities"][i])
            out.input_split.append(data["input_split"][i])
        yield out


# ----------------------------------------------------------------------------------------------------------------
# the stage


@dataclass
class PrepareResult:
    output_dir: Path
    card: dict[str, Any]
    manifest: dict[str, Any]


def _source_fingerprint(info: SourceInfo, cfg: PrepareDataConfig) -> dict[str, Any]:
    described = info.describe()
    if info.path is not None:
        described.update(path=str(info.path), bytes=info.path.stat().st_size, sha256=sha256_file(info.path))
    else:
        described.update(
            rows=cfg.synthetic_rows,
            profile=cfg.synthetic_profile,
            schema=cfg.synthetic_schema,
            seed=cfg.seed,
            defects=list(cfg.synthetic_defects),
        )
    return described


class _SplitWriters:
    """Three Parquet writers (temporary names until :meth:`commit`) plus per-split length statistics."""

    def __init__(self, out: Path) -> None:
        import pyarrow.parquet as pq

        self.out = out
        self.schema = output_arrow_schema()
        self.tmp = {split: create_private(out / f".{schema.SPLIT_FILES[split]}.tmp") for split in schema.SPLITS}
        self.writers = {
            split: pq.ParquetWriter(self.tmp[split], self.schema, compression="zstd") for split in schema.SPLITS
        }
        self.lengths: dict[str, dict[str, list[np.ndarray]]] = {split: {} for split in schema.SPLITS}

    def write(self, split: str, columns: dict[str, list[Any]], lengths: dict[str, np.ndarray]) -> None:
        import pyarrow as pa

        self.writers[split].write_table(pa.table(columns, schema=self.schema))
        for name, values in lengths.items():
            self.lengths[split].setdefault(name, []).append(values)

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()

    def commit(self) -> None:
        for split in schema.SPLITS:
            os.replace(self.tmp[split], self.out / schema.SPLIT_FILES[split])

    def discard(self) -> None:
        for path in self.tmp.values():
            path.unlink(missing_ok=True)

    def length_arrays(self) -> dict[str, dict[str, np.ndarray]]:
        return {
            split: {
                name: np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
                for name, parts in self.lengths[split].items()
            }
            for split in schema.SPLITS
        }


def _kept_rows(chunk: ValidatedChunk, fitted: BudgetResult, seen: dict[str, int], totals: _Totals) -> Iterator[int]:
    """Indices of the chunk's rows that are kept; summary_too_long and duplicate rows go to ``totals.rejects``.

    The first row of a ``note_id`` that passed every other check wins (``seen``: note_id -> its row number).
    """
    for j, (row, note_id) in enumerate(zip(chunk.rows, chunk.note_id)):
        if j in fitted.rejected:
            totals.rejects.append(reject_record(row, note_id, "summary_too_long", fitted.rejected[j]))
            continue
        first = seen.get(note_id)
        if first is not None:
            totals.rejects.append(reject_record(row, note_id, "duplicate_note_id", f"first kept at row {first}"))
            continue
        seen[note_id] = row
        yield j


def _write_chunk(
    chunk: ValidatedChunk,
    fitted: BudgetResult,
    cfg: PrepareDataConfig,
    seen: dict[str, int],
    tracker: SplitTracker,
    writers: _SplitWriters,
    totals: _Totals,
) -> None:
    """Reject summary_too_long and duplicate rows, assign splits and append the rest to the split files."""
    by_split: dict[str, list[int]] = {split: [] for split in schema.SPLITS}
    splits = _row_splits(chunk, ChunkParams.from_config(cfg))
    for j in _kept_rows(chunk, fitted, seen, totals):
        tracker.add(chunk.subject_id[j], splits[j])
        by_split[splits[j]].append(j)
    for split, js in by_split.items():
        if not js:
            continue
        idx = np.asarray(js, dtype=np.int64)
        notes = [fitted.notes[j] for j in js]
        original = [len(chunk.note[j]) for j in js]
        columns = {
            "note_id": [chunk.note_id[j] for j in js],
            "subject_id": [chunk.subject_id[j] for j in js],
            "source_row": [chunk.rows[j] for j in js],
            "note": notes,
            "summary": [chunk.summary[j] for j in js],
            "note_chars_original": original,
            "note_shortened": fitted.shortened[idx].tolist(),
            "prompt_tokens": fitted.prompt_tokens[idx].tolist(),
            "completion_tokens": fitted.completion_tokens[idx].tolist(),
            "gt_entities": [chunk.gt_entities[j] for j in js],
        }
        lengths = {
            "prompt_tokens": fitted.prompt_tokens[idx],
            "completion_tokens": fitted.completion_tokens[idx],
            "total_tokens": fitted.total_tokens[idx],
            "note_chars": np.fromiter(map(len, notes), dtype=np.int64, count=len(notes)),
            "note_chars_original": np.asarray(original, dtype=np.int64),
            "summary_chars": np.fromiter((len(chunk.summary[j]) for j in js), dtype=np.int64, count=len(js)),
            "note_shortened": fitted.shortened[idx].astype(np.int64),
            "target_entities": fitted.target_entities[idx],
            "supported_before": fitted.supported_before[idx],
            "supported_after": fitted.supported_after[idx],
        }
        writers.write(split, columns, lengths)


def _mark_failed(out: Path, message: str) -> None:
    manifest = read_manifest(out) or {}
    manifest.update(status="failed", failure=message)
    if is_main_process():
        atomic_write_json(out / MANIFEST_NAME, manifest)


def run_prepare_data(cfg: PrepareDataConfig) -> PrepareResult:
    """Run the stage into ``cfg.output_dir`` and return the data card and manifest.

    Raises:
        ConfigError: bad source, missing column, tokenizer without chat template (before heavy work).
        UserError: no row was kept (a header-only input), the reject fraction exceeds ``max_reject_fraction``, or a
            pre-split input puts a patient in two splits (outputs and rejects.jsonl are written for diagnosis; the
            manifest is marked failed). Any error after the manifest was started marks it failed.
    """
    began = time.perf_counter()
    info = inspect_source(cfg)
    tokenizer = load_tokenizer(cfg.tokenizer_name_or_path, field="tokenizer_name_or_path")
    out = Path(cfg.output_dir)
    warn_if_replacing(out, cfg.STAGE)
    inputs = {
        "source": _source_fingerprint(info, cfg),
        "tokenizer": {
            "name_or_path": cfg.tokenizer_name_or_path,
            "chat_template_sha256": chat_template_fingerprint(tokenizer),
        },
    }
    counting_mode = TokenCounter(tokenizer, cfg.instruction, mode=cfg.token_counting).mode
    private_dir(out)  # the split files hold patient text: owner-only, like the files in it
    start_run(out, cfg, inputs=inputs)
    try:
        return _run_started(cfg, info, tokenizer, out, counting_mode, began)
    except Exception as exc:
        # Never leave a `running` manifest behind a refusal (a truncated .gz, an unreadable row): say what failed.
        if (read_manifest(out) or {}).get("status") == "running":
            _mark_failed(out, f"{exc.__class__.__name__}: {exc}")
        raise


def _run_started(
    cfg: PrepareDataConfig, info: SourceInfo, tokenizer: Any, out: Path, counting_mode: str, began: float
) -> PrepareResult:
    from dischargesum.data.card import build_card, write_length_plots

    staging = out / _STAGING_DIR
    totals = _Totals()
    tracker = SplitTracker()
    seen: dict[str, int] = {}
    writers = _SplitWriters(out)
    bar = _progress("prepare_data", cfg.synthetic_rows if info.format == "synthetic" else None)
    try:
        for chunk, fitted in _fitted_chunks(info, cfg, totals, bar):
            totals.shortening.update(fitted.stats)
            _write_chunk(chunk, fitted, cfg, seen, tracker, writers, totals)
        writers.close()
    except BaseException:
        writers.close()
        writers.discard()
        raise
    finally:
        bar.close()
        shutil.rmtree(staging, ignore_errors=True)
    writers.commit()
    totals.rejects.sort(key=lambda r: (r["row"] is None, r["row"] if r["row"] is not None else 0))
    _write_rejects(out / schema.REJECTS_FILE, totals.rejects)
    lengths = writers.length_arrays()
    outputs = {name: fingerprint_file(out / name, out) for name in (*schema.SPLIT_FILES.values(), schema.REJECTS_FILE)}
    data_fingerprint = canonical_hash([outputs[schema.SPLIT_FILES[s]]["sha256"] for s in schema.SPLITS])
    plots = write_length_plots(out, lengths, cfg.max_seq_length) if cfg.plots else []
    for name in plots:
        outputs[name] = fingerprint_file(out / name, out)
    card = build_card(
        cfg=cfg,
        info=info,
        tokenizer=tokenizer,
        rows_read=totals.rows_read,
        rejects=totals.rejects,
        tracker=tracker,
        lengths=lengths,
        stats=totals.stats,
        prefixes=totals.prefixes,
        shortening=totals.shortening,
        files=outputs,
        data_fingerprint=data_fingerprint,
        seed_backends=seed_backends() if cfg.normalization == "seed" else None,
        counting_mode=counting_mode,
    )
    atomic_write_json(out / schema.DATA_CARD_FILE, card)
    outputs[schema.DATA_CARD_FILE] = fingerprint_file(out / schema.DATA_CARD_FILE, out)
    kept = sum(tracker.rows.values())
    if kept + len(totals.rejects) != totals.rows_read:  # a bug, not a user error: never silently lose a row
        raise RuntimeError(f"accounting broken: {totals.rows_read} rows read, {kept} kept + {len(totals.rejects)}")
    problems = []
    if kept == 0:
        problems.append(
            f"no row to train on: {totals.rows_read} data row(s) read from {cfg.source!r}"
            + (f", all {len(totals.rejects)} rejected (see {out / schema.REJECTS_FILE})" if totals.rejects else "")
            + "; point `source` at a file with note/summary rows (a header alone is not a dataset)"
        )
    if tracker.crossing_patients:
        problems.append(
            f"{tracker.crossing_patients} patient(s) have notes in more than one split of `input_split_column` = "
            f"{cfg.input_split_column!r}; fix the input split or unset input_split_column to split by patient hash"
        )
    if card["reject_fraction"] > cfg.max_reject_fraction:
        top = ", ".join(f"{k}: {v}" for k, v in Counter(card["rejects_by_reason"]).most_common(4))
        problems.append(
            f"{len(totals.rejects)} of {totals.rows_read} rows rejected ({card['reject_fraction']:.2%}) > "
            f"max_reject_fraction {cfg.max_reject_fraction:.2%} ({top}). See {out / schema.REJECTS_FILE}; if the "
            "input changed its layout, fix `column_mapping`; if the rejects are expected, raise max_reject_fraction"
        )
    if problems:
        message = "; ".join(problems)
        _mark_failed(out, message)
        raise UserError(f"prepare_data: {message}.")
    manifest = finish_run(
        out,
        outputs,
        data_fingerprint=data_fingerprint,
        rows={split: tracker.rows.get(split, 0) for split in schema.SPLITS},
        rows_rejected=len(totals.rejects),
        seconds=round(time.perf_counter() - began, 1),
    )
    logger.info(
        "prepared %d rows: %s, %d rejected (%s) in %.1f s -> %s",
        totals.rows_read,
        ", ".join(f"{s} {tracker.rows.get(s, 0)}" for s in schema.SPLITS),
        len(totals.rejects),
        ", ".join(f"{k} {v}" for k, v in sorted(card["rejects_by_reason"].items()) if v) or "none",
        time.perf_counter() - began,
        out,
    )
    return PrepareResult(out, card, manifest)


def _write_rejects(path: Path, rejects: list[dict[str, Any]]) -> None:
    import json

    tmp = path.with_name(f".{path.name}.tmp")
    with open_private(tmp, "w", encoding="utf-8") as fh:  # reject details may quote ids
        for record in rejects:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------------
# --debug N


def debug_examples(cfg: PrepareDataConfig) -> str:
    """N rendered training examples from the start of the input, trained tokens inside ⟦ ⟧ (nothing is written).

    Runs the stage's own chunk loop (:func:`_fitted_chunks`: read, sample, validate, normalise, fit the length
    budget) and duplicate check (:func:`_kept_rows`) in this process, so the examples are the first N rows the full
    run would keep — the seed mode's corpus-level rare-word filter excepted, which needs the whole input.

    Raises:
        ConfigError: as :func:`run_prepare_data`.
    """
    info = inspect_source(cfg)
    tokenizer = load_tokenizer(cfg.tokenizer_name_or_path, field="tokenizer_name_or_path")
    # in-process (no worker pool for a handful of rows), in chunks no larger than the examples asked for need
    cfg = dataclasses.replace(cfg, num_workers=0, chunk_rows=min(cfg.chunk_rows, max(cfg.debug, _DEBUG_CHUNK_ROWS)))
    _init_worker(ChunkParams.from_config(cfg), single_threaded=False)
    _WORKER["counter"] = TokenCounter(tokenizer, cfg.instruction, mode=cfg.token_counting)  # reuse the loaded one
    totals = _Totals()
    seen: dict[str, int] = {}
    blocks: list[str] = [
        f"prepare_data --debug {cfg.debug}: tokenizer {cfg.tokenizer_name_or_path}, max_seq_length "
        f"{cfg.max_seq_length}, normalization {cfg.normalization}"
        + (" (rare-word filter not applied in --debug)" if cfg.normalization == "seed" else "")
        + ".\nTokens inside ⟦ ⟧ are trained on (completion_mask = 1); all others have label -100.\n"
    ]
    shown = 0
    chunks = _fitted_chunks(info, cfg, totals, _NO_PROGRESS, rare_word_filter=False)
    for chunk, fitted in chunks:
        wanted = list(itertools.islice(_kept_rows(chunk, fitted, seen, totals), cfg.debug - shown))
        tokenized = tokenize_examples(
            tokenizer, [fitted.notes[j] for j in wanted], [chunk.summary[j] for j in wanted], cfg.instruction
        )
        for m, j in enumerate(wanted):
            blocks.append(
                f"===== example {shown + 1}: row {chunk.rows[j]}, note_id {chunk.note_id[j]}, "
                f"note_shortened {bool(fitted.shortened[j])}, prompt {int(tokenized.prompt_lengths[m])} tokens, "
                f"trained {int(tokenized.completion_lengths[m])} tokens, total {int(tokenized.total_lengths[m])} / "
                f"{cfg.max_seq_length} =====\n"
                + render_loss_mask(tokenizer, tokenized.input_ids[m], int(tokenized.completion_starts[m]))
                + "\n"
            )
            shown += 1
        if shown >= cfg.debug:
            break
    chunks.close()
    if shown < cfg.debug:
        blocks.append(f"(only {shown} valid rows in the input)\n")
    reasons = Counter(r["reason"] for r in totals.rejects)
    if reasons:
        blocks.append(f"rejected while reading: {dict(sorted(reasons.items()))}\n")
    return "\n".join(blocks)


def check_output_dir(cfg: PrepareDataConfig) -> None:
    """Refuse an output directory that is the input's directory or holds another stage's artifact.

    Raises:
        ConfigError: ``output_dir`` holds a manifest written by another stage.
    """
    manifest = read_manifest(cfg.output_dir)
    if manifest is not None and manifest.get("stage") not in (None, PrepareDataConfig.STAGE):
        raise ConfigError(
            f"prepare_data: `output_dir` = {cfg.output_dir!r} holds a {manifest.get('stage')} run; choose another "
            "directory (prepare_data replaces the files of its own earlier runs only)."
        )
