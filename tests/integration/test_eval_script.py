"""scripts/eval.py end to end: accelerate launch on CPU against a prepared dataset; bad input exits 2."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pandas as pd
import pytest

from tests.fixtures_data import make_prepared_dataset
from tests.helpers import accelerate_launch, run_script

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    return make_prepared_dataset(tmp_path_factory.mktemp("data"), tiny_model_dir, n_rows=64)


def _stage1(dataset_dir: Path, path: Path) -> list[str]:
    """stage1.jsonl-shaped predictions: the reference itself for even rows, a perturbed one for odd rows."""
    test = pd.read_parquet(dataset_dir / "test.parquet")
    ids = [str(i) for i in test["note_id"]]
    with open(path, "w") as fh:
        for k, (note_id, summary) in enumerate(zip(ids, test["summary"])):
            if k % 2:
                # Drop the last sentence and change every digit: lost entities and unsupported numbers.
                summary = summary.rsplit(".", 2)[0].translate(str.maketrans("0123456789", "1234567890")) + "."
            fh.write(json.dumps({"note_id": note_id, "summary": summary, "new_tokens": 10}) + "\n")
    return ids


def test_eval_script_through_accelerate_launch(tmp_path: Path, dataset_dir: Path, tiny_bert_dir: Path) -> None:
    preds = tmp_path / "preds.jsonl"
    ids = _stage1(dataset_dir, preds)
    out = tmp_path / "eval"
    proc = accelerate_launch(
        "eval.py",
        [
            "--config", "recipes/demo/eval.yaml",
            "--predictions", str(preds),
            "--dataset_dir", str(dataset_dir),
            "--output_dir", str(out),
            "--bertscore_model", str(tiny_bert_dir),
            "--tokenizer_name_or_path", "none",
        ],
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["stage"] == "eval" and manifest["scored"] == len(ids)
    assert {"metrics.json", "per_sample.csv", "report.md", "metric_distributions.png"} <= set(manifest["outputs"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["mode"] == "stage1" and metrics["counts"]["scored"] == len(ids)
    with open(out / "per_sample.csv", newline="") as fh:
        rows = {r["note_id"]: r for r in csv.DictReader(fh)}
    same, changed = rows[ids[0]], rows[ids[1]]
    assert float(same["bertscore_f1"]) == pytest.approx(1.0, abs=1e-5)
    assert float(same["entity_f1_vs_reference"]) == 1.0 and float(same["rougeL_f1"]) == 1.0
    assert float(changed["bertscore_f1"]) < 1.0
    assert float(changed["rougeL_f1"]) < 1.0
    overall = metrics["overall"]
    assert overall["entities"]["vs_reference"]["micro"]["overall"]["recall"] < 1.0
    assert overall["numbers"]["vs_source"]["unsupported_total"] > 0
    assert overall["numbers"]["reference_vs_source"]["fidelity_micro"] == pytest.approx(1.0)
    # stderr is a pipe here, as in a log file: plain log lines, no progress bars (their \r and cursor codes).
    assert "BERTScore: " in proc.stderr and "\r" not in proc.stderr and "\x1b[A" not in proc.stderr


def test_eval_script_bad_input_exits_2_naming_the_problem(tmp_path: Path, dataset_dir: Path) -> None:
    preds = tmp_path / "preds.jsonl"
    preds.write_text(json.dumps({"note_id": "x-DS-1", "generated": "text"}) + "\n")
    common = ["--output_dir", str(tmp_path / "eval"), "--dataset_dir", str(dataset_dir), "--predictions", str(preds)]
    # Through scripts/launch.sh's launcher: the stage's code reaches the shell and its message is the last line.
    proc = accelerate_launch("eval.py", common, timeout=120, launcher="dischargesum.launch")
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "column 'summary' (for prediction)" in last and "generated" in last and last.endswith("(exit code 2)")
    assert "Traceback" not in proc.stderr and "CalledProcessError" not in proc.stderr
    proc = run_script("eval.py", [*common, "--column_mapping", '{"prediction": "generated"}'], timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "note_id_not_in_references: 1" in proc.stderr and "check `dataset_dir`" in proc.stderr
    assert not (tmp_path / "eval" / "metrics.json").exists()


def test_worker_processes_give_the_same_scores_as_one_process(monkeypatch: pytest.MonkeyPatch) -> None:
    from dischargesum.data.synthetic import generate_rows
    from dischargesum.evaluation import text_scoring

    rows = list(generate_rows(6, profile="tiny", with_entities=False))
    triples = [(r["target"][: len(r["target"]) // 2], r["target"], r["input"]) for r in rows]
    options = text_scoring.TextScoringOptions()
    monkeypatch.setattr(text_scoring, "MIN_SAMPLES_FOR_WORKERS", 1)
    # One spawned worker (each costs seconds of imports: spaCy, thinc -> torch, rouge_score -> nltk -> scipy).
    pooled_job = text_scoring.TextScoringJob(triples, options, num_workers=1, progress=False)
    assert pooled_job.workers == 1 and pooled_job.chunk_size == 2
    pooled = pooled_job.start().results()
    local = text_scoring.TextScoringJob(triples, options, num_workers=0, progress=False).start().results()
    assert [p.rouge for p in pooled] == [q.rouge for q in local]
    assert [p.vs_reference.to_dict() for p in pooled] == [q.vs_reference.to_dict() for q in local]
    assert [p.numbers_vs_source for p in pooled] == [q.numbers_vs_source for q in local]
