"""What a resumable, sharded stage (generate, compress) is made of: the processes, the crash-safe output and the
one protocol both stages run (:func:`run_sharded_stage`).

Resumability and crash safety (:class:`ShardedJsonlOutput`): every process appends its records to its own part
file (``<output_dir>/parts/<name>.rank<r>.jsonl``), flushed and fsynced after each batch. On (re)start the main
process repairs the part files — a torn last line (no newline, or not valid JSON) is dropped and that note is
generated again — and every rank skips the note_ids already written. At the end each rank drops a done marker;
the main process waits for all markers (files, not a collective, so an unbalanced shard never hits a NCCL timeout)
and merges the parts into ``<output_dir>/<name>`` in input order (atomic rename). A rerun whose settings differ
from the run that wrote the parts is refused (``overwrite: true`` starts over), so outputs never mix settings.
A torn line in the merged output itself is dropped on the next run and the output rebuilt from the parts. Part
files and merged outputs hold patient text: they are created 0600 in 0700 directories.
Across machines, ``output_dir`` must be on a filesystem every node sees: part files and markers are where the ranks
meet.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from dischargesum.artifacts import PARTS_DIR, read_jsonl
from dischargesum.config import ConfigError, InferenceConfig
from dischargesum.logging_utils import get_logger, show_progress
from dischargesum.manifest import (
    atomic_write_json,
    canonical_hash,
    fingerprint_file,
    finish_run,
    open_private,
    private_dir,
    start_run,
)

logger = get_logger(__name__)
T = TypeVar("T")
# Appends records to this rank's part file (one write, flush and fsync per call).
Append = Callable[[Iterable[dict[str, Any]]], None]


@dataclass(frozen=True)
class Processes:
    """This process's place among the ranks ``accelerate launch`` started (one process without a launcher)."""

    rank: int
    world_size: int
    device: Any
    barrier: Callable[[], None]

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, items: Sequence[T]) -> list[T]:
        """This rank's share of ``items``: item i goes to rank i mod world_size. Generate deals its planned batches
        (the plan is global, so a note's batch — and its greedy output — is the same for any number of processes;
        longest-first order balances the ranks); compress deals notes."""
        return list(items[self.rank :: self.world_size])


