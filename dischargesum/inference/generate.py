"""Stage 1, generate: a summary for every note of a prepared split -> ``<output_dir>/stage1.jsonl`` + manifest.

Every rank tokenizes every prompt and plans the batches over ALL notes, then runs its share (batch i -> rank
i mod world size; :meth:`dischargesum.inference.stage.Processes.share`), so a note's batch — and its greedy output —
is the same for any number of processes. Resume, sharded output and the manifest are
:func:`dischargesum.inference.stage.run_sharded_stage`'s.
"""

from __future__ import annotations

import json
import time
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dischargesum.artifacts import STAGE1_FILE, ArtifactError
from dischargesum.inference.engine import (
    EngineSettings,
    GenerationRequest,
    GenerationResult,
    InferenceEngine,
    encode_chats,
    plan_requests,
)
from dischargesum.inference.loading import engine_from_config, resolve_model_source
from dischargesum.inference.sampling import request_seeds
from dischargesum.inference.stage import (
    Append,
    Processes,
    current_processes,
    progress_bar,
    resume_key,
    run_sharded_stage,
)
from dischargesum.logging_utils import get_logger
from dischargesum.manifest import require_artifact

if TYPE_CHECKING:
    from dischargesum.config import GenerateConfig

logger = get_logger(__name__)


@dataclass
class RunStats:
    """Throughput of this rank's share of a run."""

    notes: int = 0
    new_tokens: int = 0
    prompt_tokens: int = 0
    seconds: float = 0.0

    def add(self, results: Sequence[GenerationResult]) -> None:
        self.notes += len(results)
        self.new_tokens += sum(r.new_tokens for r in results)
        self.prompt_tokens += sum(r.prompt_tokens for r in results)
        self.seconds += sum(r.seconds for r in results)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


def run_generation(
    engine: InferenceEngine,
    requests: Sequence[GenerationRequest],
    append: Append,
    to_record: Callable[[GenerationResult], dict[str, Any]],
    procs: Processes,
    *,
    desc: str = "generate",
    log_every_seconds: float = 30.0,
) -> RunStats:
    """Plan ALL requests, run this rank's batches (batch i -> rank i mod world) and append their records.

    Returns this rank's throughput.
    """
    batches = procs.share(engine.plan(requests))
    stats = RunStats()
    bar = progress_bar(sum(len(b) for b in batches), desc, procs)
    last_log = time.monotonic()
    try:
        for batch_number, (_batch, results) in enumerate(engine.generate(requests, batches=batches), start=1):
            append(to_record(r) for r in results)
            stats.add(results)
            bar.update(len(results))
            bar.set_postfix(tok_s=f"{stats.tokens_per_second:.0f}", refresh=False)
            if time.monotonic() - last_log >= log_every_seconds or batch_number == len(batches):
                logger.info(
                    "%s: %d/%d batches, %d notes, %d new tokens, %.1f new tokens/s",
                    desc,
                    batch_number,
                    len(batches),
                    stats.notes,
                    stats.new_tokens,
                    stats.tokens_per_second,
                )
                last_log = time.monotonic()
    finally:
        bar.close()
    return stats


def generation_record(result: GenerationResult) -> dict[str, Any]:
    """One line of stage1.jsonl."""
    return {
        "note_id": result.key,
        "summary": result.text,
        "prompt_tokens": result.prompt_tokens,
        "new_tokens": result.new_tokens,
        "finish_reason": result.finish_reason,
        "seconds": round(result.seconds, 4),
        "batch_size": result.batch_size,
    }


