"""Input sources for prepare_data: schema detection up front, then bounded-memory chunks of raw values.

Sources (``PrepareDataConfig.source``):

- a ``.csv`` / ``.csv.gz`` file — the Kaggle mirror ``BHC_MIMIC-IV.csv``, PhysioNet's MIMIC-IV-Ext-BHC CSV or
  any CSV. Read record by record with Python's ``csv`` module (quoted newlines allowed; ``\n``, ``\r\n`` and
  CR-only line endings), decoded with ``surrogateescape`` so invalid UTF-8 survives to validation and is found per
  row, not as a crash. Header names are stripped (``note_id, input, target`` works). A record with the wrong
  number of fields is a ``malformed_row`` with its exact ``row`` and the line it starts on. (Arrow's CSV reader,
  used before, skipped such records without saying where, which shifted the ``source_row`` of every later row.)
  A header that names a used column twice is refused: which copy is meant cannot be known.
- a ``.jsonl`` / ``.jsonl.gz`` file — one JSON object per line, decoded with ``surrogateescape`` so invalid UTF-8
  survives to validation. Blank lines are not rows. A line that is not a JSON object is ``malformed_row``. The
  columns are the union of the keys of the first ``JSONL_HEADER_SAMPLE`` records (a key the first record lacks
  is still found).

A file that ends early or is corrupt (a truncated ``.gz``, a record cut off by a copy) is refused with exit code 2
naming the file, the last data row read and the fix; ``source_row`` stays exact either way.
- a ``.parquet`` file — read by row batches (Parquet strings are UTF-8 by format).
- ``synthetic`` — :func:`dischargesum.data.synthetic.generate_rows` with the recipe's size, profile, schema,
  seed and defects.
- ``kagglehub:<owner>/<dataset>`` — downloads through ``kagglehub`` when it is installed and credentials exist,
  then reads the CSV inside. The licensed source is PhysioNet; use the mirror only where your data use agreement
  allows it.

Schemas: ``kaggle`` (``note_id, subject_id, hadm_id, ..., input, target``), ``physionet`` (``note_id, input,
target, input_tokens, target_tokens`` — no ``subject_id``; it is derived from ``note_id``) or ``custom`` (any
columns, mapped by ``column_mapping``). :func:`inspect_source` detects the schema from the header and raises
:class:`ConfigError` (exit code 2) when a required column is missing — before anything heavy is loaded.

``source_row`` numbers are 0-based over the data records of the file (header excluded).
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import itertools
import json
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dischargesum.config import ConfigError, PrepareDataConfig
from dischargesum.logging_utils import get_logger

logger = get_logger(__name__)

# Our field names. note_id, input and target are required; subject_id is derived from MIMIC note ids when absent.
FIELDS = ("note_id", "subject_id", "input", "target", "gt_entities")
REQUIRED_FIELDS = ("note_id", "input", "target")
KAGGLE_SIGNATURE = frozenset({"note_id", "subject_id", "hadm_id", "input", "target"})
PHYSIONET_SIGNATURE = frozenset({"note_id", "input", "target", "input_tokens", "target_tokens"})
SUFFIXES = {".csv": "csv", ".csv.gz": "csv", ".jsonl": "jsonl", ".jsonl.gz": "jsonl", ".parquet": "parquet"}
KAGGLEHUB_PREFIX = "kagglehub:"
KAGGLE_CSV_NAME = "BHC_MIMIC-IV.csv"
# Python's csv refuses fields over 128 KiB by default; a note may hold 200k characters (note_too_long decides).
CSV_FIELD_LIMIT = 1 << 30
# Records whose keys make up a JSONL file's columns (the first record may lack an optional key).
JSONL_HEADER_SAMPLE = 10_000
# What a file that ends early or is corrupt raises while it is read (gzip: EOFError / BadGzipFile / zlib.error).
_READ_ERRORS = (EOFError, OSError, zlib.error, csv.Error)


@dataclass
class SourceInfo:
    """What :func:`inspect_source` found: format, columns, detected schema and the column of each field."""

    source: str
    path: Path | None
    format: str  # csv | jsonl | parquet | synthetic
    columns: list[str]
    schema: str  # kaggle | physionet | custom
    mapping: dict[str, str]  # our field -> the file's column (only fields the file has)
    split_column: str | None = None

    def describe(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "format": self.format,
            "schema_detected": self.schema,
            "columns_found": self.columns,
            "column_mapping_used": self.mapping,
            "input_split_column": self.split_column,
        }


@dataclass
class RawChunk:
    """Raw values of input records: ``values[field][i]`` belongs to row :meth:`row_number` ``(i)``."""

    start_row: int
    values: dict[str, list[Any]]
    malformed: list[str] = field(default_factory=list)  # details of records the parser skipped (row unknown)
    # Source row of each value when the rows are not consecutive (after `sample_fraction`); None: start_row + i.
    row_numbers: list[int] | None = None

    def __len__(self) -> int:
        return len(self.values["note_id"])

    def row_number(self, i: int) -> int:
        return self.start_row + i if self.row_numbers is None else self.row_numbers[i]


# ----------------------------------------------------------------------------------------------------------------
# inspection


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in sorted(SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return suffix
    return path.suffix.lower()


def _open_binary(path: Path) -> io.BufferedIOBase:
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")  # type: ignore[return-value]


def _unreadable(path: Path, what: str, exc: BaseException) -> ConfigError:
    compressed = path.name.lower().endswith(".gz")
    fix = "The file is truncated or corrupt (an interrupted download or copy?): fetch it again" + (
        f" and check it with `gzip -t {path}`." if compressed else "."
    )
    detail = str(exc).rstrip(". ")
    return ConfigError(f"prepare_data: `source` = {path}: {what}: {exc.__class__.__name__}: {detail}. {fix}")


def _text_stream(fh: io.BufferedIOBase) -> io.TextIOWrapper:
    # newline="": the csv module sees the file's own line endings (\n, \r\n or CR-only) and quoted newlines intact.
    return io.TextIOWrapper(fh, encoding="utf-8-sig", errors="surrogateescape", newline="")  # type: ignore[arg-type]


def _csv_header(path: Path) -> list[str]:
    csv.field_size_limit(CSV_FIELD_LIMIT)
    try:
        with _open_binary(path) as fh:
            return [c.strip() for c in next(csv.reader(_text_stream(fh)), [])]
    except _READ_ERRORS as exc:
        raise _unreadable(path, "its header line could not be read", exc) from None


def _jsonl_header(path: Path) -> list[str]:
    """Keys of the first :data:`JSONL_HEADER_SAMPLE` JSON objects, in order of first appearance."""
    keys: dict[str, None] = {}
    first_error: ValueError | None = None
    seen = 0
    try:
        with _open_binary(path) as fh:
            for line in fh:
                if not line.strip():
                    continue
                seen += 1
                try:
                    record = json.loads(line.decode("utf-8", errors="surrogateescape"))
                except ValueError as exc:  # a malformed_row later; the other records still name the columns
                    first_error = first_error or exc
                    record = None
                if isinstance(record, dict):
                    keys.update(dict.fromkeys(record))
                if seen >= JSONL_HEADER_SAMPLE:
                    break
    except _READ_ERRORS as exc:
        if not keys:
            raise _unreadable(path, "its first records could not be read", exc) from None
    if not keys and first_error is not None:
        raise ConfigError(
            f"prepare_data: `source` = {path}: no record among the first {seen} is a JSON object ({first_error}); "
            "a .jsonl file needs one JSON object per line."
        )
    return list(keys)


def _parquet_header(path: Path) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return list(pq.ParquetFile(path).schema_arrow.names)
    except (pa.ArrowInvalid, OSError) as exc:
        raise _unreadable(path, "it is not a readable Parquet file", exc) from None


def _resolve_kagglehub(handle: str) -> Path:
    """Download (or reuse the cached copy of) a Kaggle dataset with kagglehub and return its CSV.

    Raises:
        ConfigError: kagglehub is not installed, the download fails, or the dataset has no CSV.
    """
    try:
        import kagglehub
    except ImportError as exc:
        raise ConfigError(
            f"prepare_data: `source` = {KAGGLEHUB_PREFIX}{handle} needs the `kagglehub` package (pip install "
            "kagglehub) and Kaggle credentials. The licensed source is PhysioNet's MIMIC-IV-Ext-BHC: download its "
            "CSV and set `source` to that file instead."
        ) from exc
    try:
        directory = Path(kagglehub.dataset_download(handle))
    except Exception as exc:  # kagglehub raises many types (auth, network, not found)
        raise ConfigError(f"prepare_data: kagglehub could not fetch {handle!r}: {exc}") from exc
    preferred = directory / KAGGLE_CSV_NAME
    if preferred.is_file():
        return preferred
    found = sorted(directory.rglob("*.csv"))
    if not found:
        raise ConfigError(f"prepare_data: kagglehub dataset {handle!r} ({directory}) holds no CSV file.")
    return found[0]


def inspect_source(cfg: PrepareDataConfig) -> SourceInfo:
    """Find the source's format and columns, detect its schema and map our fields to its columns.

    Raises:
        ConfigError: the file is missing or of an unsupported type, the schema named in the config does not
            match the columns, or a required column (or ``input_split_column``) is missing — the message lists the
            columns found and the ``column_mapping`` key to set.
    """
    if cfg.source == "synthetic":
        from dischargesum.data.synthetic import ENTITY_COLUMN, KAGGLE_COLUMNS, PHYSIONET_COLUMNS

        columns = [*(KAGGLE_COLUMNS if cfg.synthetic_schema == "kaggle" else PHYSIONET_COLUMNS), ENTITY_COLUMN]
        path, fmt = None, "synthetic"
    else:
        if cfg.source.startswith(KAGGLEHUB_PREFIX):
            path = _resolve_kagglehub(cfg.source[len(KAGGLEHUB_PREFIX) :])
        else:
            path = Path(cfg.source).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"prepare_data: `source` = {cfg.source!r} is not a file. Point it at the PhysioNet "
                "MIMIC-IV-Ext-BHC CSV (or another CSV / JSONL / Parquet file), or use `synthetic`."
            )
        suffix = _suffix(path)
        if suffix not in SUFFIXES:
            raise ConfigError(
                f"prepare_data: `source` = {cfg.source!r} has suffix {suffix!r}; use one of "
                f"{', '.join(SUFFIXES)} (or `synthetic`)."
            )
        fmt = SUFFIXES[suffix]
        columns = {"csv": _csv_header, "jsonl": _jsonl_header, "parquet": _parquet_header}[fmt](path)
    present = set(columns)
    mapping = {name: name for name in FIELDS if name in present}
    if cfg.schema == "auto":
        if cfg.column_mapping:
            schema = "custom"
        elif present >= KAGGLE_SIGNATURE:
            schema = "kaggle"
        elif present >= PHYSIONET_SIGNATURE:
            schema = "physionet"
        else:
            schema = "custom"
    else:
        schema = cfg.schema
        signature = {"kaggle": KAGGLE_SIGNATURE, "physionet": PHYSIONET_SIGNATURE}.get(schema)
        if signature is not None and not signature <= present:
            raise ConfigError(
                f"prepare_data: `schema` is {schema!r} but `source` = {cfg.source!r} lacks the column(s) "
                f"{sorted(signature - present)}; found {columns}. Use `schema: auto`, or `schema: custom` with "
                "`column_mapping`."
            )
    mapping.update(cfg.column_mapping)
    missing = [name for name in REQUIRED_FIELDS if mapping.get(name) not in present]
    mapped_missing = {k: v for k, v in cfg.column_mapping.items() if v not in present}
    if missing or mapped_missing:
        what = sorted(set(missing) | set(mapped_missing))
        example = ", ".join(f'"{name}": "<your column>"' for name in what)
        tried = {name: mapping.get(name, name) for name in what}
        detected = (
            schema
            if schema != "custom"
            else f"neither kaggle ({', '.join(sorted(KAGGLE_SIGNATURE))}) nor physionet "
            f"({', '.join(sorted(PHYSIONET_SIGNATURE))})"
        )
        raise ConfigError(
            f"prepare_data: `source` = {cfg.source!r} ({fmt}) has no column for {what} (looked for {tried}). "
            f"Columns found: {columns}. Schema detected: {detected}. Set `column_mapping` to name the file's "
            f"columns, e.g. --column_mapping '{{{example}}}'."
        )
    if cfg.input_split_column is not None and cfg.input_split_column not in present:
        raise ConfigError(
            f"prepare_data: `input_split_column` = {cfg.input_split_column!r} is not a column of {cfg.source!r}; "
            f"columns found: {columns}. Fix the name or unset it (`--input_split_column none`) to split by patient "
            "hash."
        )
    mapping = {k: v for k, v in mapping.items() if v in present}
    used = [*mapping.values(), *([cfg.input_split_column] if cfg.input_split_column else [])]
    repeated = sorted({c for c in used if columns.count(c) > 1})
    if repeated:
        raise ConfigError(
            f"prepare_data: `source` = {cfg.source!r} has more than one column named {repeated} (header: {columns}); "
            "which one holds the data cannot be known. Rename or drop the extra column(s) in the file, or map our "
            "field to a uniquely named column with `column_mapping`."
        )
    info = SourceInfo(cfg.source, path, fmt, list(columns), schema, mapping, cfg.input_split_column)
    logger.info(
        "source %s: %s, schema %s detected; columns used %s%s",
        cfg.source,
        fmt,
        schema,
        mapping,
        "" if "subject_id" in mapping else " (no subject_id column: derived from MIMIC note_id)",
    )
    return info


# ----------------------------------------------------------------------------------------------------------------
# reading


def _wanted(info: SourceInfo) -> dict[str, str]:
    wanted = dict(info.mapping)
    if info.split_column is not None:
        wanted["split"] = info.split_column
    return wanted


def _empty_values(wanted: dict[str, str]) -> dict[str, list[Any]]:
    return {name: [] for name in (*FIELDS, "split")}


def _fill(values: dict[str, list[Any]], n: int) -> dict[str, list[Any]]:
    for name, column in values.items():
        if not column:
            values[name] = [None] * n
    return values


def iter_chunks(info: SourceInfo, cfg: PrepareDataConfig) -> Iterator[RawChunk]:
    """Yield the source as :class:`RawChunk` objects of at most ``cfg.chunk_rows`` records, in file order."""
    reader = {
        "csv": _iter_csv,
        "jsonl": _iter_jsonl,
        "parquet": _iter_parquet,
        "synthetic": _iter_synthetic,
    }[info.format]
    yield from reader(info, cfg)


def _sample_unit(key: str) -> float:
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def row_in_sample(row: int, fraction: float, seed: int) -> bool:
    """Whether source row ``row`` is in the ``fraction`` sample: a keyed hash of (seed, row number), so the same
    file, seed and fraction always give the same rows, a larger fraction keeps every row of a smaller one, and the
    sample is spread over the whole file (MIMIC exports are ordered by patient)."""
    return _sample_unit(f"sample:{seed}:{row}") < fraction


def sample_chunks(chunks: Iterable[RawChunk], fraction: float, seed: int, stats: Counter[str]) -> Iterator[RawChunk]:
    """Keep the rows of ``chunks`` that :func:`row_in_sample` selects; ``stats["sample_rows_skipped"]`` counts the
    others. Records the parser could not attribute to a row are kept when their detail text hashes into the sample,
    so a sample's reject fraction stays an estimate of the file's."""
    for chunk in chunks:
        rows = [chunk.row_number(i) for i in range(len(chunk))]
        keep = [i for i, row in enumerate(rows) if row_in_sample(row, fraction, seed)]
        malformed = [d for d in chunk.malformed if _sample_unit(f"sample:{seed}:{d}") < fraction]
        stats["sample_rows_skipped"] += len(chunk) - len(keep) + len(chunk.malformed) - len(malformed)
        if keep or malformed:
            values = {name: [column[i] for i in keep] for name, column in chunk.values.items()}
            yield RawChunk(chunk.start_row, values, malformed, row_numbers=[rows[i] for i in keep])


def _iter_synthetic(info: SourceInfo, cfg: PrepareDataConfig) -> Iterator[RawChunk]:
    from dischargesum.data.synthetic import generate_rows

    rows = generate_rows(
        cfg.synthetic_rows,
        profile=cfg.synthetic_profile,
        schema=cfg.synthetic_schema,
        seed=cfg.seed,
        defects=tuple(cfg.synthetic_defects),
    )
    wanted = _wanted(info)
    start = 0
    while batch := list(itertools.islice(rows, cfg.chunk_rows)):
        values = _empty_values(wanted)
        for name, column in wanted.items():
            values[name] = [row.get(column) for row in batch]
        yield RawChunk(start, _fill(values, len(batch)))
        start += len(batch)


def _iter_jsonl(info: SourceInfo, cfg: PrepareDataConfig) -> Iterator[RawChunk]:
    assert info.path is not None
    wanted = _wanted(info)
    start = 0
    values = _empty_values(wanted)
    malformed_rows: dict[int, str] = {}
    count = 0
    line_number = 0
    with _open_binary(info.path) as fh:
        lines = iter(fh)
        while True:
            try:
                line = next(lines, None)
            except _READ_ERRORS as exc:
                raise _unreadable(
                    info.path, f"reading stopped after {start + count} data rows (line {line_number})", exc
                ) from None
            if line is None:
                break
            line_number += 1
            if not line.strip():
                continue
            try:
                record = json.loads(line.decode("utf-8", errors="surrogateescape"))
            except ValueError as exc:
                record, malformed_rows[count] = None, f"line {line_number}: invalid JSON: {exc.__class__.__name__}"
            if record is not None and not isinstance(record, dict):
                record, malformed_rows[count] = (
                    None,
                    f"line {line_number}: a JSON {type(record).__name__}, not an object",
                )
            for name, column in wanted.items():
                values[name].append(record.get(column) if record is not None else _MALFORMED)
            count += 1
            if count == cfg.chunk_rows:
                yield _record_chunk(start, values, count, malformed_rows)
                start += count
                values, malformed_rows, count = _empty_values(wanted), {}, 0
    if count:
        yield _record_chunk(start, values, count, malformed_rows)


class _Malformed:
    """Marker for a value of a record that could not be parsed (validation rejects the row as malformed_row)."""

    def __repr__(self) -> str:
        return "<malformed>"

    def __reduce__(self) -> str:  # keep the singleton across worker processes
        return "_MALFORMED"


_MALFORMED = _Malformed()
MALFORMED = _MALFORMED


def _record_chunk(start: int, values: dict[str, list[Any]], n: int, malformed: dict[int, str]) -> RawChunk:
    chunk = RawChunk(start, _fill(values, n))
    if malformed:
        chunk.values["_malformed_detail"] = [malformed.get(i) for i in range(n)]
    return chunk


def _iter_parquet(info: SourceInfo, cfg: PrepareDataConfig) -> Iterator[RawChunk]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    assert info.path is not None
    wanted = _wanted(info)
    columns = sorted(set(wanted.values()))
    start = 0
    batches = pq.ParquetFile(info.path).iter_batches(batch_size=cfg.chunk_rows, columns=columns)
    while True:
        try:
            batch = next(batches, None)
        except (pa.ArrowInvalid, OSError) as exc:
            raise _unreadable(info.path, f"reading stopped after {start} data rows", exc) from None
        if batch is None:
            break
        values = _empty_values(wanted)
        for name, column in wanted.items():
            values[name] = batch.column(column).to_pylist()
        yield RawChunk(start, _fill(values, batch.num_rows))
        start += batch.num_rows


def _iter_csv(info: SourceInfo, cfg: PrepareDataConfig) -> Iterator[RawChunk]:
    """Records in file order; every record is a row (a wrong field count is a malformed row at its exact index)."""
    assert info.path is not None
    wanted = _wanted(info)
    index = {name: info.columns.index(column) for name, column in wanted.items()}
    n_fields = len(info.columns)
    csv.field_size_limit(CSV_FIELD_LIMIT)
    start = 0
    values = _empty_values(wanted)
    malformed_rows: dict[int, str] = {}
    count = 0
    with _open_binary(info.path) as fh:
        reader = csv.reader(_text_stream(fh))
        records = iter(reader)
        try:
            next(records, None)  # the header
            while True:
                line = reader.line_num + 1  # where the next record starts
                record = next(records, None)
                if record is None:
                    break
                if not record:  # a blank line is not a record (as Arrow and pandas read it)
                    continue
                if len(record) != n_fields:
                    malformed_rows[count] = f"line {line}: {len(record)} fields, expected {n_fields}"
                    for name in wanted:
                        values[name].append(_MALFORMED)
                else:
                    for name, i in index.items():
                        values[name].append(record[i])
                count += 1
                if count == cfg.chunk_rows:
                    yield _record_chunk(start, values, count, malformed_rows)
                    start += count
                    values, malformed_rows, count = _empty_values(wanted), {}, 0
        except _READ_ERRORS as exc:
            raise _unreadable(
                info.path, f"reading stopped after {start + count} data rows (line {reader.line_num})", exc
            ) from None
    if count:
        yield _record_chunk(start, values, count, malformed_rows)