def current_processes() -> Processes:
    """Rank, world size, device and a barrier from accelerate's PartialState (works with and without a launcher)."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    # Without `cpu=True` PartialState ignores the launcher's ranks on a machine without a GPU (it reports one
    # process), so pass it whenever accelerate was told to use the CPU or there is no GPU.
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available())
    return Processes(state.process_index, state.num_processes, state.device, state.wait_for_everyone)


# ---------------------------------------------------------------------------------------------------------------
# Crash-safe, resumable, sharded JSONL output
# ---------------------------------------------------------------------------------------------------------------


def repair_jsonl(path: str | Path, key: str = "note_id") -> int:
    """Drop a torn tail (bytes after the last newline) and any line that is not a JSON object with ``key``.

    Returns how many lines were dropped; the file is rewritten atomically only when something was dropped.
    """
    p = Path(path)
    if not p.is_file():
        return 0
    data = p.read_bytes()
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    kept: list[bytes] = []
    dropped = 1 if tail.strip() else 0
    for line in lines:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError):
            dropped += 1
            continue
        if isinstance(record, dict) and key in record:
            kept.append(line)
        else:
            dropped += 1
    if dropped or (data and not data.endswith(b"\n")):
        tmp = p.with_name(f".{p.name}.repair")
        with open_private(tmp, "wb") as fh:
            fh.write(b"".join(line + b"\n" for line in kept))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, p)
        logger.warning("%s: dropped %d torn or unreadable line(s); those notes will be generated again", p, dropped)
    return dropped


class ShardedJsonlOutput:
    """``<output_dir>/<name>`` assembled from per-rank append-only part files (see the module docstring)."""

    def __init__(self, output_dir: str | Path, name: str, procs: Processes, *, key: str = "note_id"):
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / name
        self.parts_dir = self.output_dir / PARTS_DIR
        self.stem = Path(name).stem
        self.procs = procs
        self.key = key
        self.journal_path = self.parts_dir / f"{self.stem}.journal.json"

    def part_path(self, rank: int) -> Path:
        return self.parts_dir / f"{self.stem}.rank{rank:03d}.jsonl"

    def _done_marker(self, rank: int) -> Path:
        return self.parts_dir / f"{self.stem}.rank{rank:03d}-of-{self.procs.world_size:03d}.done"

    def check_resumable(self, resume_key: str, *, overwrite: bool) -> None:
        """Refuse to resume outputs written with other settings (read-only; every rank may call it).

        Raises:
            ConfigError: the parts (or a finished output) were written with different settings.
        """
        if overwrite:
            return
        journal = self._read_journal()
        has_outputs = self.path.exists() or any(self.parts_dir.glob(f"{self.stem}.rank*.jsonl"))
        if journal is None and has_outputs:
            raise ConfigError(
                f"`output_dir` = {self.output_dir} already holds {self.path.name} or part files without a journal "
                "(written by another tool or version); choose another output_dir or set `overwrite: true`."
            )
        if journal is not None and journal.get("resume_key") != resume_key:
            raise ConfigError(
                f"`output_dir` = {self.output_dir} holds outputs generated with different settings (model, adapter, "
                "data, prompt or decoding); resuming would mix them. Choose another output_dir or set "
                "`overwrite: true` to start over."
            )

    def _read_journal(self) -> dict[str, Any] | None:
        if not self.journal_path.is_file():
            return None
        try:
            data = json.loads(self.journal_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None
        return data if isinstance(data, dict) else None

    def prepare(self, resume_key: str, *, overwrite: bool, description: dict[str, Any] | None = None) -> None:
        """Main process: clear (overwrite) or repair the parts and the merged output and write the journal; then
        all ranks sync.

        The merged output is only a copy of the parts: a torn or unreadable line in it (a copy or sync cut short)
        is dropped like one in a part file, and :meth:`merge` rebuilds it from the parts (a note found in neither
        is generated again) instead of refusing the whole directory.
        """
        if self.procs.is_main:
            if overwrite:
                shutil.rmtree(self.parts_dir, ignore_errors=True)
                self.path.unlink(missing_ok=True)
            private_dir(self.output_dir)
            private_dir(self.parts_dir)
            for part in sorted(self.parts_dir.glob(f"{self.stem}.rank*.jsonl")):
                repair_jsonl(part, self.key)
            if repair_jsonl(self.path, self.key):
                logger.warning("%s had torn or unreadable lines: it is rebuilt from %s", self.path, self.parts_dir)
            for marker in self.parts_dir.glob(f"{self.stem}.rank*.done"):
                marker.unlink()
            self._complete_marker().unlink(missing_ok=True)
            atomic_write_json(self.journal_path, {"resume_key": resume_key, **(description or {})})
        self.procs.barrier()

    def done_records(self) -> dict[str, dict[str, Any]]:
        """Records already written (merged output and every part file), by key; the first one wins."""
        done: dict[str, dict[str, Any]] = {}
        sources = [self.path] if self.path.is_file() else []
        sources += sorted(self.parts_dir.glob(f"{self.stem}.rank*.jsonl"))
        for source in sources:
            for record in read_jsonl(source):
                done.setdefault(str(record[self.key]), record)
        return done

    @contextlib.contextmanager
    def writer(self) -> Iterator[Callable[[Iterable[dict[str, Any]]], None]]:
        """An ``append(records)`` function for this rank's part file: one write, flush and fsync per call."""
        private_dir(self.parts_dir)
        with open_private(self.part_path(self.procs.rank), "a", encoding="utf-8") as fh:

            def append(records: Iterable[dict[str, Any]]) -> None:
                text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
                if text:
                    fh.write(text)
                    fh.flush()
                    os.fsync(fh.fileno())

            yield append

    def _complete_marker(self) -> Path:
        return self.parts_dir / f"{self.stem}.complete"

    def mark_complete(self) -> None:
        """Main process, after merging and finishing the manifest: release the ranks waiting in
        :meth:`wait_until_complete`."""
        atomic_write_json(self._complete_marker(), {"path": str(self.path)})

    def wait_until_complete(self, poll_seconds: float = 0.5) -> None:
        """Other ranks: return once the main process has merged the output, so that when a stage returns its
        output is complete on every rank (the pipeline's stage 2 reads stage 1 right away). Files, not a
        collective: the main process may take a while and must not hit a NCCL timeout."""
        while not self._complete_marker().is_file():
            time.sleep(poll_seconds)

    def finish_rank(self, written: int) -> None:
        atomic_write_json(self._done_marker(self.procs.rank), {"rank": self.procs.rank, "written": written})

    def wait_for_ranks(self, poll_seconds: float = 0.5) -> None:
        """Main process: wait until every rank has dropped its done marker."""
        markers = [self._done_marker(r) for r in range(self.procs.world_size)]
        last_log = time.monotonic()
        while not all(m.is_file() for m in markers):
            if time.monotonic() - last_log > 60:
                waiting = [m.name for m in markers if not m.is_file()]
                logger.info("waiting for other ranks to finish: %s", ", ".join(waiting))
                last_log = time.monotonic()
            time.sleep(poll_seconds)

    def merge(self, order: Sequence[str]) -> int:
        """Main process: write ``<name>`` with one record per key of ``order``, in that order (atomic).

        Raises:
            RuntimeError: a key of ``order`` has no record (a rank did not write it — a bug or a lost file).
        """
        done = self.done_records()
        missing = [k for k in order if k not in done]
        if missing:
            raise RuntimeError(
                f"{len(missing)} note(s) have no output after all ranks finished (first: {missing[:3]}); rerun to "
                "generate them (finished notes are kept)."
            )
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with open_private(tmp, "w", encoding="utf-8") as fh:
            for k in order:
                fh.write(json.dumps(done[k], ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        return len(order)


def progress_bar(total: int, desc: str, procs: Processes) -> Any:
    from tqdm.auto import tqdm

    shown = procs.is_main and show_progress()
    return tqdm(total=total, desc=desc, unit="note", disable=not shown, dynamic_ncols=True)


# Settings that do not change what a note's output is (only speed or which notes run): a rerun may change them and
# still resume. Everything else (model, adapter, data, decoding) must match.
_RESUME_NEUTRAL = (
    "output_dir",
    "log_level",
    "limit",
    "overwrite",
    "batch_token_budget",
    "max_batch_size",
    "cache_implementation",
    "compile",
    "sliding_window_cache",
    "prefill_chunk_rows",
    "compile_cache_dir",
    "chunk_notes",
)


def resume_key(cfg: InferenceConfig, **facts: Any) -> str:
    """Fingerprint of everything that determines the outputs (config minus speed knobs, plus input facts)."""
    settings = {k: v for k, v in cfg.to_dict().items() if k not in _RESUME_NEUTRAL}
    return canonical_hash({"stage": cfg.STAGE, "config": settings, **facts})


def run_sharded_stage(
    cfg: InferenceConfig,
    procs: Processes,
    *,
    file_name: str,
    key: str,
    inputs: dict[str, Any],
    order: Sequence[str],
    work: Callable[[list[int], Append], int],
    summarize: Callable[[list[dict[str, Any]]], dict[str, Any]],
    describe: Callable[[dict[str, Any]], str],
) -> dict[str, Any]:
    """The protocol of a resumable stage sharded across processes (generate and compress); every rank calls it.

    1. Refuse an ``output_dir`` holding outputs of other settings (``key``, see :func:`resume_key`); barrier.
    2. Start the manifest (``running``; the resolved config and ``inputs``).
    3. Main process: clear (``overwrite``) or repair the part files and the merged output, write the journal;
       barrier (:meth:`ShardedJsonlOutput.prepare`).
    4. Skip the notes already written; ``work(todo, append)`` gets the input positions (in ``order``) still to do —
       it deals its share with :meth:`Processes.share` and appends records; this rank's part file is opened at its
       first record — and returns how many records it wrote. Not called when nothing is left to do.
    5. Done marker; the main process waits for every rank, merges the parts in ``order`` (one record per key),
       adds ``this_run`` to ``summarize(records)``, finishes the manifest with the output's fingerprint, releases the
       other ranks and logs ``describe(summary)``; the other ranks wait until it has.

    Returns the manifest summary (main process; ``{}`` elsewhere).

    Raises:
        ConfigError: the output_dir holds outputs of different settings. RuntimeError: a note has no record after
            every rank finished.
    """
    output = ShardedJsonlOutput(cfg.output_dir, file_name, procs)
    output.check_resumable(key, overwrite=cfg.overwrite)
    procs.barrier()  # every rank has checked before the main process touches anything
    start_run(cfg.output_dir, cfg, inputs=inputs)
    output.prepare(key, overwrite=cfg.overwrite, description={"stage": cfg.STAGE})
    done = output.done_records()
    todo = [i for i, k in enumerate(order) if k not in done]
    if done:
        logger.info(
            "resuming: %d of %d notes already written, %d to go", len(order) - len(todo), len(order), len(todo)
        )
    started = time.perf_counter()
    written = 0
    if todo:
        with contextlib.ExitStack() as stack:
            part: list[Append] = []

            def append(records: Iterable[dict[str, Any]]) -> None:
                batch = list(records)
                if not batch:
                    return
                if not part:
                    part.append(stack.enter_context(output.writer()))
                part[0](batch)

            written = work(todo, append)
    output.finish_rank(written)
    summary: dict[str, Any] = {}
    if procs.is_main:
        output.wait_for_ranks()
        output.merge(order)
        summary = summarize(read_jsonl(output.path))
        summary["this_run"] = {"notes": len(todo), "wall_seconds": round(time.perf_counter() - started, 3)}
        finish_run(cfg.output_dir, {file_name: fingerprint_file(output.path, cfg.output_dir)}, summary=summary)
        output.mark_complete()
        logger.info("wrote %s: %s", output.path, describe(summary))
    else:
        output.wait_until_complete()
    return summary