def run_generate(cfg: GenerateConfig) -> dict[str, Any]:
    """Stage 1: summaries for ``cfg.split`` of ``cfg.dataset_dir`` -> ``<output_dir>/stage1.jsonl`` + manifest.

    Every check that a user can fail (dataset, adapter, base model, resumability) runs before a model is loaded.
    Returns the summary written into the manifest.

    Raises:
        ArtifactError: the dataset or adapter is missing or incomplete. ConfigError: unknown base model, or the
            output_dir holds outputs of different settings.
    """
    import pyarrow.parquet as pq

    from dischargesum.data import schema
    from dischargesum.data.formatting import DEFAULT_INSTRUCTION, prompt_messages
    from dischargesum.modeling import load_tokenizer

    procs = current_processes()
    dataset = require_artifact(
        cfg.dataset_dir,
        stage="prepare_data",
        field="dataset_dir",
        files=[schema.SPLIT_FILES[cfg.split], schema.DATA_CARD_FILE],
    )
    source = resolve_model_source(cfg.model_name_or_path, cfg.adapter)
    card = json.loads((Path(cfg.dataset_dir) / schema.DATA_CARD_FILE).read_text(encoding="utf-8"))
    instruction = card.get("instruction")
    if not instruction:
        logger.warning("data_card.json has no `instruction`; using the default prompt instruction")
        instruction = DEFAULT_INSTRUCTION
    table = pq.read_table(Path(cfg.dataset_dir) / schema.SPLIT_FILES[cfg.split], columns=["note_id", "note"])
    note_ids = [str(x) for x in table.column("note_id").to_pylist()]
    notes = [str(x) for x in table.column("note").to_pylist()]
    if len(set(note_ids)) != len(note_ids):
        raise ArtifactError(
            f"`dataset_dir` = {cfg.dataset_dir}: {cfg.split} has duplicate note_ids; rerun prepare_data."
        )
    if cfg.limit:
        note_ids, notes = note_ids[: cfg.limit], notes[: cfg.limit]
    if not note_ids:
        raise ArtifactError(f"`dataset_dir` = {cfg.dataset_dir}: the {cfg.split} split has no notes.")

    key = resume_key(
        cfg,
        data_fingerprint=dataset.get("data_fingerprint"),
        base=source.base,
        adapter_sha256=source.adapter_sha256,
        instruction=instruction,
    )

    def generate_notes(todo: list[int], append: Append) -> int:
        # Every rank tokenizes every note: the batch plan (and so each note's batch) must be the same on all ranks.
        # Ids are kept as 4-byte arrays (a Python int list costs ~9x more for a large split).
        tokenizer = load_tokenizer(source.tokenizer_path, field=source.tokenizer_field, padding_side="left")
        prompts: list[Sequence[int]] = []
        for start in range(0, len(todo), 1024):
            chunk = [prompt_messages(notes[i], instruction) for i in todo[start : start + 1024]]
            prompts += [array("i", ids) for ids in encode_chats(tokenizer, chunk)]
        del tokenizer
        seeds = request_seeds(cfg.seed, note_ids, cfg.seed_policy)
        requests = [
            GenerationRequest(key=note_ids[i], prompt_ids=p, max_new_tokens=cfg.max_new_tokens, seed=seeds[i], index=i)
            for i, p in zip(todo, prompts)
        ]
        if not procs.share(plan_requests(EngineSettings.from_config(cfg), requests).batches):
            return 0
        engine = engine_from_config(cfg, source, procs.device)
        try:
            return run_generation(engine, requests, append, generation_record, procs, desc="generate").notes
        finally:
            engine.close()

    return run_sharded_stage(
        cfg,
        procs,
        file_name=STAGE1_FILE,
        key=key,
        inputs={
            "dataset_dir": str(Path(cfg.dataset_dir).resolve()),
            "data_fingerprint": dataset.get("data_fingerprint"),
            "split": cfg.split,
            "base_model": source.base,
            "adapter": None if source.adapter is None else str(Path(source.adapter).resolve()),
            "adapter_sha256": source.adapter_sha256,
        },
        order=note_ids,
        work=generate_notes,
        summarize=lambda records: summarize_stage1(records, world_size=procs.world_size),
        describe=describe_stage1,
    )


def summarize_stage1(records: Sequence[dict[str, Any]], *, world_size: int) -> dict[str, Any]:
    """Totals for the manifest: notes, tokens, time, finish reasons."""
    seconds = sum(float(r.get("seconds", 0.0)) for r in records)
    new_tokens = sum(int(r.get("new_tokens", 0)) for r in records)
    reasons: dict[str, int] = {}
    for r in records:
        reasons[str(r.get("finish_reason"))] = reasons.get(str(r.get("finish_reason")), 0) + 1
    return {
        "notes": len(records),
        "new_tokens": new_tokens,
        "prompt_tokens": sum(int(r.get("prompt_tokens", 0)) for r in records),
        "generation_seconds": round(seconds, 3),
        "new_tokens_per_second_per_process": round(new_tokens / seconds, 2) if seconds > 0 else None,
        "finish_reasons": reasons,
        "world_size": world_size,
    }


def describe_stage1(summary: dict[str, Any]) -> str:
    """One log line for :func:`summarize_stage1`."""
    return (
        f"{summary['notes']} notes, {summary['new_tokens']} new tokens "
        f"({summary['new_tokens_per_second_per_process'] or 0.0:.1f} new tokens/s per process), "
        f"finish reasons {summary['finish_reasons']}"
    )
