"""scripts/demo_digest.py: wall times are ignored, any other change is caught."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def _module():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("demo_digest", ROOT / "scripts" / "demo_digest.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tree(root: Path, *, seconds: float, timing: float, summary: str) -> Path:
    (root / "generate").mkdir(parents=True)
    (root / "eval").mkdir()
    record = {"note_id": "1", "summary": summary, "seconds": seconds}
    (root / "generate" / "stage1.jsonl").write_text(json.dumps(record) + "\n")
    (root / "eval" / "metrics.json").write_text(
        json.dumps({"overall": {"rouge1": 0.5}, "timing_s": {"total": timing}})
    )
    return root


def test_wall_times_do_not_count_but_content_does(tmp_path: Path) -> None:
    digest = _module()
    a = digest.digest(_tree(tmp_path / "a", seconds=0.1, timing=3.0, summary="metoprolol 25 mg"))
    b = digest.digest(_tree(tmp_path / "b", seconds=9.9, timing=7.0, summary="metoprolol 25 mg"))
    c = digest.digest(_tree(tmp_path / "c", seconds=0.1, timing=3.0, summary="metoprolol 50 mg"))
    assert a == b
    assert a["generate/stage1.jsonl"] != c["generate/stage1.jsonl"]
    assert a["data/train.parquet"] is None  # missing files are reported, not skipped


def test_compare_passes_only_when_every_artifact_matches(tmp_path: Path) -> None:
    digest = _module()
    root = tmp_path / "demo"
    for name in digest.ARTIFACTS:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text('{"a": 1}\n' if name.endswith((".json", ".jsonl")) else "x\n")
    reference = tmp_path / "ref.json"
    assert digest.main(["--output_dir", str(root), "--out", str(reference)]) == 0
    assert digest.main(["--output_dir", str(root), "--compare", str(reference)]) == 0
    (root / "compress" / "stage2.jsonl").write_text('{"summary": "changed"}\n')
    assert digest.main(["--output_dir", str(root), "--compare", str(reference)]) == 1
    (root / "compress" / "stage2.jsonl").unlink()
    assert digest.main(["--output_dir", str(root), "--compare", str(reference)]) == 1
