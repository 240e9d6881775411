"""generate with 2 processes (gloo DDP on CPU) gives the same notes, in the same order, with the same greedy
summaries as 1 process; both ranks did work and each note was generated once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.fixtures_data import make_prepared_dataset
from tests.helpers import accelerate_launch
from tests.integration.test_generate import load_script, make_tiny_adapter

pytestmark = pytest.mark.distributed


def test_two_processes_match_one_process(tmp_path: Path, tiny_model_dir: Path) -> None:
    data = make_prepared_dataset(tmp_path / "data", tiny_model_dir, n_rows=64)
    adapter = make_tiny_adapter(tmp_path / "sft", tiny_model_dir, data)
    common = ["--dataset_dir", str(data), "--adapter", str(adapter), "--max_new_tokens", "16", "--max_batch_size", "2"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert load_script("generate.py").main(["--output_dir", str(one), *common]) == 0
    # `--multi_gpu` makes accelerate start the processes (cpu_ddp.yaml alone runs one; see DESIGN.md §5)
    proc = accelerate_launch(
        "generate.py",
        ["--output_dir", str(two), *common],
        config_file="cpu_ddp.yaml",
        num_processes=2,
        extra_launch_args=["--multi_gpu"],
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    def summaries(out: Path) -> list[tuple[str, str]]:
        return [(r["note_id"], r["summary"]) for r in map(json.loads, (out / "stage1.jsonl").read_text().splitlines())]

    assert summaries(two) == summaries(one)
    parts = sorted((two / "parts").glob("stage1.rank*.jsonl"))
    assert [p.name for p in parts] == ["stage1.rank000.jsonl", "stage1.rank001.jsonl"]
    per_rank = [[json.loads(x)["note_id"] for x in p.read_text().splitlines()] for p in parts]
    assert all(per_rank), "both ranks generate"
    assert sorted(per_rank[0] + per_rank[1]) == sorted(n for n, _ in summaries(one))  # each note once
    manifest = json.loads((two / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["world_size"] == 2
