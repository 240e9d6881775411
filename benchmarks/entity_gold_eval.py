"""Score ``dischargesum.entities`` on the hand-annotated gold set and measure its speed.

Launch (from the repository root)::

    python benchmarks/entity_gold_eval.py [--gold tests/data/entity_gold.jsonl]
        [--output benchmarks/results/entity_extractor_gold.json] [--speed_texts 2000]

Gold set (``tests/data/entity_gold.jsonl``): one sentence or short block per line,
``{"id", "text", "entities": [{"type", "text", "negated"}], "source": "handwritten" | "template"}``; entities are
listed in text order and ``text`` is the exact surface span (located left to right). Annotation guideline: a
medication span runs over its dose / route / frequency; labs and vitals are annotated only with a value (name
through value, or the bare value in an unlabelled vitals line); diagnoses include problems and symptoms; a
mention counts whatever its assertion (negated ones are flagged); ``___`` blanks are never dates. Lines carry
``"split"``: the ``dev`` lines were written before the extractor was first run on them, and its *generic* bugs
they exposed were then fixed (value followed by a full stop, reference ranges read as values, negation scope
over prepositions and "resolved"), so ``dev`` figures are in-sample; the ``heldout`` lines were written after that
and scored once, with no change to the extractor. Both include things the extractor misses (misspellings,
unlisted drugs and problems, unlabelled vitals, lab ratios).

Scoring is span-level and one-to-one: a predicted entity matches a gold entity of the same type when their
character spans *overlap* (the headline figures; span extents differ legitimately, e.g. "Cr 1.4" vs "Cr 1.4 mg/dL")
and, separately, when they are *exactly* equal. Negation accuracy is measured over overlap-matched pairs.
Speed: texts/s of ``extract_entities_batch`` on ~2,000-character texts built from the gold sentences.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from dischargesum.entities import ENTITY_TYPES, Entity, extract_entities_batch  # noqa: E402

DEFAULT_GOLD = REPO_ROOT / "tests" / "data" / "entity_gold.jsonl"
DEFAULT_OUTPUT = REPO_ROOT / "benchmarks" / "results" / "entity_extractor_gold.json"


def load_gold(path: Path) -> list[dict[str, Any]]:
    """Read the gold JSONL and attach character offsets to every annotation.

    Raises:
        ValueError: if a line lacks a field, has an unknown type, or an annotation's text is not found in order.
    """
    records = []
    for line_number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        record = json.loads(line)
        for field in ("id", "text", "entities", "source"):
            if field not in record:
                raise ValueError(f"{path}:{line_number}: missing field {field!r}")
        cursor = 0
        for entity in record["entities"]:
            if entity["type"] not in ENTITY_TYPES:
                raise ValueError(f"{path}:{line_number}: unknown type {entity['type']!r}")
            start = record["text"].find(entity["text"], cursor)
            if start < 0:
                raise ValueError(f"{path}:{line_number}: {entity['text']!r} not found after offset {cursor}")
            entity["start"], entity["end"] = start, start + len(entity["text"])
            cursor = entity["end"]
        records.append(record)
    return records


def _ratio(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


def _f1(precision: float | None, recall: float | None) -> float | None:
    if precision is None or recall is None:
        return None
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def score_gold(records: Sequence[dict[str, Any]], predictions: Sequence[Sequence[Entity]]) -> dict[str, Any]:
    """Per-type span-level precision / recall / F1 (overlap and exact) and negation accuracy.

    Raises:
        ValueError: if ``records`` and ``predictions`` differ in length.
    """
    if len(records) != len(predictions):
        raise ValueError(f"{len(records)} gold records but {len(predictions)} prediction lists")
    counts = {
        t: {"gold": 0, "pred": 0, "tp_overlap": 0, "tp_exact": 0, "neg_pairs": 0, "neg_agree": 0} for t in ENTITY_TYPES
    }
    misses: list[dict[str, Any]] = []
    false_positives: list[dict[str, Any]] = []
    for record, predicted in zip(records, predictions, strict=True):
        used: set[int] = set()
        for entity in predicted:
            counts[entity.type]["pred"] += 1
        for gold in record["entities"]:
            bucket = counts[gold["type"]]
            bucket["gold"] += 1
            best, best_overlap = None, 0
            for index, entity in enumerate(predicted):
                if index in used or entity.type != gold["type"]:
                    continue
                overlap = min(entity.end, gold["end"]) - max(entity.start, gold["start"])
                if overlap > best_overlap:
                    best, best_overlap = index, overlap
            if best is None:
                misses.append({"id": record["id"], "type": gold["type"], "text": gold["text"]})
                continue
            used.add(best)
            match = predicted[best]
            bucket["tp_overlap"] += 1
            bucket["tp_exact"] += int(match.start == gold["start"] and match.end == gold["end"])
            bucket["neg_pairs"] += 1
            bucket["neg_agree"] += int(match.negated == gold["negated"])
        for index, entity in enumerate(predicted):
            if index not in used:
                false_positives.append({"id": record["id"], "type": entity.type, "text": entity.text})

    def summarise(c: dict[str, int]) -> dict[str, Any]:
        precision, recall = _ratio(c["tp_overlap"], c["pred"]), _ratio(c["tp_overlap"], c["gold"])
        exact_p, exact_r = _ratio(c["tp_exact"], c["pred"]), _ratio(c["tp_exact"], c["gold"])
        return {
            **c,
            "precision": precision,
            "recall": recall,
            "f1": _f1(precision, recall),
            "exact_precision": exact_p,
            "exact_recall": exact_r,
            "exact_f1": _f1(exact_p, exact_r),
            "negation_accuracy": _ratio(c["neg_agree"], c["neg_pairs"]),
        }

    total = {key: sum(c[key] for c in counts.values()) for key in next(iter(counts.values()))}
    return {
        "per_type": {t: summarise(c) for t, c in counts.items()},
        "overall": summarise(total),
        "misses": misses,
        "false_positives": false_positives,
    }


def measure_speed(records: Sequence[dict[str, Any]], n_texts: int, target_chars: int = 2000) -> dict[str, Any]:
    """Texts/s of ``extract_entities_batch`` on ~``target_chars``-character texts made of gold sentences."""
    sentences = [record["text"] for record in records]
    texts, current, index = [], [], 0
    while len(texts) < n_texts:
        current.append(sentences[index % len(sentences)])
        index += 7  # step through the gold so consecutive texts differ
        if sum(len(s) + 1 for s in current) >= target_chars:
            texts.append(" ".join(current))
            current = []
    extract_entities_batch(texts[:10])  # build the pipeline outside the timed region
    started = time.perf_counter()
    results = extract_entities_batch(texts)
    elapsed = time.perf_counter() - started
    return {
        "n_texts": len(texts),
        "mean_chars": sum(map(len, texts)) / len(texts),
        "seconds": elapsed,
        "texts_per_second": len(texts) / elapsed,
        "entities_per_text": sum(map(len, results)) / len(results),
    }


def _versions() -> dict[str, str]:
    import importlib.metadata as metadata

    versions = {"python": platform.python_version()}
    for package in ("spacy", "scispacy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def format_table(scores: dict[str, Any]) -> str:
    def cell(value: float | None) -> str:
        return "  n/a" if value is None else f"{value:5.3f}"

    header = f"{'type':<11} {'gold':>5} {'pred':>5} {'P':>6} {'R':>6} {'F1':>6} {'exactF1':>8} {'neg acc':>8}"
    lines = [header, "-" * len(header)]
    for name, row in [*scores["per_type"].items(), ("overall", scores["overall"])]:
        lines.append(
            f"{name:<11} {row['gold']:>5} {row['pred']:>5} {cell(row['precision']):>6} {cell(row['recall']):>6} "
            f"{cell(row['f1']):>6} {cell(row['exact_f1']):>8} {cell(row['negation_accuracy']):>8}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gold", type=Path, default=DEFAULT_GOLD, help="gold JSONL")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="where to write the JSON result")
    parser.add_argument("--speed_texts", type=int, default=2000, help="number of ~2,000-character texts to time")
    args = parser.parse_args(argv)

    records = load_gold(args.gold)
    predictions = extract_entities_batch([record["text"] for record in records])
    scores = score_gold(records, predictions)
    speed = measure_speed(records, args.speed_texts)
    by_source, by_split = {}, {}
    for field, table in (("source", by_source), ("split", by_split)):
        for value in sorted({record.get(field, "dev") for record in records}):
            subset = [(r, p) for r, p in zip(records, predictions, strict=True) if r.get(field, "dev") == value]
            scored = score_gold([r for r, _ in subset], [p for _, p in subset])
            table[value] = {"overall": scored["overall"], "per_type": scored["per_type"]}
    result = {
        "benchmark": "entity_extractor_gold",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join(
            ["python", "benchmarks/entity_gold_eval.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "gold": str(args.gold.relative_to(REPO_ROOT) if args.gold.is_relative_to(REPO_ROOT) else args.gold),
        "n_records": len(records),
        "matching": "span-level, one-to-one, same type; headline = character overlap, exact_* = identical span",
        "versions": _versions(),
        "device": {"platform": platform.platform(), "processor": platform.processor(), "cpu_count": os.cpu_count()},
        "speed": speed,
        "per_type": scores["per_type"],
        "overall": scores["overall"],
        "by_source": by_source,
        "by_split": by_split,
        "misses": scores["misses"],
        "false_positives": scores["false_positives"],
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(format_table(scores))
    for split, table in by_split.items():
        print(f"\nsplit={split}")
        print(format_table(table))
    rate, n_texts, chars = speed["texts_per_second"], speed["n_texts"], speed["mean_chars"]
    print(f"speed: {rate:.1f} texts/s on {n_texts} texts of ~{chars:.0f} chars")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
