"""sha256 of every artifact the demo produces that must not change under a behaviour-preserving refactor.

    python scripts/demo_digest.py [--output_dir outputs/demo] [--out digest.json] [--compare other_digest.json]

Hashes the splits (parquet), the data card and rejects, the trained adapter weights, the stage-1 and stage-2
predictions (each record's `seconds` removed) and each eval run's metrics (its `timing_s` block removed), per-sample
scores and report: wall times differ run to run, nothing else may. Files that record when or how long something ran
(manifests, TensorBoard events, plots) are left out on purpose. `--compare` exits 1 and names every file whose
digest differs or is missing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

# Relative to the demo root. Each entry is a file the demo must reproduce byte for byte.
ARTIFACTS = (
    "data/train.parquet",
    "data/validation.parquet",
    "data/test.parquet",
    "data/data_card.json",
    "data/rejects.jsonl",
    "sft/final/adapter_model.safetensors",
    "generate/stage1.jsonl",
    "compress/stage2.jsonl",
    "eval/metrics.json",
    "eval/per_sample.csv",
    "eval/report.md",
    "eval_stage2/metrics.json",
    "eval_stage2/per_sample.csv",
    "eval_stage2/report.md",
)

# Keys holding wall-clock measurements: dropped before hashing a JSON file (eval's timings) or each record of a JSONL
# file (generate's and compress's per-note seconds).
VOLATILE_JSON_KEYS = ("timing_s",)
VOLATILE_RECORD_KEYS = ("seconds",)


def _digest(path: Path) -> str:
    if path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict):
            for key in VOLATILE_JSON_KEYS:
                data.pop(key, None)
        payload = json.dumps(data, sort_keys=True, ensure_ascii=False).encode("utf-8")
    elif path.suffix == ".jsonl" and path.parent.name != "data":
        records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        for record in records:
            for key in VOLATILE_RECORD_KEYS:
                record.pop(key, None)
        payload = "\n".join(json.dumps(r, sort_keys=True, ensure_ascii=False) for r in records).encode("utf-8")
    else:
        payload = path.read_bytes()
    return hashlib.sha256(payload).hexdigest()


def digest(root: Path) -> dict[str, str | None]:
    return {name: (_digest(root / name) if (root / name).is_file() else None) for name in ARTIFACTS}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="outputs/demo", help="the demo's output directory")
    parser.add_argument("--out", help="write the digest here as JSON (default: print it)")
    parser.add_argument("--compare", help="a digest JSON written earlier: exit 1 on any difference")
    args = parser.parse_args(argv)
    current = digest(Path(args.output_dir))
    text = json.dumps(current, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    else:
        sys.stdout.write(text + "\n")
    if args.compare:
        earlier = json.loads(Path(args.compare).read_text(encoding="utf-8"))
        differ = [name for name in ARTIFACTS if current.get(name) != earlier.get(name) or current.get(name) is None]
        for name in differ:
            sys.stderr.write(f"DIFFERS: {name}: {earlier.get(name)} -> {current.get(name)}\n")
        sys.stderr.write(f"{len(ARTIFACTS) - len(differ)}/{len(ARTIFACTS)} artifacts identical\n")
        return 1 if differ else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
