"""Eval inputs: column mapping, references from a dataset or a file, and bad input (clear error or recorded skip)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd
import pytest

from dischargesum.artifacts import ArtifactError
from dischargesum.cli import UserError
from dischargesum.config import EvalConfig, GenerateConfig, PrepareDataConfig
from dischargesum.evaluation.evaluate import evaluate
from dischargesum.evaluation.inputs import load_eval_inputs
from dischargesum.manifest import finish_run, start_run

pytestmark = pytest.mark.unit

NOTES = {
    f"100{i}-DS-1": (
        f"Patient {i} admitted with CHF. Furosemide {20 + i} mg IV BID. Creatinine 1.{i} mg/dL. BP 12{i}/80.",
        f"Admitted with CHF, diuresed with furosemide {20 + i} mg IV BID. Creatinine 1.{i}.",
    )
    for i in range(6)
}


def make_dataset_dir(root: Path, *, complete: bool = True) -> Path:
    """A minimal prepare_data output (test split + manifest) holding NOTES."""
    out = root / "data"
    start_run(out, PrepareDataConfig(output_dir=str(out)))
    frame = pd.DataFrame(
        {
            "note_id": list(NOTES),
            "subject_id": [k.split("-")[0] for k in NOTES],
            "note": [v[0] for v in NOTES.values()],
            "summary": [v[1] for v in NOTES.values()],
            "note_shortened": [False] * (len(NOTES) - 1) + [True],
        }
    )
    for split in ("train", "validation", "test"):
        frame.to_parquet(out / f"{split}.parquet")
    if complete:
        finish_run(out)
    return out


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def predictions(path: Path, ids=None, text=lambda i, ref: ref) -> Path:
    ids = list(NOTES) if ids is None else ids
    return write_jsonl(path, [{"note_id": k, "summary": text(k, NOTES.get(k, ("", ""))[1])} for k in ids])


def cfg(tmp_path: Path, **kwargs) -> EvalConfig:
    base = dict(
        output_dir=str(tmp_path / "eval"), num_workers=0, metrics=["rouge", "entities", "numbers", "compression"]
    )
    return EvalConfig(**{**base, **kwargs})


def test_stage1_from_dataset_dir(tmp_path: Path) -> None:
    data = make_dataset_dir(tmp_path)
    inputs = load_eval_inputs(cfg(tmp_path, predictions=str(predictions(tmp_path / "p.jsonl")), dataset_dir=str(data)))
    assert inputs.mode == "stage1"
    assert inputs.columns == {
        "note_id": "predictions:note_id",
        "prediction": "predictions:summary",
        "reference": "dataset:summary",
        "source": "dataset:note",
    }
    assert [s.note_id for s in inputs.samples] == list(NOTES)
    assert inputs.samples[0].reference == NOTES["1000-DS-1"][1] and inputs.samples[0].source == NOTES["1000-DS-1"][0]
    assert inputs.samples[-1].extra == {"note_shortened": True}
    assert inputs.skipped == [] and inputs.references_without_prediction == 0


def test_missing_prediction_column_is_a_clear_error(tmp_path: Path) -> None:
    data = make_dataset_dir(tmp_path)
    path = write_jsonl(tmp_path / "p.jsonl", [{"note_id": k, "text": "x"} for k in NOTES])
    with pytest.raises(UserError, match=r"column 'summary' \(for prediction\) is not in .*columns are: note_id, text"):
        load_eval_inputs(cfg(tmp_path, predictions=str(path), dataset_dir=str(data)))
    good = cfg(tmp_path, predictions=str(path), dataset_dir=str(data), column_mapping={"prediction": "text"})
    assert len(load_eval_inputs(good).samples) == len(NOTES)
    bad = cfg(tmp_path, predictions=str(path), dataset_dir=str(data), column_mapping={"prediction": "txt"})
    with pytest.raises(UserError, match=r"`column_mapping.prediction`: column 'txt'"):
        load_eval_inputs(bad)


def test_missing_reference_column_is_a_clear_error(tmp_path: Path) -> None:
    refs = tmp_path / "refs.csv"
    pd.DataFrame({"id": list(NOTES), "gold": [v[1] for v in NOTES.values()]}).to_csv(refs, index=False)
    preds = predictions(tmp_path / "p.jsonl")
    with pytest.raises(
        UserError, match=r"`reference_column_mapping.note_id`: column 'note_id'.*columns are: id, gold"
    ):
        load_eval_inputs(cfg(tmp_path, predictions=str(preds), references=str(refs)))
    ok = cfg(
        tmp_path,
        predictions=str(preds),
        references=str(refs),
        reference_column_mapping={"note_id": "id", "reference": "gold"},
    )
    inputs = load_eval_inputs(ok)
    assert inputs.has_reference and not inputs.has_source  # the file has no source column: vs-source is not scored
    with pytest.raises(UserError, match=r"`reference_column_mapping.source`: column 'text'"):
        ok2 = cfg(
            tmp_path,
            predictions=str(preds),
            references=str(refs),
            reference_column_mapping={"note_id": "id", "reference": "gold", "source": "text"},
        )
        load_eval_inputs(ok2)


def test_mismatched_ids_error_when_too_many_and_are_recorded_otherwise(tmp_path: Path) -> None:
    data = make_dataset_dir(tmp_path)
    wrong = predictions(tmp_path / "wrong.jsonl", ids=["999-DS-1", "998-DS-2", *list(NOTES)[:2]])
    with pytest.raises(
        UserError, match=r"2 of 4 predictions \(50.0%\).*note_id_not_in_references: 2.*check `dataset_dir`"
    ):
        load_eval_inputs(cfg(tmp_path, predictions=str(wrong), dataset_dir=str(data)))
    inputs = load_eval_inputs(cfg(tmp_path, predictions=str(wrong), dataset_dir=str(data), max_skip_fraction=0.5))
    assert inputs.skip_counts() == {"note_id_not_in_references": 2}
    assert inputs.references_without_prediction == len(NOTES) - 2
    result = evaluate(inputs, cfg(tmp_path, predictions=str(wrong), dataset_dir=str(data)), progress=False)
    assert result.metrics["counts"]["skipped"] == {"note_id_not_in_references": 2}
    assert result.metrics["counts"]["references_without_prediction"] == 4
    assert [r["status"] for r in result.rows] == ["scored", "scored", "note_id_not_in_references"] * 1 + [
        "note_id_not_in_references"
    ]


def test_empty_texts_duplicates_and_non_strings_are_recorded_skips(tmp_path: Path) -> None:
    refs = tmp_path / "refs.jsonl"
    ids = list(NOTES)
    write_jsonl(
        refs,
        [{"note_id": k, "summary": (v[1] if k != ids[1] else "   "), "note": v[0]} for k, v in NOTES.items()],
    )
    records = [{"note_id": k, "summary": NOTES[k][1]} for k in ids]
    records[0]["summary"] = ""  # empty prediction: scored as a failure by default
    records[2]["summary"] = 12345  # not a string
    records.append({"note_id": ids[3], "summary": "again"})  # duplicate
    records.append({"note_id": None, "summary": "no id"})
    preds = write_jsonl(tmp_path / "p.jsonl", records)
    config = cfg(tmp_path, predictions=str(preds), references=str(refs), max_skip_fraction=0.6)
    inputs = load_eval_inputs(config)
    assert inputs.skip_counts() == {
        "empty_reference": 1,
        "non_string_prediction": 1,
        "duplicate_note_id": 1,
        "missing_note_id": 1,
    }
    assert [s.note_id for s in inputs.samples] == [ids[0], ids[3], ids[4], ids[5]]
    result = evaluate(inputs, config, progress=False)
    assert result.metrics["counts"]["empty_predictions_scored"] == 1
    empty_row = result.rows[0]
    assert empty_row["rouge1_f1"] == 0.0 and empty_row["entity_recall_vs_reference"] == 0.0
    assert empty_row["compression_chars_vs_reference"] == 0.0
    skipping = cfg(
        tmp_path, predictions=str(preds), references=str(refs), max_skip_fraction=0.7, empty_prediction="skip"
    )
    assert load_eval_inputs(skipping).skip_counts()["empty_prediction"] == 1


def test_invalid_jsonl_line_names_the_line(tmp_path: Path) -> None:
    data = make_dataset_dir(tmp_path)
    path = tmp_path / "p.jsonl"
    path.write_text('{"note_id": "1000-DS-1", "summary": "ok"}\n{"note_id": "1001-DS-1", "summ')
    with pytest.raises(UserError, match=r"line 2 is not valid JSON"):
        load_eval_inputs(cfg(tmp_path, predictions=str(path), dataset_dir=str(data)))
    with pytest.raises(UserError, match="no such file"):
        load_eval_inputs(cfg(tmp_path, predictions=str(tmp_path / "nope.jsonl"), dataset_dir=str(data)))


def test_nothing_to_compare_and_incomplete_artifacts(tmp_path: Path) -> None:
    preds = predictions(tmp_path / "p.jsonl")
    with pytest.raises(UserError, match="nothing to compare"):
        load_eval_inputs(cfg(tmp_path, predictions=str(preds)))
    half = make_dataset_dir(tmp_path / "half", complete=False)
    with pytest.raises(ArtifactError, match="status `running`"):
        load_eval_inputs(cfg(tmp_path, predictions=str(preds), dataset_dir=str(half)))
    # stage1.jsonl of a generate run that did not finish is refused, not scored half-written.
    gen = tmp_path / "gen"
    start_run(gen, GenerateConfig(output_dir=str(gen), dataset_dir="d", model_name_or_path="m"))
    stage1 = predictions(gen / "stage1.jsonl")
    data = make_dataset_dir(tmp_path)
    with pytest.raises(ArtifactError, match="predictions"):
        load_eval_inputs(cfg(tmp_path, predictions=str(stage1), dataset_dir=str(data)))
    finish_run(gen)
    assert load_eval_inputs(cfg(tmp_path, predictions=str(stage1), dataset_dir=str(data))).mode == "stage1"


def test_stage2_mode_and_foreign_csv(tmp_path: Path) -> None:
    data = make_dataset_dir(tmp_path)
    ids = list(NOTES)
    stage2 = write_jsonl(
        tmp_path / "stage2.jsonl",
        [
            {"note_id": k, "summary": NOTES[k][1][:40], "stage1_summary": NOTES[k][1], "fallback": k == ids[0]}
            for k in ids
        ],
    )
    inputs = load_eval_inputs(cfg(tmp_path, predictions=str(stage2), dataset_dir=str(data)))
    assert inputs.mode == "stage2"
    assert inputs.columns["reference"] == "predictions:stage1_summary" and inputs.columns["source"] == "dataset:note"
    result = evaluate(inputs, cfg(tmp_path, predictions=str(stage2), dataset_dir=str(data)), progress=False)
    assert result.metrics["counts"]["compression_fallbacks"] == 1 and result.rows[0]["fallback"] is True
    comp = result.metrics["overall"]["compression"]["vs_reference"]["chars"]
    assert comp["ratio_of_totals"] == pytest.approx(
        sum(len(v[1][:40]) for v in NOTES.values()) / sum(len(v[1]) for v in NOTES.values())
    )
    # A foreign CSV with its own column names, references in the same file: no dataset needed.
    other = tmp_path / "other_system.csv"
    pd.DataFrame(
        {"id": ids, "generated": [v[1] for v in NOTES.values()], "gold": [v[1] for v in NOTES.values()]}
    ).to_csv(other, index=False)
    mapping = {"note_id": "id", "prediction": "generated", "reference": "gold"}
    foreign = load_eval_inputs(cfg(tmp_path, predictions=str(other), column_mapping=mapping))
    assert foreign.mode == "stage1" and foreign.has_reference and not foreign.has_source
    result = evaluate(foreign, cfg(tmp_path, predictions=str(other), column_mapping=mapping), progress=False)
    assert result.metrics["overall"]["rouge"]["rougeL"]["f1"]["mean"] == pytest.approx(1.0)
    assert "hallucination" not in result.metrics["overall"]  # no source: not computed, not faked


def test_row_number_as_id_and_text_never_becomes_an_id(tmp_path: Path) -> None:
    # A peer's published CSV: no id column at all, predictions and references side by side.
    peer = tmp_path / "peer.csv"
    refs = [v[1] for v in NOTES.values()]
    pd.DataFrame({"input": [v[0] for v in NOTES.values()], "generated": refs, "target": refs}).to_csv(
        peer, index=False
    )
    mapping = {"prediction": "generated", "reference": "target", "source": "input"}
    with pytest.raises(UserError, match=r"column 'note_id' \(for note_id\).*`column_mapping.note_id: __row__`"):
        load_eval_inputs(cfg(tmp_path, predictions=str(peer), column_mapping=mapping))
    inputs = load_eval_inputs(cfg(tmp_path, predictions=str(peer), column_mapping={**mapping, "note_id": "__row__"}))
    assert [s.note_id for s in inputs.samples] == [str(i) for i in range(1, len(NOTES) + 1)]
    assert inputs.samples[0].reference == refs[0] and inputs.samples[0].source == NOTES["1000-DS-1"][0]
    # Mapping the id to a text column (what `note_id: input` did) is refused, not written into per_sample.csv.
    with pytest.raises(UserError, match=r"`column_mapping.note_id` = 'input'.*holds text, not an id.*__row__"):
        load_eval_inputs(cfg(tmp_path, predictions=str(peer), column_mapping={**mapping, "note_id": "input"}))
    # References keyed by row number too.
    preds = tmp_path / "preds.csv"
    pd.DataFrame({"generated": refs}).to_csv(preds, index=False)
    both = cfg(
        tmp_path,
        predictions=str(preds),
        references=str(peer),
        column_mapping={"note_id": "__row__", "prediction": "generated"},
        reference_column_mapping={"note_id": "__row__", "reference": "target", "source": "input"},
    )
    joined = load_eval_inputs(both)
    assert [s.reference for s in joined.samples] == refs and joined.references_without_prediction == 0


def test_wrongly_cased_column_gets_a_suggestion(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [{"note_id": k, "Generated_Summary": "x"} for k in NOTES])
    data = make_dataset_dir(tmp_path)
    bad = cfg(
        tmp_path, predictions=str(path), dataset_dir=str(data), column_mapping={"prediction": "generated_summary"}
    )
    with pytest.raises(UserError, match=r"column 'generated_summary'.*Did you mean 'Generated_Summary'\?"):
        load_eval_inputs(bad)


@pytest.mark.parametrize(
    ("name", "mapping", "expected", "why"),
    [
        ("peer.csv", {"prediction": "compressed_summary", "reference": "generated_summary"}, "stage2", "prediction"),
        ("peer.csv", {"prediction": "summary", "reference": "generated_summary"}, "stage2", "reference column"),
        ("peer.csv", {"prediction": "generated_summary", "reference": "target"}, "stage1", "no mapped column"),
        ("peer_stage2.csv", {"prediction": "out", "reference": "target"}, "stage2", "file name"),
    ],
)
def test_auto_mode_of_a_foreign_file_follows_its_columns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, name: str, mapping: dict, expected: str, why: str
) -> None:
    path = tmp_path / name
    frame = {"id": list(NOTES)} | {column: [v[1] for v in NOTES.values()] for column in mapping.values()}
    pd.DataFrame(frame).to_csv(path, index=False)
    logging.getLogger("dischargesum").addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="dischargesum"):
            inputs = load_eval_inputs(
                cfg(tmp_path, predictions=str(path), column_mapping={"note_id": "id", **mapping})
            )
    finally:
        logging.getLogger("dischargesum").removeHandler(caplog.handler)
    assert inputs.mode == expected
    decided = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"mode {expected}")]
    assert decided and why in decided[0], caplog.text
    assert inputs.inputs["mode_reason"] in decided[0]


def test_sources_without_digits_are_reported_not_scored_as_zero(tmp_path: Path) -> None:
    # A preprocessing that stripped digits from the notes (the seed's NLTK cleaning): every number of every summary
    # would be "unsupported" and numeric fidelity 0.000.
    csv_path = tmp_path / "stripped.csv"
    stripped = [v[0].translate(str.maketrans("", "", "0123456789")) for v in NOTES.values()]
    pd.DataFrame({"id": list(NOTES), "pred": [v[1] for v in NOTES.values()], "src": stripped}).to_csv(
        csv_path, index=False
    )
    config = cfg(
        tmp_path, predictions=str(csv_path), column_mapping={"note_id": "id", "prediction": "pred", "source": "src"}
    )
    result = evaluate(load_eval_inputs(config), config, progress=False)
    assert any("contains a digit" in w for w in result.metrics["warnings"])
    assert "vs_source" not in result.metrics["overall"]["numbers"]
    assert all("numeric_fidelity_vs_source" not in row for row in result.rows)


def test_limit_explains_references_without_prediction(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = make_dataset_dir(tmp_path)
    run = tmp_path / "generate"
    start_run(run, GenerateConfig(dataset_dir=str(data), output_dir=str(run), model_name_or_path="m", limit=2))
    predictions(run / "stage1.jsonl", ids=list(NOTES)[:2])
    finish_run(run, {"stage1.jsonl": {"path": "stage1.jsonl"}})
    logging.getLogger("dischargesum").addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="dischargesum"):
            inputs = load_eval_inputs(cfg(tmp_path, predictions=str(run / "stage1.jsonl"), dataset_dir=str(data)))
    finally:
        logging.getLogger("dischargesum").removeHandler(caplog.handler)
    assert inputs.references_without_prediction == len(NOTES) - 2
    record = next(r for r in caplog.records if "have no prediction" in r.getMessage())
    assert record.levelname == "INFO" and "limited itself to 2 notes" in record.getMessage()
    assert (
        inputs.unpredicted_reason is not None and "generate run limited itself to 2 notes" in inputs.unpredicted_reason
    )
    config = cfg(tmp_path, predictions=str(run / "stage1.jsonl"), dataset_dir=str(data))
    result = evaluate(inputs, config, progress=False)
    assert result.metrics["counts"]["references_without_prediction_reason"] == inputs.unpredicted_reason
    from dischargesum.evaluation.report import render_report_md

    assert f"references without a prediction: {len(NOTES) - 2} (expected: the generate run" in render_report_md(
        result, config
    )
