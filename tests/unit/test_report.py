"""Report outputs: metrics.json, per_sample.csv, report.md, plots and TensorBoard; patient text only in report.md."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from dischargesum.config import EvalConfig
from dischargesum.evaluation.evaluate import evaluate
from dischargesum.evaluation.inputs import load_eval_inputs
from dischargesum.evaluation.report import PLOT_FILES, write_report

pytestmark = pytest.mark.unit

# A distinctive phrase that must appear in report.md only.
MARKER = "Zebrafinch"
ROWS = [
    (
        f"n{i}",
        f"{MARKER} presented with CHF. Furosemide {20 + i} mg IV BID. Creatinine 1.{i} mg/dL. BP 12{i}/80. "
        + "Lisinopril 10 mg PO daily. " * i * 8,
        f"{MARKER} admitted with CHF, diuresed with furosemide {20 + i} mg IV BID. Creatinine 1.{i}."
        # Over the tiny encoder's 128-token window with any vocabulary (>= one token a word): chunked.
        + " Continued lisinopril 10 mg PO daily." * (24 if i == 5 else 0),
    )
    for i in range(6)
]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path):
    root = tmp_path_factory.mktemp("report")
    refs = root / "refs.jsonl"
    refs.write_text("".join(json.dumps({"note_id": i, "summary": s, "note": n}) + "\n" for i, n, s in ROWS))
    preds = root / "preds.jsonl"
    records = [
        {"note_id": i, "summary": s if k % 2 == 0 else s.replace("1.", "2.")} for k, (i, _n, s) in enumerate(ROWS)
    ]
    records.append({"note_id": "unknown", "summary": "x"})
    preds.write_text("".join(json.dumps(r) + "\n" for r in records))

    def run(name: str, **kwargs):
        cfg = EvalConfig(
            output_dir=str(root / name),
            predictions=str(preds),
            references=str(refs),
            bertscore_model=str(tiny_bert_dir),
            bertscore_num_layers=2,
            bertscore_chunk_overlap=16,
            device="cpu",
            num_workers=0,
            max_skip_fraction=0.2,
            length_buckets=[200, 400],
            report_examples=2,
            **kwargs,
        )
        result = evaluate(load_eval_inputs(cfg), cfg, progress=False)
        return cfg, result, write_report(result, cfg)

    return run


@pytest.fixture(scope="module")
def full(evaluated):
    return evaluated("full")


def test_all_outputs_are_written_and_fingerprinted(full) -> None:
    cfg, _result, outputs = full
    out = Path(cfg.output_dir)
    for name in ("metrics.json", "per_sample.csv", "report.md", *PLOT_FILES.values()):
        assert (out / name).is_file() and name in outputs, name
        assert outputs[name]["bytes"] == (out / name).stat().st_size
    for name in PLOT_FILES.values():
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any(k.startswith("tensorboard/") for k in outputs)

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["counts"]["scored"] == 6 and metrics["counts"]["skipped"] == {"note_id_not_in_references": 1}
    assert metrics["overall"]["bertscore"]["f1"]["max"] == pytest.approx(1.0, abs=1e-5)
    assert metrics["bertscore_settings"]["samples_over_window"] == 1  # the long summary, chunked not truncated
    assert metrics["bertscore_settings"]["samples_truncated"] == 0
    assert set(metrics["by_length_bucket"]) == {"<200", "200-400", ">=400"}
    assert sum(b["n"] for b in metrics["by_length_bucket"].values()) == 6

    with open(out / "per_sample.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["status"] for r in rows] == ["scored"] * 6 + ["note_id_not_in_references"]
    assert float(rows[0]["bertscore_f1"]) == pytest.approx(1.0, abs=1e-5)
    assert float(rows[1]["entity_recall_vs_reference"]) < 1.0  # the changed creatinine value is missing

    # Patient text (and entity strings) only in report.md.
    for name in ("metrics.json", "per_sample.csv"):
        assert MARKER not in (out / name).read_text()
        assert "furosemide" not in (out / name).read_text().lower()
    report = (out / "report.md").read_text()
    assert MARKER in report and "contains patient text" in report
    assert "## Worst and best examples" in report and "missing from the output" in report
    assert "mean of ratios" in report and "ratio of totals" in report


def test_report_without_text_has_ids_and_numbers_only(evaluated) -> None:
    cfg, _result, _outputs = evaluated("notext", report_include_text=False, plots=False, tensorboard=False)
    out = Path(cfg.output_dir)
    report = (out / "report.md").read_text()
    assert MARKER not in report and "furosemide" not in report.lower()
    assert "missing from the output: lab: 1" in report
    assert not any((out / name).exists() for name in PLOT_FILES.values())
    assert not (out / "tensorboard").exists()


def test_tensorboard_event_files_are_readable(full) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg, result, _outputs = full
    acc = EventAccumulator(str(Path(cfg.output_dir) / "tensorboard"), size_guidance={"histograms": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    assert {"eval/bertscore_f1_mean", "eval/entity_recall_vs_reference_micro", "eval/rougeL_f1_mean"} <= scalars
    assert "eval_entity_recall_vs_reference/lab" in scalars
    value = acc.Scalars("eval/bertscore_f1_mean")[0].value
    assert value == pytest.approx(result.metrics["overall"]["bertscore"]["f1"]["mean"], abs=1e-6)
    assert "eval_hist/bertscore_f1" in acc.Tags()["histograms"]
    assert not acc.Tags().get("tensors")  # no text summaries


@pytest.mark.parametrize("keep", ["summary", "note"])
def test_report_renders_with_only_a_reference_or_only_a_source(tmp_path: Path, keep: str) -> None:
    refs = tmp_path / "refs.jsonl"
    refs.write_text(
        "".join(json.dumps({"note_id": i, keep: s if keep == "summary" else n}) + "\n" for i, n, s in ROWS)
    )
    preds = tmp_path / "preds.jsonl"
    preds.write_text("".join(json.dumps({"note_id": i, "summary": s}) + "\n" for i, _n, s in ROWS))
    cfg = EvalConfig(
        output_dir=str(tmp_path / "out"),
        predictions=str(preds),
        references=str(refs),
        metrics=["rouge", "entities", "numbers", "compression"],
        num_workers=0,
        tensorboard=False,
    )
    result = evaluate(load_eval_inputs(cfg), cfg, progress=False)
    outputs = write_report(result, cfg)
    assert "report.md" in outputs and "metrics.json" in outputs
    overall = result.metrics["overall"]
    if keep == "summary":  # no source: nothing "vs source" is computed, nothing is faked
        assert "hallucination" not in overall and "vs_source" not in overall["entities"]
        assert overall["rouge"]["rougeL"]["f1"]["mean"] == pytest.approx(1.0)
    else:  # no reference: no ROUGE / BERTScore, entity support vs the note only
        assert "rouge" not in overall and result.metrics["not_computed"] == ["rouge"]
        assert overall["hallucination"]["rate_micro"] == 0.0
    assert MARKER in (tmp_path / "out" / "report.md").read_text()


def test_per_sample_csv_is_owner_only(tmp_path: Path) -> None:
    import stat

    from dischargesum.evaluation.report import write_per_sample_csv

    path = tmp_path / "per_sample.csv"
    write_per_sample_csv([{"note_id": "1-DS-1", "prediction": "Admitted for chest pain."}], path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert next(csv.reader(path.open())) == ["note_id", "prediction"]


def test_entity_with_its_abbreviation_is_not_expanded_twice() -> None:
    from dischargesum.evaluation.entities import extract_entities

    def procedure(text: str):
        (found,) = [e for e in extract_entities(text) if e.type == "procedure"]
        return found

    spelled = procedure("An electrocardiogram (ECG) showed sinus rhythm.")
    assert spelled.describe() == "electrocardiogram (ECG)"  # was "electrocardiogram (ECG) (electrocardiogram)"
    assert procedure("ECG showed sinus rhythm.").describe() == "ECG (electrocardiogram)"


def test_report_labels_the_sample_std_and_lists_warnings(full) -> None:
    cfg, result, _outputs = full
    report = (Path(cfg.output_dir) / "report.md").read_text()
    assert "mean ± sample std" in report and "| sample std |" in report
    f1 = [r["bertscore_f1"] for r in result.rows if r.get("status") == "scored"]
    import statistics

    assert result.metrics["overall"]["bertscore"]["f1"]["std"] == pytest.approx(statistics.stdev(f1))
    from dischargesum.evaluation.report import render_report_md

    result.metrics["warnings"] = ["no source note contains a digit"]
    try:
        assert "- **warning**: no source note contains a digit" in render_report_md(result, cfg)
    finally:
        result.metrics["warnings"] = []


def test_plots_show_zero_bars_and_no_offset_axis() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dischargesum.evaluation.report import _hist_range, bar_value_labels

    assert bar_value_labels([0.0, None, 0.5]) == ["0", "n/a", "0.50"]
    values = [1.0 - 1e-7, 1.0, 1.0 + 1e-7]  # stage-2 BERTScore of summaries kept unchanged
    assert _hist_range(values) == pytest.approx((0.95, 1.05))
    assert _hist_range([0.2, 0.9]) is None  # ordinary data: matplotlib's range
    fig, ax = plt.subplots()
    counts, _edges, _patches = ax.hist(values, bins=5, range=_hist_range(values))
    ax.ticklabel_format(axis="x", useOffset=False, style="plain")
    fig.canvas.draw()
    assert ax.xaxis.get_major_formatter().get_offset() == ""
    assert max(counts) == 3  # one visible bar holding all three, not three 4e-8 wide slivers
    plt.close(fig)
