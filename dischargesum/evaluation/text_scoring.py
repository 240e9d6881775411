"""Per-sample CPU work: entities, numbers, ROUGE and word counts of every sample, in worker processes.

``TextScoringJob`` starts the work and returns at once, so BERTScore runs on this process (and the GPU) while the
workers score text; the worker functions live at module level because spawned workers import them by name.
"""

from __future__ import annotations

import math
import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dischargesum.evaluation.scores import make_rouge_scorer, numeric_fidelity, numeric_recall, rouge_scores

if TYPE_CHECKING:
    from dischargesum.evaluation.entities import EntityComparison


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
