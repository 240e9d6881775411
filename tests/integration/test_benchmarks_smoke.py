"""The GPU training benchmarks' harnesses run end to end on CPU (--smoke: tiny model, tiny synthetic data): every
row goes through sft_qlora's trainer in its own subprocess, the identical-batch check agrees between padded and
packed batches, the result JSON carries what the GPU run must report, and the profiler summary is written."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, subprocess_env

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def bench_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("bench")
    return {"work": base / "work", "out": base / "out"}


def _run(script: str, args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=subprocess_env(),
    )


def test_train_throughput_smoke(bench_dirs: dict[str, Path], tiny_model_dir: Path) -> None:
    proc = _run(
        "train_throughput.py",
        [
            "--smoke",
            "--variants",
            "seed,seed+packing",
            "--model_dir",
            str(tiny_model_dir),
            "--work_dir",
            str(bench_dirs["work"]),
            "--out",
            str(bench_dirs["out"]),
        ],
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((bench_dirs["out"] / "train_throughput.json").read_text())
    assert result["device"] == "cpu" and result["versions"]["torch"] and result["command"] and result["date"]
    rows = {r["name"]: r for r in result["variants"]}
    assert set(rows) == {"seed", "seed+packing"}
    for row in rows.values():
        assert row["status"] == "ok", row
        assert row["tokens_per_s"] > 0 and row["measured_steps"] == 1
        assert row["config"]["completion_only_loss"] is False  # the seed's whole-sequence loss
        assert math.isfinite(row["check"]["loss"]) and row["check"]["trained_tokens"] > 0
    assert rows["seed"]["config"]["packing"] is False and rows["seed+packing"]["facts"]["packing"] is True
    assert rows["seed+packing"]["facts"]["padding_free_collator"] is True
    # same examples, padded one by one vs packed into one row: the same loss and gradients (fp32 on CPU)
    cmp = rows["seed+packing"]["check"]["vs_reference"]
    assert cmp["reference"] == "seed" and cmp["math_ok"] is True
    assert cmp["loss_rel_diff"] < 1e-4 and cmp["grad_rel_err"] < 1e-3
    assert result["speedup"]["seed/tiny"] == 1.0 and "seed+packing/tiny" in result["speedup"]
    assert rows["seed"]["check"]["attention_kernels"]  # which attention path ran is recorded
    # the table is printed last
    last = proc.stdout.strip().splitlines()
    assert last[-4].startswith("variant") and last[-1].startswith("seed+packing")


def test_profile_train_step_smoke(bench_dirs: dict[str, Path], tiny_model_dir: Path) -> None:
    proc = _run(
        "profile_train_step.py",
        [
            "--smoke",
            "--configs",
            "seed",
            "--model_dir",
            str(tiny_model_dir),
            "--work_dir",
            str(bench_dirs["work"]),
            "--out",
            str(bench_dirs["out"]),
        ],
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((bench_dirs["out"] / "profile_train_step.json").read_text())
    (row,) = result["results"]
    assert row["status"] == "ok", row
    summary = row["profile_summary"]
    categories = {c["category"] for c in summary["by_category_ops"]}
    assert {"attention", "lora matmul", "matmul (base, dequantized weights)"} <= categories
    assert summary["kernel_ms"] > 0 and summary["profiled_steps"] == 1 and summary["top_ops"]
    text = (bench_dirs["out"] / "profile_train_step.txt").read_text()
    assert "by op category" in text and "lora matmul" in proc.stdout
