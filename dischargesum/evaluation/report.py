"""Write an evaluation's results: metrics.json, per_sample.csv, report.md, PNG plots and TensorBoard.

Why this stays one module (~680 lines): it is one step, ``write_report``, turning one ``EvalResult`` into the
files below. The plots and TensorBoard read the same headline numbers and per-sample values (``_headline``,
``_get``, ``_column``, ``_isnan``); report.md (about half the module) is one document's sections. Split, the
writers would share those private helpers across modules and each be a page long.

What holds patient text and what does not:

- ``metrics.json`` — aggregates, counts, settings and timings: numbers only.
- ``per_sample.csv`` — one row per prediction row: note_id, status (``scored`` or the skip reason) and numbers.
  No text, no entity strings.
- ``report.md`` — tables plus the worst / best examples with their entity diffs and excerpts of the output and the
  texts it was compared with. **When run on MIMIC it contains patient text**: keep it inside the credentialed
  environment. ``report_include_text: false`` writes it with ids and numbers only.
- ``*.png`` — distributions and scatter plots of per-sample numbers (matplotlib, Agg backend).
- ``tensorboard/`` — scalars and histograms of the same numbers; never text.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dischargesum.artifacts import EVAL_METRICS_FILE as METRICS_FILE
from dischargesum.artifacts import PER_SAMPLE_FILE, REPORT_FILE, TENSORBOARD_DIR
from dischargesum.config import EvalConfig
from dischargesum.evaluation.evaluate import EvalResult
from dischargesum.evaluation.scores import ROUGE_TYPES, length_bucket_labels
from dischargesum.logging_utils import get_logger
from dischargesum.manifest import atomic_write_json, atomic_write_text, fingerprint_file, open_private

logger = get_logger(__name__)

PLOT_FILES = {
    "distributions": "metric_distributions.png",
    "compression": "compression_vs_retention.png",
    "buckets": "length_buckets.png",
}

# Per-sample columns plotted / logged as histograms, with labels.
_DISTRIBUTIONS = (
    ("bertscore_f1", "BERTScore F1"),
    ("rougeL_f1", "ROUGE-L F1"),
    ("entity_recall_vs_reference", "entity recall vs reference"),
    ("entity_precision_vs_reference", "entity precision vs reference"),
    ("entity_recall_vs_source", "entity recall vs source"),
    ("hallucination_rate", "hallucinated-entity rate"),
    ("numeric_fidelity_vs_source", "numeric fidelity vs source"),
    ("compression_chars_vs_reference", "length / reference (chars)"),
    ("compression_chars_vs_source", "length / source (chars)"),
)


def write_report(result: EvalResult, cfg: EvalConfig) -> dict[str, Any]:
    """Write every output into ``cfg.output_dir``; return ``{name: fingerprint}`` for the manifest.

    Raises:
        OSError: the output directory cannot be written.
    """
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / METRICS_FILE, out / PER_SAMPLE_FILE, out / REPORT_FILE]
    atomic_write_json(out / METRICS_FILE, result.metrics)
    write_per_sample_csv(result.rows, out / PER_SAMPLE_FILE)
    plots: list[Path] = []
    if cfg.plots:
        plots = write_plots(result, out)
        written += plots
    atomic_write_text(out / REPORT_FILE, render_report_md(result, cfg, [p.name for p in plots]))
    if cfg.tensorboard:
        written += write_tensorboard(result, out / TENSORBOARD_DIR)
    logger.info("wrote %s", ", ".join(str(p.relative_to(out)) for p in written if p.parent == out))
    return {str(p.relative_to(out)): fingerprint_file(p, root=out) for p in written}


# ---------------------------------------------------------------------------------------------------------------
# per_sample.csv
# ---------------------------------------------------------------------------------------------------------------


def write_per_sample_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """One row per prediction row; columns in first-seen order; None is written as an empty cell."""
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    tmp = path.with_name(f".{path.name}.tmp")
    with open_private(tmp, "w", newline="", encoding="utf-8") as fh:  # rows may carry ids and texts
        writer = csv.DictWriter(fh, fieldnames=list(columns), restval="")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    tmp.replace(path)


# ---------------------------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------------------------


def _column(rows: Sequence[dict[str, Any]], name: str) -> list[float]:
    return [float(r[name]) for r in rows if r.get(name) is not None and not _isnan(r[name])]


def _isnan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def write_plots(result: EvalResult, out: Path) -> list[Path]:
    """metric_distributions.png, compression_vs_retention.png, length_buckets.png (those with data)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = [r for r in result.rows if r.get("status") == "scored"]
    written = []

    series = [(name, label, _column(scored, name)) for name, label in _DISTRIBUTIONS]
    series = [s for s in series if s[2]]
    if series:
        cols = 3
        rows_n = math.ceil(len(series) / cols)
        fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3.0 * rows_n), squeeze=False)
        for ax, (_name, label, values) in zip(axes.flat, series):
            bins = min(30, max(5, len(values) // 3))
            ax.hist(values, bins=bins, range=_hist_range(values), color="#4C72B0", edgecolor="white")
            ax.ticklabel_format(axis="x", useOffset=False, style="plain")
            ax.set_title(f"{label} (n={len(values)})", fontsize=9)
            ax.axvline(sum(values) / len(values), color="#C44E52", linestyle="--", linewidth=1)
        for ax in list(axes.flat)[len(series) :]:
            ax.axis("off")
        fig.suptitle(f"{result.mode}: per-sample metric distributions (dashed: mean)", fontsize=10)
        fig.tight_layout()
        path = out / PLOT_FILES["distributions"]
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    x_name = "compression_chars_vs_reference" if result.mode == "stage2" else "compression_chars_vs_source"
    if not _column(scored, x_name):
        x_name = "compression_chars_vs_reference"
    y_name = (
        "entity_recall_vs_reference" if _column(scored, "entity_recall_vs_reference") else "entity_recall_vs_source"
    )
    points = [r for r in scored if r.get(x_name) is not None and r.get(y_name) is not None]
    if points:
        fig, ax = plt.subplots(figsize=(6.4, 4.6))
        labels = sorted({r["length_bucket"] for r in points}, key=_bucket_order(result))
        for label in labels:
            subset = [r for r in points if r["length_bucket"] == label]
            ax.scatter([r[x_name] for r in subset], [r[y_name] for r in subset], s=14, alpha=0.7, label=label)
        ax.set_xlabel(x_name.replace("_", " "))
        ax.set_ylabel(y_name.replace("_", " "))
        ax.set_ylim(-0.05, 1.05)
        ax.set_title("compression vs entity retention (colour: input-length bucket)", fontsize=10)
        ax.legend(fontsize=8, title="input chars", title_fontsize=8)
        fig.tight_layout()
        path = out / PLOT_FILES["compression"]
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    buckets = [(label, agg) for label, agg in result.metrics["by_length_bucket"].items() if agg["n"]]
    bars = [(name, label, [_headline(agg).get(name) for _, agg in buckets]) for name, label in _BUCKET_BARS]
    bars = [b for b in bars if any(v is not None for v in b[2])]
    if buckets and bars:
        import numpy as np

        fig, ax = plt.subplots(figsize=(max(6.4, 1.6 * len(buckets) + 2), 4.6))
        x = np.arange(len(buckets))
        width = 0.8 / len(bars)
        for k, (_name, bar_label, bar_values) in enumerate(bars):
            drawn = ax.bar(
                x + k * width, [float(v) if v is not None else 0.0 for v in bar_values], width, label=bar_label
            )
            # A bar of height 0 is invisible and looks like a missing value: every bar carries its number.
            ax.bar_label(drawn, labels=bar_value_labels(bar_values), fontsize=6, padding=1)
        ax.set_xticks(x + width * (len(bars) - 1) / 2)
        ax.set_xticklabels([f"{label}\n(n={agg['n']})" for label, agg in buckets], fontsize=8)
        ax.set_xlabel(result.metrics["length_buckets"]["basis"])
        ax.set_ylim(0, 1.05)
        ax.legend(fontsize=8)
        ax.set_title("metrics by input-length bucket", fontsize=10)
        fig.tight_layout()
        path = out / PLOT_FILES["buckets"]
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def bar_value_labels(values: Sequence[float | None]) -> list[str]:
    """The text over each bar of length_buckets.png: the value, ``0`` for a zero bar, ``n/a`` for a missing one."""
    return ["n/a" if v is None else ("0" if v == 0 else f"{v:.2f}") for v in values]


def _hist_range(values: Sequence[float]) -> tuple[float, float] | None:
    """The x range of a histogram: matplotlib's own, except for near-constant data, which gets a readable ±0.05.

    Stage-2 BERTScore of a summary kept unchanged is 1 within float error; left alone, matplotlib zooms into a 1e-7
    wide range and labels the axis with an offset (``1e-7+1``) nobody can read.
    """
    low, high = min(values), max(values)
    if high - low >= 1e-3:
        return None
    centre = (low + high) / 2
    return centre - 0.05, centre + 0.05


def _bucket_order(result: EvalResult) -> Any:
    order = {label: i for i, label in enumerate(result.metrics["by_length_bucket"])}
    return lambda label: order.get(label, len(order))


# ---------------------------------------------------------------------------------------------------------------
# Headline numbers (shared by report.md, the bucket plot and TensorBoard)
# ---------------------------------------------------------------------------------------------------------------

_BUCKET_BARS = (
    ("bertscore_f1_mean", "BERTScore F1"),
    ("entity_recall_vs_reference_micro", "entity recall vs ref"),
    ("hallucination_rate_micro", "hallucination rate"),
    ("numeric_fidelity_vs_source_micro", "numeric fidelity"),
)


def _get(data: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def _headline(agg: dict[str, Any]) -> dict[str, float | int | None]:
    """The flat headline numbers of one aggregate (overall or a bucket)."""
    out: dict[str, float | int | None] = {"n": agg.get("n")}
    for k in ("precision", "recall", "f1"):
        out[f"bertscore_{k}_mean"] = _get(agg, "bertscore", k, "mean")
    out["bertscore_f1_std"] = _get(agg, "bertscore", "f1", "std")
    for name in ROUGE_TYPES:
        out[f"{name}_f1_mean"] = _get(agg, "rouge", name, "f1", "mean")
    for comparison in ("vs_reference", "vs_source", "reference_vs_source"):
        for kind in ("micro", "macro"):
            for k in ("recall", "precision", "f1"):
                out[f"entity_{k}_{comparison}_{kind}"] = _get(agg, "entities", comparison, kind, "overall", k)
    out["hallucination_rate_micro"] = _get(agg, "hallucination", "rate_micro")
    out["hallucination_rate_macro"] = _get(agg, "hallucination", "rate_macro")
    out["hallucination_samples_with_any"] = _get(agg, "hallucination", "samples_with_any")
    out["reference_hallucination_rate_micro"] = _get(agg, "hallucination", "reference_baseline_rate_micro")
    out["numeric_fidelity_vs_source_micro"] = _get(agg, "numbers", "vs_source", "fidelity_micro")
    out["numeric_fidelity_vs_source_macro"] = _get(agg, "numbers", "vs_source", "fidelity_macro")
    out["numbers_unsupported_vs_source"] = _get(agg, "numbers", "vs_source", "unsupported_total")
    out["reference_numeric_fidelity_vs_source_micro"] = _get(agg, "numbers", "reference_vs_source", "fidelity_micro")
    out["numeric_recall_vs_reference_micro"] = _get(agg, "numbers", "recall_vs_reference", "recall_micro")
    for role in ("reference", "source"):
        for unit in ("chars", "tokens"):
            stats = _get(agg, "compression", f"vs_{role}", unit) or {}
            out[f"compression_{unit}_vs_{role}_mean_of_ratios"] = stats.get("mean_of_ratios")
            out[f"compression_{unit}_vs_{role}_ratio_of_totals"] = stats.get("ratio_of_totals")
    out["generic_entity_recall_vs_reference_mean"] = _get(agg, "generic_entity_recall_vs_reference", "mean")
    return out


# ---------------------------------------------------------------------------------------------------------------
# TensorBoard
# ---------------------------------------------------------------------------------------------------------------


def write_tensorboard(result: EvalResult, log_dir: Path, step: int = 0) -> list[Path]:
    """Scalars (headline numbers, overall and per bucket, per entity type) and histograms of per-sample numbers."""
    import numpy as np
    from torch.utils.tensorboard import SummaryWriter

    log_dir.mkdir(parents=True, exist_ok=True)
    before = set(log_dir.rglob("*"))
    writer = SummaryWriter(log_dir=str(log_dir))
    try:
        overall = result.metrics["overall"]
        for name, value in _headline(overall).items():
            if isinstance(value, int | float) and value is not None and not _isnan(value):
                writer.add_scalar(f"eval/{name}", value, step)
        per_type = _get(overall, "entities", "vs_reference", "micro", "per_type") or {}
        for entity_type, values in per_type.items():
            if values.get("recall") is not None:
                writer.add_scalar(f"eval_entity_recall_vs_reference/{entity_type}", values["recall"], step)
        per_type_h = _get(overall, "hallucination", "per_type_rate_micro") or {}
        for entity_type, value in per_type_h.items():
            if value is not None:
                writer.add_scalar(f"eval_hallucination_rate/{entity_type}", value, step)
        for label, agg in result.metrics["by_length_bucket"].items():
            if not agg["n"]:
                continue
            tag = label.replace("<", "lt").replace(">=", "ge")
            for name in ("n", *[b[0] for b in _BUCKET_BARS]):
                value = _headline(agg).get(name)
                if value is not None:
                    writer.add_scalar(f"eval_bucket_{tag}/{name}", value, step)
        scored = [r for r in result.rows if r.get("status") == "scored"]
        for name, _label in _DISTRIBUTIONS:
            values = _column(scored, name)
            if values:
                writer.add_histogram(f"eval_hist/{name}", np.asarray(values), step)
        writer.flush()
    finally:
        writer.close()
    return sorted(p for p in set(log_dir.rglob("*")) - before if p.is_file())


# ---------------------------------------------------------------------------------------------------------------
# report.md
# ---------------------------------------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or _isnan(value):
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _pair(micro: Any, macro: Any) -> str:
    return f"{_fmt(micro)} / {_fmt(macro)}"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(v) if not isinstance(v, str) else v for v in row) + " |" for row in rows]
    return [*lines, ""]


def _excerpt(text: str | None, limit: int) -> str:
    if text is None:
        return "(not available)"
    text = text.replace("```", "'''")
    return text if len(text) <= limit else text[:limit] + f"\n… [{len(text) - limit} more characters]"


def render_report_md(result: EvalResult, cfg: EvalConfig, plot_names: Sequence[str] = ()) -> str:
    """The human-readable report (see the module docstring for what it contains)."""
    metrics = result.metrics
    labels = {role: info["label"] for role, info in metrics["roles"].items()}
    ref_label = labels.get("reference", "reference")
    src_label = labels.get("source", "source")
    overall = metrics["overall"]
    head = _headline(overall)
    counts = metrics["counts"]
    lines = [f"# Evaluation report — {result.mode}: {labels.get('prediction', 'output')}", ""]
    if cfg.report_include_text:
        lines += [
            "> **This file contains patient text when run on MIMIC**: the examples below quote the notes and "
            "summaries and list their entities. Keep it inside the credentialed environment; "
            "`report_include_text: false` writes a report with ids and numbers only. metrics.json, per_sample.csv, "
            "the plots and TensorBoard hold numbers only.",
            "",
        ]
    else:
        lines += ["> Written with `report_include_text: false`: ids and numbers only, no note or summary text.", ""]
    compared = ", ".join(
        f"{ref_label if r == 'reference' else src_label} (`{info['column']}`)"
        for r, info in metrics["roles"].items()
        if r != "prediction"
    )
    lines += [
        f"- predictions: `{cfg.predictions}` (`{metrics['roles']['prediction']['column']}`), "
        f"{counts['prediction_rows']} rows",
        f"- compared with: {compared}",
        f"- scored: {counts['scored']}; skipped: {counts['skipped_total']} "
        f"({', '.join(f'{k}: {v}' for k, v in counts['skipped'].items()) or 'none'}); empty outputs scored as "
        f"failures: {counts['empty_predictions_scored']}",
    ]
    if counts.get("references_without_prediction"):
        reason = counts.get("references_without_prediction_reason")
        lines.append(
            f"- references without a prediction: {counts['references_without_prediction']}"
            + (f" (expected: {reason})" if reason else "")
        )
    if counts.get("compression_fallbacks") is not None:
        lines.append(
            f"- compression fallbacks (compress kept the stage-1 summary: no attempt kept enough entities): "
            f"{counts['compression_fallbacks']}"
        )
    if counts.get("notes_shortened"):
        lines.append(
            f"- notes shortened by prepare_data to fit the token budget: {counts['notes_shortened']} (facts of a "
            "reference may be missing from its shortened note, which inflates hallucination vs source)"
        )
    if metrics.get("not_computed"):
        lines.append(f"- not computed (no {ref_label}): {', '.join(metrics['not_computed'])}")
    for warning in metrics.get("warnings", []):
        lines.append(f"- **warning**: {warning}")
    lines.append("")

    lines += ["## Headline", ""]
    rows: list[list[Any]] = []
    bs = metrics.get("bertscore_settings")
    if bs:
        rows.append(
            [
                "BERTScore F1 (mean ± sample std)",
                f"{_fmt(head['bertscore_f1_mean'])} ± {_fmt(head['bertscore_f1_std'])}",
                f"vs {ref_label}; `{bs['model']}` layer {bs['num_layers']}, window {bs['window_tokens']} tokens, "
                f"long texts: {bs['long_text']} ({bs['samples_over_window']} samples over the window, "
                f"{bs['samples_truncated']} truncated)",
            ]
        )
        rows.append(
            [
                "BERTScore P / R (mean)",
                f"{_fmt(head['bertscore_precision_mean'])} / {_fmt(head['bertscore_recall_mean'])}",
                "",
            ]
        )
    if "rouge" in overall:
        rs = metrics.get("rouge_settings", {})
        rows.append(
            [
                "ROUGE-1 / 2 / L / Lsum F1 (mean)",
                " / ".join(_fmt(head[f"{n}_f1_mean"]) for n in ROUGE_TYPES),
                f"vs {ref_label}; tokenizer `{rs.get('tokenizer')}`, stemmer {rs.get('use_stemmer')}",
            ]
        )
    if "vs_reference" in overall.get("entities", {}):
        for k in ("recall", "precision", "f1"):
            rows.append(
                [
                    f"entity {k} vs {ref_label} (micro / macro)",
                    _pair(head[f"entity_{k}_vs_reference_micro"], head[f"entity_{k}_vs_reference_macro"]),
                    "",
                ]
            )
    if "vs_source" in overall.get("entities", {}):
        rows.append(
            [
                f"entity recall vs {src_label} (micro / macro)",
                _pair(head["entity_recall_vs_source_micro"], head["entity_recall_vs_source_macro"]),
                "",
            ]
        )
    if "hallucination" in overall:
        h = overall["hallucination"]
        rows.append(
            [
                f"hallucinated-entity rate: output entities not in the {src_label} (micro / macro)",
                _pair(h["rate_micro"], h["rate_macro"]),
                f"{h['extra_total']} of {h['output_entities_total']} entities; {h['samples_with_any']} of "
                f"{overall['n']} samples have any; {ref_label} itself: {_fmt(h['reference_baseline_rate_micro'])}",
            ]
        )
    vs = _get(overall, "numbers", "vs_source")
    if vs:
        rows.append(
            [
                f"numeric fidelity: output numbers found in the {src_label} (micro / macro)",
                _pair(vs["fidelity_micro"], vs["fidelity_macro"]),
                f"{vs['unsupported_total']} of {vs['output_numbers_total']} numbers unsupported; "
                f"{vs['samples_with_unsupported']} samples; {ref_label} itself: "
                f"{_fmt(head['reference_numeric_fidelity_vs_source_micro'])}",
            ]
        )
    if head["numeric_recall_vs_reference_micro"] is not None:
        rows.append(
            [f"numeric recall: {ref_label} numbers kept (micro)", _fmt(head["numeric_recall_vs_reference_micro"]), ""]
        )
    if head["generic_entity_recall_vs_reference_mean"] is not None:
        rows.append(
            [
                "generic scispaCy entity recall (seed's metric, mean)",
                _fmt(head["generic_entity_recall_vs_reference_mean"]),
                "",
            ]
        )
    lines += _table(["metric", "value", "notes"], rows)

    per_ref = _get(overall, "entities", "vs_reference", "micro", "per_type")
    per_src = _get(overall, "entities", "vs_source", "micro", "per_type")
    if per_ref or per_src:
        lines += ["## Entities per type (micro)", ""]
        types = list((per_ref or per_src).keys())
        table_rows = []
        for t in types:
            r = (per_ref or {}).get(t, {})
            s = (per_src or {}).get(t, {})
            table_rows.append(
                [
                    t,
                    (r.get("retained", 0) + r.get("missing", 0)) if per_ref else None,
                    r.get("recall"),
                    r.get("precision"),
                    r.get("f1"),
                    s.get("recall"),
                    s.get("hallucination_rate"),
                ]
            )
        lines += _table(
            [
                "type",
                f"{ref_label} entities",
                f"recall vs {ref_label}",
                f"precision vs {ref_label}",
                "F1",
                f"recall vs {src_label}",
                "hallucination rate",
            ],
            table_rows,
        )
        lines += ["Undefined values (no entity of that type to find, or none produced) are shown as –.", ""]

    if overall.get("compression"):
        lines += ["## Compression (output length / other length)", ""]
        comp_rows = []
        for key, stats_by_unit in overall["compression"].items():
            other = ref_label if key == "vs_reference" else src_label
            for unit, st in stats_by_unit.items():
                unit_label = "characters" if unit == "chars" else f"tokens ({metrics['token_counter']})"
                comp_rows.append(
                    [
                        f"vs {other}",
                        unit_label,
                        st["mean_of_ratios"],
                        st["median_ratio"],
                        st["std_ratio"],
                        st["ratio_of_totals"],
                        st["n"],
                    ]
                )
        lines += _table(
            ["comparison", "unit", "mean of ratios", "median", "sample std", "ratio of totals", "n"], comp_rows
        )
        lines += [
            "The mean of per-sample ratios weighs every sample equally (a short note with a long output pulls it "
            "up); the ratio of totals is total output length over total other length. Report both.",
            "",
        ]

    lines += [f"## By input length ({metrics['length_buckets']['basis']})", ""]
    bucket_rows = []
    comp_key = (
        "compression_chars_vs_reference_ratio_of_totals"
        if result.mode == "stage2"
        else "compression_chars_vs_source_ratio_of_totals"
    )
    for label in length_bucket_labels(metrics["length_buckets"]["bounds"]):
        agg = metrics["by_length_bucket"][label]
        hb = _headline(agg)
        bucket_rows.append(
            [
                label,
                agg["n"],
                hb["bertscore_f1_mean"],
                hb["rougeL_f1_mean"],
                hb["entity_recall_vs_reference_micro"],
                hb["entity_f1_vs_reference_micro"],
                hb["hallucination_rate_micro"],
                hb["numeric_fidelity_vs_source_micro"],
                hb[comp_key],
            ]
        )
    comp_label = f"chars / {ref_label if result.mode == 'stage2' else src_label} (ratio of totals)"
    lines += _table(
        [
            "bucket",
            "n",
            "BERTScore F1",
            "ROUGE-L F1",
            "entity recall",
            "entity F1",
            "hallucination",
            "numeric fidelity",
            comp_label,
        ],
        bucket_rows,
    )

    if counts["skipped"]:
        lines += ["## Skipped prediction rows", ""]
        lines += _table(["reason", "rows"], [[k, v] for k, v in counts["skipped"].items()])

    if plot_names:
        lines += ["## Plots", ""] + [f"![{name}]({name})" for name in plot_names] + [""]

    lines += _examples_section(result, cfg, ref_label, src_label)
    bs_line = ""
    if bs:
        bs_line = (
            " BERTScore: bert_score's greedy matching, no idf, no baseline rescaling, "
            f"{bs['dtype']} on {bs['device']}."
        )
    lines += [
        "## Definitions",
        "",
        "Entities are matched on normalised keys with set semantics (`dischargesum.evaluation.entities`); micro "
        "pools counts over samples, macro averages per-sample values. Hallucinated entities are output entities not "
        f"supported by the {src_label}; numeric fidelity is the share of the output's distinct numbers found in the "
        f"{src_label}." + bs_line + " Full definitions: the docstring of `dischargesum/evaluation/__init__.py`.",
        "",
    ]
    return "\n".join(lines)


def _examples_section(result: EvalResult, cfg: EvalConfig, ref_label: str, src_label: str) -> list[str]:
    if cfg.report_examples == 0 or not result.samples:
        return []
    scored = [r for r in result.rows if r.get("status") == "scored"]
    for key in ("entity_f1_vs_reference", "entity_f1_vs_source", "bertscore_f1", "rougeL_f1"):
        if any(r.get(key) is not None for r in scored):
            break
    else:
        return []
    ranked = sorted(
        (i for i, r in enumerate(scored) if r.get(key) is not None),
        key=lambda i: (scored[i][key], scored[i].get("bertscore_f1") or 0.0, scored[i]["note_id"]),
    )
    k = min(cfg.report_examples, len(ranked) // 2 if len(ranked) > 1 else len(ranked))
    worst = ranked[:k]
    best = list(reversed(ranked[len(ranked) - k :])) if len(ranked) > 1 else []
    lines = [f"## Worst and best examples (by {key.replace('_', ' ')})", ""]
    for title, picks in (("Worst", worst), ("Best", best)):
        for rank, i in enumerate(picks, 1):
            lines += _example(result, i, f"{title} {rank}", key, cfg, ref_label, src_label)
    return lines


def _entity_list(entities: Sequence[Any], include_text: bool) -> str:
    if not entities:
        return "none"
    if not include_text:
        by_type: dict[str, int] = {}
        for entity in entities:
            by_type[entity.type] = by_type.get(entity.type, 0) + 1
        return ", ".join(f"{t}: {n}" for t, n in by_type.items())
    return "; ".join(f"{e.type}: `{e.describe()}`" for e in entities)


def _example(
    result: EvalResult, index: int, title: str, key: str, cfg: EvalConfig, ref_label: str, src_label: str
) -> list[str]:
    sample = result.samples[index]
    scores = result.text_scores[index]
    row = result.rows[index]
    names = dict.fromkeys((key, "bertscore_f1", "rougeL_f1", "hallucination_rate", "compression_chars_vs_reference"))
    stats = ", ".join(f"{name.replace('_', ' ')} {_fmt(row.get(name))}" for name in names if row.get(name) is not None)
    lines = [f"### {title}: note_id `{sample.note_id}` ({row['length_bucket']} chars)", "", stats, ""]
    text = cfg.report_include_text
    if scores.vs_reference is not None:
        lines.append(
            f"- in the {ref_label}, missing from the output: {_entity_list(scores.vs_reference.missing, text)}"
        )
    if scores.vs_source is not None:
        lines.append(
            f"- in the output, not supported by the {src_label}: {_entity_list(scores.vs_source.extra, text)}"
        )
    elif scores.vs_reference is not None:
        lines.append(f"- in the output, not in the {ref_label}: {_entity_list(scores.vs_reference.extra, text)}")
    if scores.numbers_vs_source is not None:
        numbers = scores.numbers_vs_source["unsupported_numbers"]
        shown = ", ".join(f"`{n}`" for n in numbers) if text else str(len(numbers))
        lines.append(f"- numbers not in the {src_label}: {shown or 'none'}")
    lines.append("")
    if text:
        for label, value in (("output", sample.prediction), (ref_label, sample.reference)):
            if label == ref_label and value is None:
                continue
            lines += [
                f"<details><summary>{label}</summary>",
                "",
                "```text",
                _excerpt(value, cfg.report_max_chars),
                "```",
                "",
                "</details>",
                "",
            ]
    return lines
