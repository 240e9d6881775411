"""Scores that need no model: ROUGE with a clinical tokenizer, summary statistics, compression and numeric
statistics, length buckets (definitions: the docstring of :mod:`dischargesum.evaluation`)."""

from __future__ import annotations

import itertools
import math
import re
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")

# ---- ROUGE -----------------------------------------------------------------------------------------------------

_CLINICAL_TOKEN_RE = re.compile(r"\d+(?:[.,/:]\d+)*|[^\W\d_][^\W_]*|%")


class ClinicalRougeTokenizer:
    """rouge_score tokenizer keeping case, decimals, ratios, dates and times (see :mod:`dischargesum.evaluation`)."""

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


# ---- statistics ------------------------------------------------------------------------------------------------


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
