"""data_card.json and the length histograms: what a reviewer needs to trust a prepared dataset without rerunning it.

The card holds no patient text and no timestamps (it is byte-identical across reruns); the manifest holds the
when and where. Stripped instruction prefixes are recorded as counts and sha256 digests only: a prefix can carry a
name, MRN and date of birth, and the card is copied next to the adapter (``final/data_fingerprint.json``). Keys
other stages read: ``instruction``, ``tokenizer_name_or_path``, ``max_seq_length``,
``normalization``, ``data_fingerprint``.

``splits.<split>.target_entity_support`` (counts and fractions only): of the summaries' distinct entities, how many
the model input supports before shortening (the whole normalised note) and after (the note written), for the
shortened notes and — with ``entity_support_stats: all`` — for every note; "supported" is eval's matching
(:mod:`dischargesum.data.target_support`). ``length_budget.rank_by_target`` says how sections were ranked.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dischargesum.data import schema
from dischargesum.data.budget import chat_template_fingerprint
from dischargesum.data.shorten import DROP_ORDER, MARKER
from dischargesum.data.validate import REASONS

if TYPE_CHECKING:
    from dischargesum.config import PrepareDataConfig
    from dischargesum.data.readers import SourceInfo
    from dischargesum.data.split import SplitTracker

CARD_VERSION = 3  # 2: instruction prefixes as digests, no text; 3: target-entity support before/after shortening
PLOT_FILES = ("lengths_tokens.png", "lengths_chars.png")


def length_stats(values: np.ndarray) -> dict[str, float | int]:
    """count, mean, min, p50, p90, p95, p99, max of an integer array (empty -> count 0 only)."""
    if values.size == 0:
        return {"count": 0}
    q = np.percentile(values, [50, 90, 95, 99], method="nearest")
    return {
        "count": int(values.size),
        "mean": round(float(values.mean()), 2),
        "min": int(values.min()),
        "p50": int(q[0]),
        "p90": int(q[1]),
        "p95": int(q[2]),
        "p99": int(q[3]),
        "max": int(values.max()),
    }


def support_summary(
    target: np.ndarray, before: np.ndarray, after: np.ndarray, rows: np.ndarray
) -> dict[str, float | int | None]:
    """Micro-averaged target-entity support over the selected ``rows`` (a boolean mask)."""
    entities = int(target[rows].sum())
    supported_before, supported_after = int(before[rows].sum()), int(after[rows].sum())
    return {
        "notes": int(rows.sum()),
        "target_entities": entities,
        "supported_before": supported_before,
        "supported_after": supported_after,
        "fraction_before": round(supported_before / entities, 4) if entities else None,
        "fraction_after": round(supported_after / entities, 4) if entities else None,
    }


def target_entity_support(arrays: dict[str, np.ndarray], mode: str) -> dict[str, Any] | None:
    """The card's per-split block: target (summary) entities supported by the input before / after shortening.

    ``shortened``: the notes the budget shortened; ``all``: every note of the split (present with
    ``entity_support_stats: all`` only; unshortened notes count the same before and after). None when off.
    """
    if mode == "off":
        return None
    empty = np.zeros(0, dtype=np.int64)
    target = arrays.get("target_entities", empty)
    before, after = arrays.get("supported_before", empty), arrays.get("supported_after", empty)
    shortened = arrays.get("note_shortened", empty).astype(bool) & (target >= 0)
    block: dict[str, Any] = {"shortened": support_summary(target, before, after, shortened)}
    if mode == "all":
        block["all"] = support_summary(target, before, after, target >= 0)
    return block


def build_card(
    *,
    cfg: PrepareDataConfig,
    info: SourceInfo,
    tokenizer: Any,
    rows_read: int,
    rejects: list[dict[str, Any]],
    tracker: SplitTracker,
    lengths: dict[str, dict[str, np.ndarray]],
    stats: Counter[str],
    prefixes: Counter[str],
    shortening: Counter[str],
    files: dict[str, Any],
    data_fingerprint: str,
    seed_backends: dict[str, str] | None,
    counting_mode: str,
) -> dict[str, Any]:
    by_reason = Counter(r["reason"] for r in rejects)
    patients = tracker.patients_per_split()
    splits: dict[str, Any] = {}
    for split in schema.SPLITS:
        arrays = lengths[split]
        rows = tracker.rows.get(split, 0)
        splits[split] = {
            "rows": rows,
            "patients": patients[split],
            "row_fraction": round(rows / max(1, sum(tracker.rows.values())), 4),
            "notes_shortened": int(arrays["note_shortened"].sum()) if "note_shortened" in arrays else 0,
            "target_entity_support": target_entity_support(arrays, cfg.entity_support_stats),
            "lengths": {
                name: length_stats(arrays.get(name, np.zeros(0, dtype=np.int64)))
                for name in (
                    "prompt_tokens",
                    "completion_tokens",
                    "total_tokens",
                    "note_chars",
                    "note_chars_original",
                    "summary_chars",
                )
            },
        }
    kept = sum(tracker.rows.values())
    card: dict[str, Any] = {
        "card_version": CARD_VERSION,
        "stage": "prepare_data",
        "source": info.describe(),
        "instruction": cfg.instruction,
        "tokenizer_name_or_path": cfg.tokenizer_name_or_path,
        "chat_template_sha256": chat_template_fingerprint(tokenizer),
        "max_seq_length": cfg.max_seq_length,
        "normalization": cfg.normalization,
        "normalization_details": _normalization_details(cfg, seed_backends, stats),
        "accounting": {
            "rows_read": rows_read,
            "rows_kept": kept,
            "rows_rejected": len(rejects),
            "invariant_holds": rows_read == kept + len(rejects),
        },
        # `sample_fraction` < 1: the accounting covers the sampled rows; the other rows were skipped unvalidated.
        "sample": {"fraction": cfg.sample_fraction, "rows_skipped": stats.get("sample_rows_skipped", 0)},
        "reject_fraction": round(len(rejects) / max(1, rows_read), 6),
        "max_reject_fraction": cfg.max_reject_fraction,
        "rejects_by_reason": {reason: by_reason.get(reason, 0) for reason in REASONS},
        "reject_reasons": REASONS,
        "subject_id_derived_from_note_id": stats.get("subject_id_derived", 0),
        "utf8_replaced_rows": stats.get("utf8_replaced", 0),
        "gt_entities_invalid": stats.get("gt_entities_invalid", 0),
        "instruction_prefix": {
            "rows_stripped": stats.get("instruction_prefix_stripped", 0),
            "distinct": len(prefixes),
            "digest": "sha256 of the prefix's UTF-8 text, first 16 hex digits",
            "most_common": [{"sha256_16": digest, "rows": rows} for digest, rows in prefixes.most_common(10)],
        },
        "split": {
            "method": "input column" if cfg.input_split_column else "sha256(seed:subject_id)",
            "input_split_column": cfg.input_split_column,
            "seed": cfg.seed,
            "validation_fraction": cfg.validation_fraction,
            "test_fraction": cfg.test_fraction,
            "patients": tracker.patients,
            "patients_in_more_than_one_split": tracker.crossing_patients,
        },
        "splits": splits,
        "length_budget": {
            "max_seq_length": cfg.max_seq_length,
            "counted_as": "TRL SFTTrainer conversational prompt-completion: len(apply_chat_template(prompt + "
            "completion)); the summary is never shortened",
            "note_shortening": cfg.note_shortening,
            "drop_order": list(DROP_ORDER) if cfg.note_shortening == "sections" else [],
            "rank_by_target": (
                "train and validation: sections supporting the fewest summary entities dropped first (drop_order "
                "breaks ties); test: drop_order (as at inference, where there is no target)"
                if cfg.note_shortening == "sections" and cfg.shortening_rank_by_target
                else None
            ),
            "target_entity_support": (
                None
                if cfg.entity_support_stats == "off"
                else "summary entities (distinct matching keys, dischargesum.evaluation.entities) covered by an "
                "entity of the model input, as eval's reference_vs_source; before = the whole normalised note, "
                "after = the note written;"
                f" per split in splits.*.target_entity_support ({cfg.entity_support_stats} notes)"
            ),
            "marker": MARKER,
            "min_note_tokens": cfg.min_note_tokens,
            "token_counting": {
                "config": cfg.token_counting,
                "mode": counting_mode,
                **{k.split(":", 1)[1]: v for k, v in sorted(shortening.items()) if k.startswith("token_counting:")},
            },
            "rows_shortened": sum(v for k, v in shortening.items() if k.startswith("fit_rounds_")),
            "events": {k: v for k, v in sorted(shortening.items()) if not k.startswith("token_counting:")},
        },
        "files": files,
        "data_fingerprint": data_fingerprint,
    }
    return card


def _normalization_details(
    cfg: PrepareDataConfig, seed_backends: dict[str, str] | None, stats: Counter[str]
) -> dict[str, Any]:
    if cfg.normalization == "clinical":
        return {
            "steps": [
                "strip instruction prefix",
                "unicode NFC",
                "collapse horizontal whitespace, keep line breaks (max one blank line)",
            ],
            "kept": "case, digits, units, punctuation, negations, ___ blanks",
        }
    return {
        "steps": [
            "strip instruction prefix",
            "lowercase",
            "non-letters to spaces",
            "NLTK tokenise",
            "drop NLTK English stopwords",
            "WordNet lemmatise",
            f"drop words seen < {cfg.seed_min_word_count} times",
        ],
        "warning": "LOSSY: removes digits, units, negations and ___ blanks; for comparison with the seed only",
        "backends": seed_backends,
        "vocabulary": stats.get("seed_vocabulary", 0),
        "vocabulary_kept": stats.get("seed_vocabulary_kept", 0),
    }


def write_length_plots(out: Path, lengths: dict[str, dict[str, np.ndarray]], max_seq_length: int) -> list[str]:
    """Histograms of token and character lengths per split; returns the file names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = {
        PLOT_FILES[0]: (("total_tokens", "training sequence (tokens)"), ("completion_tokens", "summary (tokens)")),
        PLOT_FILES[1]: (
            ("note_chars_original", "note before shortening (chars)"),
            ("summary_chars", "summary (chars)"),
        ),
    }
    for name, specs in panels.items():
        fig, axes = plt.subplots(1, len(specs), figsize=(11, 3.8))
        for ax, (key, title) in zip(axes, specs):
            for split in schema.SPLITS:
                values = lengths[split].get(key)
                if values is not None and values.size:
                    ax.hist(values, bins=50, alpha=0.55, label=f"{split} (n={values.size})")
            if key == "total_tokens":
                ax.axvline(max_seq_length, color="black", linestyle="--", linewidth=1, label="max_seq_length")
            ax.set_title(title)
            ax.set_ylabel("rows")
            ax.legend(fontsize=8)
        fig.tight_layout()
        # No Software/date metadata: reruns give byte-identical PNGs.
        fig.savefig(out / name, dpi=80, metadata={"Software": None})
        plt.close(fig)
    return list(panels)
