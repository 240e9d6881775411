"""compress on the tiny model end to end (the script in this process; the two-stage pipeline through
``accelerate launch``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.fixtures_data import make_prepared_dataset
from tests.helpers import accelerate_launch
from tests.integration.test_generate import load_script, make_tiny_adapter

pytestmark = pytest.mark.integration

RECORD_KEYS = {
    "note_id", "summary", "stage1_summary", "fallback", "attempts", "accepted_attempt", "retention", "retained",
    "missing", "extra", "ratio_chars", "ratio_tokens", "chars", "tokens", "stage1_chars", "stage1_tokens",
    "target_ratio", "prompt_tokens", "new_tokens", "seconds", "finish_reason", "attempt_log",
}  # fmt: skip


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("compress")
    data = make_prepared_dataset(root / "data", tiny_model_dir, n_rows=48)
    adapter = make_tiny_adapter(root / "sft", tiny_model_dir, data)
    return {"root": root, "data": data, "adapter": adapter, "model": tiny_model_dir}


@pytest.fixture(scope="module")
def stage1(workspace: dict[str, Path]) -> Path:
    """A completed generate output, produced in this process (the generate tests launch the script)."""
    out = workspace["root"] / "generate"
    args = ["--output_dir", str(out), "--dataset_dir", str(workspace["data"]), "--adapter", str(workspace["adapter"])]
    assert load_script("generate.py").main([*args, "--max_new_tokens", "24"]) == 0
    return out / "stage1.jsonl"


def test_compress_writes_checked_records(stage1: Path, workspace: dict[str, Path]) -> None:
    out = workspace["root"] / "compress"
    args = [
        "--output_dir", str(out), "--input", str(stage1), "--model_name_or_path", str(workspace["model"]),
        "--max_new_tokens", "24", "--max_attempts", "2", "--target_ratio", "0.5",
    ]  # fmt: skip
    # in this process (the pipeline test below runs compress through `accelerate launch`)
    assert load_script("compress.py").main(args) == 0
    stage1_records = [json.loads(x) for x in stage1.read_text().splitlines()]
    records = [json.loads(x) for x in (out / "stage2.jsonl").read_text().splitlines()]
    assert [r["note_id"] for r in records] == [r["note_id"] for r in stage1_records]
    for r, s1 in zip(records, stage1_records):
        assert set(r) == RECORD_KEYS
        assert r["stage1_summary"] == s1["summary"]
        assert 1 <= r["attempts"] <= 2 and len(r["attempt_log"]) == r["attempts"]
        if r["fallback"]:
            assert r["summary"] == s1["summary"] and r["accepted_attempt"] is None
        else:
            assert r["attempt_log"][r["accepted_attempt"] - 1]["rejected"] is None
        assert r["ratio_chars"] == round(r["chars"] / r["stage1_chars"], 4)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "compress" and manifest["status"] == "complete"
    assert manifest["summary"]["notes"] == len(records)
    assert manifest["summary"]["fallbacks"] == sum(r["fallback"] for r in records)


def test_pipeline_releases_the_stage1_model_and_runs_both_stages(workspace: dict[str, Path]) -> None:
    root = workspace["root"]
    gen = {
        "output_dir": "ignored", "dataset_dir": str(workspace["data"]), "adapter": str(workspace["adapter"]),
        "max_new_tokens": 16, "limit": 4,
    }  # fmt: skip
    comp = {"output_dir": "ignored", "input": "ignored", "model_name_or_path": str(workspace["model"])}
    comp.update({"max_new_tokens": 16, "max_attempts": 1})
    (root / "generate.yaml").write_text(yaml.safe_dump(gen))
    (root / "compress.yaml").write_text(yaml.safe_dump(comp))
    out = root / "pipeline"
    args = ["--generate_config", str(root / "generate.yaml"), "--compress_config", str(root / "compress.yaml")]
    proc = accelerate_launch("pipeline.py", [*args, "--output_dir", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stage-1 model released" in proc.stderr
    stage1 = (out / "generate" / "stage1.jsonl").read_text().splitlines()
    stage2 = (out / "compress" / "stage2.jsonl").read_text().splitlines()
    assert len(stage1) == len(stage2) == 4
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "pipeline" and manifest["status"] == "complete"
    assert manifest["summary"]["stage1_model_released"] is True
    compress_manifest = json.loads((out / "compress" / "manifest.json").read_text())
    assert compress_manifest["inputs"]["input"] == str((out / "generate" / "stage1.jsonl").resolve())
