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
    rerun = rows.pop("compile_rerun")
    for name, row in rows.items():
        expected_notes = 4 if name == "seed" else 6
        assert row["notes"] == expected_notes
        assert row["new_tokens"] == expected_notes * 8  # min_new_tokens = max_new_tokens: a fixed length
        assert row["new_tokens_per_s"] > 0
    assert rows["engine_greedy"]["batch_size"] == 4 and rows["seed"]["batch_size"] == 1
    # The seed's rate is the median note's, with its spread; the speedup is computed from it.
    seed = rows["seed"]
    assert len(seed["per_note_new_tokens_per_s"]) == 4
    assert seed["new_tokens_per_s"] == seed["new_tokens_per_s_median"]
    assert seed["spread"]["min"] <= seed["new_tokens_per_s_median"] <= seed["spread"]["max"]
    best = rows[result["best_variant"]]
    assert result["speedup"] == round(best["new_tokens_per_s"] / seed["new_tokens_per_s_median"], 1)
    assert result["best_variant"].startswith("engine")
    # Every greedy engine row gives the dynamic cache's tokens on the check notes (fp32 on CPU: exactly).
    for name in ("engine_greedy", "engine_static", "engine_static_ring", "engine_static_ring_b2x_chunked"):
        assert rows[name]["equality"]["identical"] == rows[name]["equality"]["notes"] == 3, name
    assert rows["engine_sample"]["equality"] is None
    # The ring rows really ran ring-buffer layers (prompts are longer than the tiny model's 64-token window), and
    # the chunked row prefilled its batch of 6 in chunks of 2.
    assert rows["engine_static_ring"]["ring_layers"] == 1 and rows["engine_static"]["ring_layers"] == 0
    chunked = rows["engine_static_ring_b2x_chunked"]
    assert chunked["ring_layers"] == 1 and chunked["prefill_chunk_rows"] == 2 and chunked["batch_size"] == 6
    # The rerun warm-up came from a second process on the same compile cache directory.
    assert rerun["of_variant"] == "engine_static_ring_b2x_chunked" and rerun["rerun_warmup_seconds"] > 0
    assert rerun["first_run_warmup_seconds"] == chunked["warmup_seconds"]
    assert rerun["compile_cache_dir"].startswith(str(tmp_path / "work"))
    for key in ("date", "device", "versions", "command", "prompt_tokens"):
        assert result[key]
    assert "speedup (best engine variant vs seed)" in capsys.readouterr().out.splitlines()[-1]
