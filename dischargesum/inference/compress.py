"""Stage 2: rewrite each stage-1 summary shorter with a second model, and verify that no clinical entity was lost.

For each note (:func:`compress_notes`):

1. The shared extractor (:mod:`dischargesum.evaluation.entities`) lists the stage-1 summary's entities; the prompt
   (:func:`compression_messages`) contains the summary itself, that checklist (:func:`format_entity_checklist`) and
   the target length in words (``target_ratio`` of the summary's words).
2. After each attempt the output's entities are compared with the summary's (:func:`compare_entities`: same drug
   and dose, same lab value, same date, same negation). An attempt is accepted when its entity recall reaches
   ``retention_threshold``, it ended by itself (not cut off at its token cap) and it is not longer than
   ``max_length_ratio`` of the summary. Otherwise the note is re-prompted — from the original summary, naming the
   entities the last attempt lost (and saying it was too long or cut off) — up to ``max_attempts`` generations.
3. A note with no accepted attempt keeps its stage-1 summary and is flagged ``fallback: true``: a longer summary
   that keeps every medication and value is better than a short one that drops them.

Each attempt's generation is capped at ``min(max_new_tokens, ceil(stage-1 tokens x max_length_ratio) + 16)``
tokens: an attempt that runs past it would be rejected as too long anyway.

Records (``stage2.jsonl``, one per note in input order): ``note_id``, ``summary`` (the accepted compression or the
stage-1 fallback), ``stage1_summary``, ``fallback``, ``attempts``, ``accepted_attempt``, ``retention`` (entity
recall of ``summary`` against the stage-1 summary; ``null`` when stage 1 had no entities), ``retained`` /
``missing`` / ``extra`` (entity keys), ``ratio_chars`` / ``ratio_tokens`` (``summary`` over stage 1, tokens of the
compression model's tokenizer), ``chars``, ``tokens``, ``stage1_chars``, ``stage1_tokens``, ``target_ratio``,
``prompt_tokens`` and ``new_tokens`` (summed over attempts), ``seconds``, ``finish_reason`` (of the last attempt)
and ``attempt_log`` (per attempt: retention, ratio, finish reason, missing keys, why it was rejected).

The generation itself is :class:`dischargesum.inference.engine.InferenceEngine`; this module only builds prompts and
judges outputs, so its retry and fallback logic is tested with a scripted model double (anything with
``encode_chats``, ``count_tokens`` and ``generate_all``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from dischargesum.artifacts import STAGE2_FILE, ArtifactError
from dischargesum.config import CompressConfig, settings_from_config
from dischargesum.logging_utils import get_logger
from dischargesum.manifest import require_artifact, sha256_file

if TYPE_CHECKING:
    from dischargesum.evaluation.entities import Entity
    from dischargesum.inference.engine import GenerationRequest, GenerationResult
    from dischargesum.inference.stage import Append

logger = get_logger(__name__)

# Slack above the length cap so a rewrite near the limit can finish its sentence and emit its stop token.
_CAP_SLACK_TOKENS = 16


class CompressionModel(Protocol):
    """What compression needs from a generator (the engine, or a scripted double in tests)."""

    def encode_chats(self, conversations: Sequence[list[dict[str, str]]]) -> list[list[int]]: ...

    def count_tokens(self, texts: Sequence[str]) -> list[int]: ...

    def generate_all(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]: ...


@dataclass(frozen=True)
class CompressionSettings:
    target_ratio: float = 0.5
    retention_threshold: float = 0.9
    max_attempts: int = 3
    max_length_ratio: float = 1.0
    max_new_tokens: int = 512
    seed: int = 0

    @classmethod
    def from_config(cls, cfg: CompressConfig) -> CompressionSettings:
        return settings_from_config(cls, cfg)


# ---------------------------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------------------------


def word_count(text: str) -> int:
    return len(text.split())


def compression_messages(
    summary: str,
    checklist: str,
    *,
    target_words: int,
    missing: Sequence[str] = (),
    previous_problem: str | None = None,
) -> list[dict[str, str]]:
    """The user turn asking for a shorter summary that keeps every checklist item (no system turn: Gemma has none).

    ``missing`` (descriptions of entities a previous attempt lost) and ``previous_problem`` ("too long", "cut
    off") make it a re-prompt; the summary is always the original stage-1 text.

    Raises:
        ValueError: ``summary`` is empty (there is nothing to compress).
    """
    if not summary.strip():
        raise ValueError("compression_messages needs a non-empty summary")
    words = word_count(summary)
    lines = [
        f"Shorten the discharge summary below to about {target_words} words (it has {words}). Keep every item of "
        "the checklist with exactly the same drug names, doses, units, routes, frequencies, values and dates, and "
        "keep negated findings negated. Do not add anything that is not in the summary. Reply with the shortened "
        "summary only.",
        "",
        "Checklist (clinical entities found in the summary):",
        checklist if checklist.strip() else "(no entities found; keep every clinical fact)",
    ]
    if missing:
        lines += ["", "Your previous version left these out; include every one of them:", "; ".join(missing)]
    if previous_problem:
        lines += ["", f"Your previous version {previous_problem}."]
    lines += ["", "Summary:", summary.strip()]
    return [{"role": "user", "content": "\n".join(lines)}]


# ---------------------------------------------------------------------------------------------------------------
# The verify-and-repair loop
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class _NoteState:
    note_id: str
    summary: str
    entities: list[Entity]
    checklist: str
    stage1_chars: int
    stage1_tokens: int
    target_words: int
    cap: int
    attempts: list[dict[str, Any]] = field(default_factory=list)
    accepted: tuple[str, Any, int] | None = None  # (text, comparison, attempt number)
    missing_descriptions: list[str] = field(default_factory=list)
    problem: str | None = None
    prompt_tokens: int = 0
    new_tokens: int = 0
    seconds: float = 0.0
    last_finish_reason: str | None = None


def _rejection(
    retention: float | None, ratio: float, finish_reason: str, text: str, s: CompressionSettings
) -> str | None:
    if not text.strip():
        return "empty"
    if finish_reason != "eos":
        return "cut_off"
    if ratio > s.max_length_ratio:
        return "too_long"
    if retention is not None and retention < s.retention_threshold:
        return "entities_lost"
    return None


def compress_notes(
    items: Sequence[tuple[str, str]], model: CompressionModel, settings: CompressionSettings
) -> list[dict[str, Any]]:
    """Compress ``(note_id, stage-1 summary)`` pairs; return one stage-2 record per pair, in input order.

    All notes of an attempt round are generated together (one ``generate_all`` call), so retries batch well.
    """
    from dischargesum.evaluation.entities import compare_entities, extract_entities_batch, format_entity_checklist
    from dischargesum.inference.engine import GenerationRequest
    from dischargesum.inference.sampling import note_seed

    summaries = [summary for _, summary in items]
    entity_lists = extract_entities_batch(summaries)
    token_counts = model.count_tokens(summaries)
    states = []
    for (note_id, summary), entities, tokens in zip(items, entity_lists, token_counts):
        cap = min(settings.max_new_tokens, math.ceil(tokens * settings.max_length_ratio) + _CAP_SLACK_TOKENS)
        states.append(
            _NoteState(
                note_id=note_id,
                summary=summary,
                entities=entities,
                checklist=format_entity_checklist(entities),
                stage1_chars=len(summary),
                stage1_tokens=tokens,
                target_words=max(1, round(word_count(summary) * settings.target_ratio)),
                cap=max(1, cap),
            )
        )
    for attempt in range(1, settings.max_attempts + 1):
        pending = [st for st in states if st.accepted is None and st.summary.strip()]
        if not pending:
            break
        conversations = [
            compression_messages(
                st.summary,
                st.checklist,
                target_words=st.target_words,
                missing=st.missing_descriptions,
                previous_problem=st.problem,
            )
            for st in pending
        ]
        prompts = model.encode_chats(conversations)
        requests = [
            GenerationRequest(
                key=st.note_id,
                prompt_ids=tuple(ids),
                max_new_tokens=st.cap,
                seed=note_seed(settings.seed, f"{st.note_id}#attempt{attempt}"),
                index=i,
            )
            for i, (st, ids) in enumerate(zip(pending, prompts))
        ]
        results = model.generate_all(requests)
        outputs = extract_entities_batch([r.text for r in results])
        for st, result, output_entities in zip(pending, results, outputs):
            comparison = compare_entities(output_entities, st.entities)
            retention = comparison.recall()
            ratio = len(result.text) / st.stage1_chars if st.stage1_chars else 0.0
            rejected = _rejection(retention, ratio, result.finish_reason, result.text, settings)
            st.prompt_tokens += result.prompt_tokens
            st.new_tokens += result.new_tokens
            st.seconds += result.seconds
            st.last_finish_reason = result.finish_reason
            st.attempts.append(
                {
                    "attempt": attempt,
                    "retention": retention,
                    "ratio_chars": round(ratio, 4),
                    "finish_reason": result.finish_reason,
                    "missing": [e.key for e in comparison.missing],
                    "rejected": rejected,
                }
            )
            if rejected is None:
                st.accepted = (result.text, comparison, attempt)
                continue
            st.missing_descriptions = [e.describe() for e in comparison.missing]
            st.problem = {
                "empty": "was empty",
                "cut_off": f"was cut off before it finished; stay near {st.target_words} words",
                "too_long": f"was too long ({word_count(result.text)} words); stay near {st.target_words} words",
                "entities_lost": None,
            }[rejected]
    final_texts = [st.accepted[0] if st.accepted else st.summary for st in states]
    final_tokens = model.count_tokens(final_texts)
    records = []
    for st, text, tokens in zip(states, final_texts, final_tokens):
        comparison = st.accepted[1] if st.accepted else compare_entities(st.entities, st.entities)
        records.append(
            {
                "note_id": st.note_id,
                "summary": text,
                "stage1_summary": st.summary,
                "fallback": st.accepted is None,
                "attempts": len(st.attempts),
                "accepted_attempt": st.accepted[2] if st.accepted else None,
                "retention": comparison.recall(),
                "retained": [e.key for e in comparison.retained],
                "missing": [e.key for e in comparison.missing],
                "extra": [e.key for e in comparison.extra],
                "ratio_chars": round(len(text) / st.stage1_chars, 4) if st.stage1_chars else None,
                "ratio_tokens": round(tokens / st.stage1_tokens, 4) if st.stage1_tokens else None,
                "chars": len(text),
                "tokens": tokens,
                "stage1_chars": st.stage1_chars,
                "stage1_tokens": st.stage1_tokens,
                "target_ratio": settings.target_ratio,
                "prompt_tokens": st.prompt_tokens,
                "new_tokens": st.new_tokens,
                "seconds": round(st.seconds, 4),
                "finish_reason": st.last_finish_reason,
                "attempt_log": st.attempts,
            }
        )
    return records


def summarize_stage2(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Totals for the manifest: fallbacks, attempts, retention, compression (ratio of totals and mean of ratios)."""
    n = len(records)
    if not n:
        return {"notes": 0}
    retentions = [r["retention"] for r in records if r.get("retention") is not None]
    # A fallback keeps the stage-1 summary, so its retention is trivially 1.0: the mean over accepted compressions
    # is the one that says how well compression kept entities.
    accepted = [r["retention"] for r in records if r.get("retention") is not None and not r["fallback"]]
    ratios = [r["ratio_chars"] for r in records if r.get("ratio_chars") is not None]
    stage1_chars = sum(r["stage1_chars"] for r in records)
    return {
        "notes": n,
        "fallbacks": sum(1 for r in records if r["fallback"]),
        "fallback_rate": round(sum(1 for r in records if r["fallback"]) / n, 4),
        "mean_attempts": round(sum(r["attempts"] for r in records) / n, 3),
        "mean_retention": round(sum(retentions) / len(retentions), 4) if retentions else None,
        "notes_with_entities": len(retentions),
        "mean_retention_accepted": round(sum(accepted) / len(accepted), 4) if accepted else None,
        "ratio_chars_of_totals": round(sum(r["chars"] for r in records) / stage1_chars, 4) if stage1_chars else None,
        "ratio_chars_mean": round(sum(ratios) / len(ratios), 4) if ratios else None,
        "new_tokens": sum(r["new_tokens"] for r in records),
        "generation_seconds": round(sum(r["seconds"] for r in records), 3),
    }


# ---------------------------------------------------------------------------------------------------------------
# Stage 2: compress
# ---------------------------------------------------------------------------------------------------------------


def read_stage1(path: str | Path, *, field: str = "input") -> list[tuple[str, str]]:
    """``(note_id, summary)`` pairs of a completed generate output, checked before any model is loaded.

    Raises:
        ArtifactError: the file's directory is not a completed generate output, or a line lacks note_id/summary,
            or note_ids repeat.
    """
    from dischargesum.artifacts import read_jsonl

    p = Path(path)
    require_artifact(p.parent, stage="generate", field=field, files=[p.name])
    pairs = []
    seen = set()
    for number, record in enumerate(read_jsonl(p), start=1):
        note_id, summary = record.get("note_id"), record.get("summary")
        if not isinstance(note_id, str) or not isinstance(summary, str):
            raise ArtifactError(f"`{field}` = {path}: line {number} lacks a string note_id and summary.")
        if note_id in seen:
            raise ArtifactError(f"`{field}` = {path}: note_id {note_id!r} appears twice. Rerun generate.")
        seen.add(note_id)
        pairs.append((note_id, summary))
    return pairs


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def run_compress(cfg: CompressConfig) -> dict[str, Any]:
    """Stage 2: ``cfg.input`` (stage1.jsonl) -> ``<output_dir>/stage2.jsonl`` + manifest.

    The input's manifest, the model and the resumability of output_dir are checked before any model is loaded.
    Notes are dealt to ranks round-robin and processed in chunks of ``chunk_notes``; a rerun skips notes already
    written. Returns the manifest summary (main process; ``{}`` elsewhere).

    Raises:
        ArtifactError: the input is missing, half-written or malformed. ConfigError: unknown model, or output_dir
            holds outputs of different settings.
    """
    from dischargesum.inference.loading import engine_from_config, resolve_model_source
    from dischargesum.inference.stage import current_processes, progress_bar, resume_key, run_sharded_stage

    procs = current_processes()
    items = read_stage1(cfg.input)
    if cfg.limit:
        items = items[: cfg.limit]
    if not items:
        raise ArtifactError(f"`input` = {cfg.input} has no summaries to compress.")
    source = resolve_model_source(cfg.model_name_or_path, cfg.adapter)
    input_sha = sha256_file(cfg.input)
    key = resume_key(cfg, input_sha256=input_sha, base=source.base, adapter_sha256=source.adapter_sha256)

    def compress_share(todo: list[int], append: Append) -> int:
        mine = procs.share([items[i] for i in todo])
        if not mine:
            return 0
        written = 0
        engine = engine_from_config(cfg, source, procs.device)
        settings = CompressionSettings.from_config(cfg)
        bar = progress_bar(len(mine), "compress", procs)
        try:
            for chunk in _chunks(mine, cfg.chunk_notes):
                records = compress_notes(chunk, engine, settings)
                append(records)
                written += len(records)
                bar.update(len(records))
                bar.set_postfix(fallbacks=sum(1 for r in records if r["fallback"]), refresh=False)
        finally:
            bar.close()
            engine.close()
        return written

    return run_sharded_stage(
        cfg,
        procs,
        file_name=STAGE2_FILE,
        key=key,
        inputs={
            "input": str(Path(cfg.input).resolve()),
            "input_sha256": input_sha,
            "model": source.base,
            "adapter": source.adapter,
        },
        order=[note_id for note_id, _ in items],
        work=compress_share,
        summarize=summarize_stage2,
        describe=describe_stage2,
    )


def describe_stage2(summary: dict[str, Any]) -> str:
    """One log line for :func:`summarize_stage2`: retention says over which notes it was measured (notes whose
    stage-1 summary has no entity have none, recorded as ``retention: null``) and apart from the fallbacks."""
    n, fallbacks = summary["notes"], summary.get("fallbacks", 0)
    with_entities = summary.get("notes_with_entities", 0)
    accepted = summary.get("mean_retention_accepted")
    return (
        f"{n} notes, {fallbacks} fallbacks (stage-1 summary kept); entity retention: "
        + (f"mean {accepted} over the accepted compressions" if accepted is not None else "no accepted compression")
        + f", {with_entities} of {n} stage-1 summaries have entities to retain; "
        + f"length ratio (of totals) {summary.get('ratio_chars_of_totals')}"
    )
