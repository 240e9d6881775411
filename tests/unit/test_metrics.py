"""Eval metrics on hand-computed examples: compression, ROUGE, entities, numbers, BERTScore, long-text policy."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from dischargesum.config import ConfigError, EvalConfig, parse_config
from dischargesum.evaluation.bertscore import BertScorer
from dischargesum.evaluation.entities import aggregate_entity_comparisons
from dischargesum.evaluation.scores import (
    ClinicalRougeTokenizer,
    compression_statistics,
    describe,
    length_bucket,
    length_bucket_labels,
    make_rouge_scorer,
    numeric_fidelity,
    numeric_recall,
    rouge_scores,
)
from dischargesum.evaluation.text_scoring import TextScoringOptions, _init_worker, _score_text_chunk

pytestmark = pytest.mark.unit

SOURCE = "Furosemide 40 mg IV BID was given for CHF. Creatinine 1.4 mg/dL on admission. No pneumonia. BP 132/78."
REFERENCE = "Furosemide 40 mg IV BID for CHF. Creatinine 1.4."
OUTPUT = "Furosemide 20 mg IV BID for CHF. Creatinine 1.4. Started metoprolol 25 mg PO daily. BP 132/78."


# ---- compression ------------------------------------------------------------------------------------------------


def test_compression_mean_of_ratios_differs_from_ratio_of_totals() -> None:
    # A short note with a long summary (ratio 2.0) and a long note with a short one (0.5):
    # mean of ratios 1.25 > 1 while the ratio of totals is 110 / 205 < 1 — the seed's 1.71 vs 0.62 in miniature.
    stats = compression_statistics([10, 100], [5, 200])
    assert stats["mean_of_ratios"] == pytest.approx(1.25)
    assert stats["median_ratio"] == pytest.approx(1.25)
    assert stats["std_ratio"] == pytest.approx(1.0606602)  # sample std (n - 1) of (2.0, 0.5); population: 0.75
    assert stats["ratio_of_totals"] == pytest.approx(110 / 205)
    assert (stats["output_total"], stats["other_total"], stats["n"]) == (110, 205, 2)
    assert (stats["min_ratio"], stats["max_ratio"]) == (0.5, 2.0)


def test_compression_skips_zero_denominators_and_checks_lengths() -> None:
    stats = compression_statistics([3, 4], [0, 8])
    assert stats["n"] == 1 and stats["mean_of_ratios"] == 0.5 and stats["ratio_of_totals"] == 0.5
    assert compression_statistics([], [])["ratio_of_totals"] is None
    with pytest.raises(ValueError, match="2 output lengths but 1"):
        compression_statistics([1, 2], [3])


def test_describe_ignores_undefined_values() -> None:
    stats = describe([1.0, None, 3.0, float("nan")])
    # Sample std (n - 1), what pandas' df.std() and a peer's report give: sqrt(2) for (1, 3); population: 1.0.
    assert stats == {"n": 2, "mean": 2.0, "median": 2.0, "std": pytest.approx(2**0.5), "min": 1.0, "max": 3.0}
    assert describe([None])["mean"] is None


# ---- ROUGE ------------------------------------------------------------------------------------------------------


def test_clinical_tokenizer_keeps_case_decimals_ratios_and_splits_units() -> None:
    tokens = ClinicalRougeTokenizer().tokenize("Lasix 40mg IV; Cr 1.4, BP 132/78 on 3/14 at 14:30, SpO2 96% ___ q6h.")
    assert tokens == [
        "Lasix", "40", "mg", "IV", "Cr", "1.4", "BP", "132/78", "on", "3/14", "at", "14:30", "SpO2", "96", "%", "q6h",
    ]  # fmt: skip


def test_rouge_on_a_tiny_known_pair() -> None:
    scorer = make_rouge_scorer("clinical")
    scores = rouge_scores(scorer, "the cat lay on the mat", "the cat sat on the mat")
    assert scores["rouge1_f1"] == pytest.approx(5 / 6)  # the x2, cat, on, mat
    assert scores["rouge2_f1"] == pytest.approx(3 / 5)  # the-cat, on-the, the-mat of 5 bigrams
    assert scores["rougeL_f1"] == pytest.approx(5 / 6)  # LCS "the cat on the mat"
    assert scores["rougeLsum_f1"] == pytest.approx(5 / 6)


def test_rouge_tokenizer_choice_matters_for_clinical_values() -> None:
    clinical, default = make_rouge_scorer("clinical"), make_rouge_scorer("default")
    # rouge_score's default tokenizer splits 1.4 into 1 and 4, so a swapped value scores perfectly.
    assert rouge_scores(default, "Cr 4.1", "Cr 1.4")["rouge1_f1"] == pytest.approx(1.0)
    assert rouge_scores(clinical, "Cr 4.1", "Cr 1.4")["rouge1_f1"] == pytest.approx(0.5)
    # Case is kept by the clinical tokenizer; "40mg" equals "40 mg" only there.
    assert rouge_scores(clinical, "lasix 40 mg", "Lasix 40mg")["rouge1_f1"] == pytest.approx(2 / 3)
    assert rouge_scores(default, "lasix 40 mg", "Lasix 40mg")["rouge1_precision"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="stemming"):
        make_rouge_scorer("clinical", use_stemmer=True)


def test_rouge_lsum_uses_lines_as_units() -> None:
    scorer = make_rouge_scorer("clinical")
    # Same words in swapped lines: ROUGE-L (one sequence) drops, ROUGE-Lsum (per line) does not.
    scores = rouge_scores(scorer, "b1 b2 b3\na1 a2 a3", "a1 a2 a3\nb1 b2 b3")
    assert scores["rougeL_f1"] == pytest.approx(0.5)
    assert scores["rougeLsum_f1"] == pytest.approx(1.0)


# ---- entities and numbers ---------------------------------------------------------------------------------------


def _text_scores(triples, **options):
    _init_worker(TextScoringOptions(**options))
    return _score_text_chunk(triples)


def test_entity_recall_precision_hallucination_and_numbers_on_hand_built_texts() -> None:
    (scores,) = _text_scores([(OUTPUT, REFERENCE, SOURCE)])
    # reference keys: furosemide|40 mg, CHF, creatinine|1.4; output: furosemide|20 mg, CHF, creatinine|1.4,
    # metoprolol|25 mg, BP|132/78.
    vs_ref = scores.vs_reference
    assert vs_ref.recall() == pytest.approx(2 / 3)
    assert vs_ref.precision() == pytest.approx(2 / 5)
    assert vs_ref.f1() == pytest.approx(0.5)
    assert vs_ref.recall("medication") == 0.0 and vs_ref.recall("lab") == 1.0
    assert [e.key for e in vs_ref.missing] == ["medication:furosemide|40 mg"]
    # Hallucinated: output entities absent from the source (the wrong dose and the new drug).
    assert sorted(e.key for e in scores.vs_source.extra) == [
        "medication:furosemide|20 mg",
        "medication:metoprolol|25 mg",
    ]
    assert scores.vs_source.hallucination_rate() == pytest.approx(2 / 5)
    # The reference itself is fully supported by the source.
    assert scores.reference_vs_source.hallucination_rate() == 0.0
    # Numbers: output {20, 1.4, 25, 132/78} vs source {40, 1.4, 132/78}.
    assert scores.numbers_vs_source["unsupported_numbers"] == ["20", "25"]
    assert scores.numbers_vs_source["fidelity"] == pytest.approx(0.5)
    assert scores.numbers_recall_vs_reference["recall"] == pytest.approx(0.5)  # 1.4 kept, 40 lost
    assert scores.rouge["rouge1_f1"] > 0


def test_identical_output_has_perfect_entity_scores() -> None:
    (scores,) = _text_scores([(REFERENCE, REFERENCE, SOURCE)], rouge=False)
    assert scores.vs_reference.recall() == 1.0 and scores.vs_reference.precision() == 1.0
    assert scores.numbers_vs_source["fidelity"] == 1.0
    assert scores.rouge is None


def test_numeric_fidelity_and_recall_functions() -> None:
    assert numeric_fidelity(["1", "2", "2"], ["2"]) == {
        "output_numbers": 2,
        "unsupported": 1,
        "unsupported_numbers": ["1"],
        "fidelity": 0.5,
    }
    assert numeric_fidelity([], ["2"])["fidelity"] is None
    assert numeric_recall(["2"], ["2", "3"])["recall"] == 0.5
    assert numeric_recall(["2"], [])["recall"] is None


def test_micro_and_macro_entity_aggregation() -> None:
    # Sample A: recall 2/3; sample B (identical output): recall 1 -> micro pools counts, macro averages.
    a, b = _text_scores([(OUTPUT, REFERENCE, SOURCE), (REFERENCE, REFERENCE, SOURCE)], rouge=False, numbers=False)
    agg = aggregate_entity_comparisons([a.vs_reference, b.vs_reference, None])
    assert agg["n"] == 2
    assert agg["micro"]["overall"]["recall"] == pytest.approx(5 / 6)
    assert agg["micro"]["overall"]["precision"] == pytest.approx(5 / 8)
    assert agg["macro"]["overall"]["recall"] == pytest.approx((2 / 3 + 1) / 2)
    assert agg["macro"]["overall"]["precision"] == pytest.approx((2 / 5 + 1) / 2)
    assert agg["micro"]["per_type"]["medication"]["recall"] == 0.5
    assert agg["micro"]["per_type"]["procedure"]["recall"] is None
    assert agg["samples_with_extra"] == 1


# ---- length buckets ---------------------------------------------------------------------------------------------


def test_length_buckets() -> None:
    assert length_bucket_labels([1500, 3000]) == ["<1500", "1500-3000", ">=3000"]
    assert length_bucket_labels([]) == ["all"]
    assert [length_bucket(n, [1500, 3000]) for n in (0, 1499, 1500, 2999, 3000, 10**6)] == [
        "<1500", "<1500", "1500-3000", "1500-3000", ">=3000", ">=3000",
    ]  # fmt: skip


# ---- BERTScore ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scorer(tiny_bert_dir: Path) -> BertScorer:
    return BertScorer(str(tiny_bert_dir), 2, batch_size=8, chunk_overlap=32)


def test_bertscore_identical_texts_score_one(scorer: BertScorer) -> None:
    texts = [REFERENCE, SOURCE * 6]  # the second spans several windows
    out = scorer.score(texts, texts, progress=False)
    assert out.f1 == pytest.approx([1.0, 1.0], abs=1e-5)
    assert out.precision == pytest.approx([1.0, 1.0], abs=1e-5)
    assert out.prediction_windows[1] > 1


def test_bertscore_equals_bert_score_package_within_one_window(scorer: BertScorer, tiny_bert_dir: Path) -> None:
    from bert_score import score

    cands = ["the patient was given furosemide 40 mg IV", OUTPUT]
    refs = ["patient received Lasix 40mg", REFERENCE]
    p, r, f = score(cands, refs, model_type=str(tiny_bert_dir), num_layers=2)
    out = scorer.score(cands, refs, progress=False)
    assert out.precision == pytest.approx(p.tolist(), abs=1e-5)
    assert out.recall == pytest.approx(r.tolist(), abs=1e-5)
    assert out.f1 == pytest.approx(f.tolist(), abs=1e-5)
    assert 0 < out.f1[0] < 0.99


def test_bertscore_long_text_policy_is_recorded(tiny_bert_dir: Path, scorer: BertScorer) -> None:
    long_text = SOURCE * 8
    assert scorer.count_tokens([long_text])[0] > scorer.window
    chunked = scorer.score([long_text, OUTPUT], [REFERENCE, long_text], progress=False)
    assert chunked.prediction_windows[0] > 1 and chunked.reference_windows[1] > 1
    assert chunked.truncated_tokens == [0, 0]
    truncating = BertScorer(str(tiny_bert_dir), 2, long_text="truncate")
    out = truncating.score([long_text, OUTPUT], [REFERENCE, REFERENCE], progress=False)
    n_tokens = truncating.count_tokens([long_text])[0]
    assert out.truncated_tokens == [n_tokens - truncating.window, 0]
    assert out.prediction_windows == [1, 1]
    # Truncation changes the score of the long text (its tail no longer counts), not of the short one.
    assert out.f1[1] == pytest.approx(scorer.score([OUTPUT], [REFERENCE], progress=False).f1[0], abs=1e-6)
    assert not math.isclose(out.f1[0], chunked.f1[0], abs_tol=1e-6)


def test_bertscore_windows_cover_every_token_once(scorer: BertScorer) -> None:
    for n in (1, scorer.window, scorer.window + 1, 5 * scorer.window + 7):
        spans = scorer.windows(n)
        kept = [t for _s, _e, keep_from, keep_to in spans for t in range(keep_from, keep_to)]
        assert kept == list(range(n))
        assert all(end - start <= scorer.window for start, end, _f, _t in spans)


def test_bertscore_empty_prediction_scores_zero(scorer: BertScorer) -> None:
    out = scorer.score(["  ", OUTPUT], [REFERENCE, REFERENCE], progress=False)
    assert out.f1[0] == 0.0 and out.precision[0] == 0.0 and out.prediction_windows[0] == 0
    assert out.f1[1] > 0


def test_bertscore_rejects_too_many_layers(tiny_bert_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"`bertscore_num_layers` = 9 but .* has 2 layers"):
        BertScorer(str(tiny_bert_dir), 9)
    with pytest.raises(ConfigError, match="could not be loaded"):
        BertScorer(str(tiny_bert_dir / "missing"), 2)


# ---- config -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--predictions", "p.txt"], "unsupported extension"),
        (["--predictions", "p.jsonl", "--dataset_dir", "d", "--references", "r.csv"], "both `dataset_dir`"),
        (["--predictions", "p.jsonl", "--column_mapping", "{predicton: x}"], "unknown key"),
        (["--predictions", "p.jsonl", "--reference_column_mapping", "{reference: x}"], "no `dataset_dir`"),
        (["--predictions", "p.jsonl", "--metrics", "bleu"], "choose from"),
        (["--predictions", "p.jsonl", "--length_buckets", "3000,1500"], "strictly increasing"),
        (["--predictions", "p.jsonl", "--rouge_use_stemmer", "true"], "rouge_tokenizer: default"),
        (["--predictions", "p.jsonl", "--bertscore_num_layers", "0"], "bertscore_num_layers"),
        (["--predictions", "p.jsonl", "--device", "gpu"], "`device`"),
        (["--predictions", "p.jsonl", "--bertscore_model", "scibert-scivocab-uncased"], "wget"),
        ([], "`predictions` is empty"),
        (["--predictions", "o/stage1.jsonl"], "directory of `predictions`"),
        (["--predictions", "p.jsonl", "--dataset_dir", "o/"], "directory of `dataset_dir`"),
    ],
)
def test_eval_config_cross_field_checks(args: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(EvalConfig, ["--output_dir", "o", *args])


def test_output_file_names_match_the_writing_stages() -> None:
    from dischargesum.artifacts import OUR_OUTPUT_FILES
    from dischargesum.evaluation.inputs import DEFAULT_PREDICTION_COLUMNS
    from dischargesum.inference import compress, generate
    from dischargesum.inference.engine import GenerationResult

    assert OUR_OUTPUT_FILES == {"generate": generate.STAGE1_FILE, "compress": compress.STAGE2_FILE}
    record = generate.generation_record(GenerationResult("n1", "text", (5,), 3, 2, "eos", 0.1, 1))
    assert set(DEFAULT_PREDICTION_COLUMNS["stage1"].values()) <= set(record)
    # compress's record fields (its module docstring is the contract: ``summary``, ``stage1_summary``).
    for column in DEFAULT_PREDICTION_COLUMNS["stage2"].values():
        assert f"``{column}``" in compress.__doc__


@pytest.mark.gpu
def test_bertscore_on_cuda_matches_cpu(tiny_bert_dir: Path, scorer: BertScorer) -> None:
    texts = [OUTPUT, SOURCE * 6, "  "]
    refs = [REFERENCE, REFERENCE, REFERENCE]
    cuda = BertScorer(str(tiny_bert_dir), 2, device="cuda", chunk_overlap=32).score(texts, refs, progress=False)
    cpu = scorer.score(texts, refs, progress=False)
    assert cuda.f1 == pytest.approx(cpu.f1, abs=1e-4)
    assert cuda.prediction_windows == cpu.prediction_windows


# ---- loading the encoder safely ----------------------------------------------------------------------------------


def test_bertscore_encoder_with_remote_code_is_refused_without_running_it(
    tmp_path: Path, tiny_bert_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import builtins
    import json
    import shutil

    encoder = tmp_path / "custom"
    shutil.copytree(tiny_bert_dir, encoder)
    marker = tmp_path / "remote_code_ran"
    (encoder / "evil.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from transformers import BertConfig, BertModel\n"
        "class EvilConfig(BertConfig):\n    model_type = 'evil'\n"
        "class EvilModel(BertModel):\n    config_class = EvilConfig\n"
    )
    config = json.loads((encoder / "config.json").read_text())
    config.update(model_type="evil", auto_map={"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"})
    (encoder / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr(builtins, "input", lambda *a, **k: "y")  # a user who answers yes to the prompt
    with pytest.raises(ConfigError, match="could not be loaded"):
        BertScorer(str(encoder), 2)
    assert not marker.exists()


def test_bertscore_encoder_with_only_pickled_weights_needs_opt_in(
    tmp_path: Path, tiny_bert_dir: Path, scorer: BertScorer
) -> None:
    import shutil

    import torch
    from safetensors.torch import load_file

    encoder = tmp_path / "bin_only"
    shutil.copytree(tiny_bert_dir, encoder)
    torch.save(load_file(str(encoder / "model.safetensors")), encoder / "pytorch_model.bin")
    (encoder / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match="bertscore_allow_bin_weights"):
        BertScorer(str(encoder), 2)
    opted_in = BertScorer(str(encoder), 2, allow_bin_weights=True).model.state_dict()
    reference = scorer.model.state_dict()  # the same encoder from safetensors
    assert opted_in.keys() == reference.keys() and all(torch.equal(opted_in[k], reference[k]) for k in reference)
