"""benchmarks/generate_throughput.py runs end to end in its CPU smoke mode (so the GPU run works first time)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.integration


def test_generate_throughput_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location(
        "generate_throughput", ROOT / "benchmarks" / "generate_throughput.py"
    )
    assert spec and spec.loader
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--smoke", "--out", str(tmp_path / "results"), "--work_dir", str(tmp_path / "work")])
    path = tmp_path / "results" / "generate_throughput_smoke.json"
    assert json.loads(path.read_text())["speedup"] == result["speedup"]
    rows = {r["variant"]: r for r in result["variants"]}
    assert set(rows) == set(bench.SMOKE_VARIANTS)
    assert not [r for r in rows.values() if "error" in r or "skipped" in r]
    for name, row in rows.items():
        expected_notes = 2 if name == "seed" else 6
        assert row["notes"] == expected_notes
        assert row["new_tokens"] == expected_notes * 8  # min_new_tokens = max_new_tokens: a fixed length
        assert row["new_tokens_per_s"] > 0
    assert rows["engine_greedy"]["batch_size"] == 4 and rows["seed"]["batch_size"] == 1
    assert result["speedup"] and result["best_variant"].startswith("engine")
    for key in ("date", "device", "versions", "command", "prompt_tokens"):
        assert result[key]
    assert "speedup (best engine variant vs seed)" in capsys.readouterr().out.splitlines()[-1]
