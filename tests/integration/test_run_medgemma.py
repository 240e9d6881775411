"""scripts/run_medgemma.sh end to end on CPU with the demo recipes substituted: the quickstart notebook's demo ran
the whole chain once (shared fixture); here the same command is rerun to check it resumes as a whole."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, subprocess_env
from tests.integration.conftest import ExecutedNotebook

pytestmark = pytest.mark.integration
STAGE_DIRS = ("data", "sft", "generate", "compress", "eval", "eval_stage2")


def _run(args: list[str], timeout: float = 1200) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(ROOT / "scripts" / "run_medgemma.sh"), *args],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=subprocess_env(PYTHON=sys.executable),
    )  # fmt: skip


def _finished(run: Path) -> dict[str, str]:
    return {d: json.loads((run / d / "manifest.json").read_text())["finished_at"] for d in STAGE_DIRS}


def test_help_and_argument_errors(tmp_path: Path) -> None:
    proc = _run(["--help"], timeout=30)
    assert proc.returncode == 0 and "--source" in proc.stdout and "--sample" in proc.stdout
    assert _run([], timeout=30).returncode == 2
    proc = _run(["--source", "x.csv", "--bogus", "1"], timeout=30)
    assert proc.returncode == 2 and "--bogus" in proc.stderr
    proc = _run(["--source", "x.csv", "--recipes", str(tmp_path)], timeout=30)
    assert proc.returncode == 2 and "prepare_data.yaml" in proc.stderr


def test_the_chain_sampled_the_source(quickstart_notebook: ExecutedNotebook) -> None:
    card = json.loads((quickstart_notebook.run_dir / "data" / "data_card.json").read_text())
    assert card["sample"]["fraction"] == 0.5
    read, skipped = card["accounting"]["rows_read"], card["sample"]["rows_skipped"]
    assert read + skipped == 300 and 100 < read < 200  # the notebook's demo CSV has 300 rows


def test_rerun_skips_every_completed_stage(quickstart_notebook: ExecutedNotebook) -> None:
    run = quickstart_notebook.run_dir
    before = _finished(run)
    proc = _run(quickstart_notebook.run_medgemma_args())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("complete, skipped") == 6
    assert _finished(run) == before


def test_rerun_continues_at_the_first_unfinished_stage(quickstart_notebook: ExecutedNotebook) -> None:
    run = quickstart_notebook.run_dir
    before = _finished(run)
    # stage-1 eval interrupted: its manifest still says running
    manifest_path = run / "eval" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**manifest, "status": "running", "finished_at": None}))
    proc = _run(quickstart_notebook.run_medgemma_args())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for n, name in enumerate(["prepare_data", "sft_qlora", "generate (stage 1)", "compress (stage 2)"], 1):
        assert f"=== {n}/6 {name}: complete, skipped ===" in proc.stdout
    assert "=== 5/6 eval stage 1: running" in proc.stdout and "=== 6/6 eval stage 2: running" in proc.stdout
    after = _finished(run)
    assert all(after[d] == before[d] for d in ("data", "sft", "generate", "compress"))
    assert after["eval"] is not None and after["eval_stage2"] > before["eval_stage2"]
    assert f"{run}/eval/report.md" in proc.stdout  # where each artifact is
