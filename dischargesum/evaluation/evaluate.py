"""One evaluation run: BERTScore here while worker processes score entities, numbers and ROUGE, then one
numeric row per sample and the aggregates of metrics.json, overall and per length bucket."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from dischargesum.cli import UserError
from dischargesum.config import ConfigError, EvalConfig
from dischargesum.evaluation.bertscore import BertScoreOutput, BertScorer, resolve_device
from dischargesum.evaluation.inputs import ROLE_LABELS, EvalInputs, EvalSample
from dischargesum.evaluation.scores import (
    ROUGE_TYPES,
    compression_statistics,
    describe,
    length_bucket,
    length_bucket_labels,
)
from dischargesum.evaluation.text_scoring import TextScores, TextScoringJob, TextScoringOptions, available_cpus
from dischargesum.logging_utils import get_logger, show_progress

logger = get_logger(__name__)


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


def _has_digit(text: str) -> bool:
    return any(ch.isdigit() for ch in text)


def _aggregate(
    samples: Sequence[EvalSample],
    scores: Sequence[TextScores],
    rows: Sequence[dict[str, Any]],
    families: set[str],
) -> dict[str, Any]:
    """All aggregate metrics over one set of samples (the whole run or one length bucket)."""
    from dischargesum.evaluation.entities import aggregate_entity_comparisons

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

    Steps: refuse an unavailable generic channel, decide what can be computed, load the BERTScore encoder, start
    the text-scoring workers, run BERTScore and count tokens meanwhile, collect the workers' scores, build one row
    per sample, then assemble metrics.json (settings, overall and per length-bucket aggregates).

    Raises:
        ConfigError: the BERTScore encoder or the token-count tokenizer cannot be loaded, or a layer is invalid.
        UserError: ``generic_entities`` is on but scispaCy's en_core_sci_sm is not installed.
    """
    show = show_progress() if progress is None else progress
    families = set(cfg.metrics)
    samples = inputs.samples
    timing: dict[str, float] = {}
    evaluate_started = time.perf_counter()
    _require_generic_channel(cfg)
    not_computed, warnings, numbers_vs_source = _coverage(inputs, families)
    scorer = _load_bert_scorer(cfg, timing) if "bertscore" in families and inputs.has_reference else None

    started = time.perf_counter()
    job = _start_text_scoring(inputs, cfg, families, numbers_vs_source, show)
    bert = _run_bertscore(scorer, samples, job, show, timing) if scorer is not None else None
    counter_name, count_tokens = _token_counter(cfg, scorer)
    token_counts = {
        role: count_tokens([getattr(s, role) or "" for s in samples]) for role in ("prediction", "reference", "source")
    }
    text_scores = job.results()
    timing["entities_rouge_wall_s"] = time.perf_counter() - started

    basis = "source" if inputs.has_source else ("reference" if inputs.has_reference else "prediction")
    buckets = [length_bucket(len(getattr(s, basis) or ""), cfg.length_buckets) for s in samples]
    rows = [
        _full_sample_row(sample, scores, bucket, index, token_counts, bert)
        for index, (sample, scores, bucket) in enumerate(zip(samples, text_scores, buckets))
    ]

    metrics = _run_description(inputs, cfg, not_computed, warnings, basis, counter_name)
    if scorer is not None and bert is not None:
        metrics["bertscore_settings"] = _bertscore_settings(cfg, scorer, bert)
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


def _require_generic_channel(cfg: EvalConfig) -> None:
    """Raise UserError when ``generic_entities`` is on but scispaCy's en_core_sci_sm is not installed."""
    if not cfg.generic_entities:
        return
    from dischargesum.evaluation.entities import generic_channel_available

    if not generic_channel_available():
        raise UserError(
            "`generic_entities: true` needs scispaCy's en_core_sci_sm model, which is not installed (it needs "
            "network to install); set `generic_entities: false`."
        )


def _coverage(inputs: EvalInputs, families: set[str]) -> tuple[list[str], list[str], bool]:
    """``(not_computed, warnings, numbers_vs_source)``: the metric families the inputs cannot support, warnings
    about what the inputs leave out, and whether numeric fidelity vs the source is computed."""
    not_computed: list[str] = []
    if not inputs.has_reference:
        not_computed += [f for f in ("bertscore", "rouge") if f in families]
    warnings: list[str] = []
    numbers_vs_source = "numbers" in families and inputs.has_source
    if numbers_vs_source and not any(_has_digit(s.source or "") for s in inputs.samples):
        # A preprocessing that stripped digits (the seed's NLTK cleaning does) would make every number of every
        # summary "unsupported": a numeric fidelity of 0 that measures the preprocessing, not the summaries.
        numbers_vs_source = False
        warnings.append(
            f"no {ROLE_LABELS[inputs.mode]['source']} contains a digit (were digits stripped in preprocessing?): "
            "numeric fidelity vs the source is not computed"
        )
        logger.warning("%s", warnings[-1])
    return not_computed, warnings, numbers_vs_source


def _load_bert_scorer(cfg: EvalConfig, timing: dict[str, float]) -> BertScorer:
    """The BERTScore scorer ``cfg`` asks for, on its device; records the load time in ``timing``.

    Raises:
        ConfigError: the encoder or its tokenizer cannot be loaded, or ``bertscore_num_layers`` is invalid.
    """
    started = time.perf_counter()
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
    return scorer


def _start_text_scoring(
    inputs: EvalInputs, cfg: EvalConfig, families: set[str], numbers_vs_source: bool, show: bool
) -> TextScoringJob:
    """Start entities / numbers / ROUGE over every sample (in worker processes when there are enough samples)."""
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
    triples = [(s.prediction, s.reference, s.source) for s in inputs.samples]
    job = TextScoringJob(triples, options, cfg.num_workers, progress=show).start()
    logger.info(
        "entities/ROUGE: %d samples on %s", len(triples), f"{job.workers} workers" if job.workers else "1 process"
    )
    return job


def _run_bertscore(
    scorer: BertScorer, samples: Sequence[EvalSample], job: TextScoringJob, show: bool, timing: dict[str, float]
) -> BertScoreOutput:
    """BERTScore of every prediction against its reference, sharing the CPUs with ``job``'s workers; records the
    time in ``timing``."""
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
    return bert


def _full_sample_row(
    sample: EvalSample,
    scores: TextScores,
    bucket: str,
    index: int,
    token_counts: dict[str, list[int]],
    bert: BertScoreOutput | None,
) -> dict[str, Any]:
    """One per_sample.csv row: the text scores, then token counts, compression ratios and BERTScore."""
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
    return row


def _run_description(
    inputs: EvalInputs,
    cfg: EvalConfig,
    not_computed: list[str],
    warnings: list[str],
    basis: str,
    counter_name: str,
) -> dict[str, Any]:
    """The head of metrics.json: mode, roles and their columns, counts, what was not computed and why."""
    samples = inputs.samples
    return {
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


def _bertscore_settings(cfg: EvalConfig, scorer: BertScorer, bert: BertScoreOutput) -> dict[str, Any]:
    """metrics.json's ``bertscore_settings``: the model, window and long-text policy, and how many samples they hit."""
    over = sum(1 for a, b in zip(bert.prediction_windows, bert.reference_windows) if max(a, b) > 1)
    return {
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
