"""Stage 2: the prompt carries the summary and its entity checklist; the retry / fallback loop (scripted model);
input checks before any model is loaded; the manifest summary statistics."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from dischargesum.artifacts import ArtifactError
from dischargesum.evaluation.entities import extract_entities, format_entity_checklist
from dischargesum.inference.compress import (
    CompressionSettings,
    compress_notes,
    compression_messages,
    describe_stage2,
    read_stage1,
    summarize_stage2,
)
from dischargesum.inference.engine import GenerationRequest, GenerationResult

pytestmark = pytest.mark.unit

SUMMARY = (
    "Admitted with acute kidney injury. Creatinine peaked at 2.1 on 3/14. Started furosemide 40 mg IV BID. "
    "HR 88. No pneumonia. Underwent cardiac catheterization without complication and was discharged home in "
    "stable condition with close follow-up arranged with nephrology and cardiology clinics next week."
)
SHORT_ALL = "AKI; Cr 2.1 on 3/14; furosemide 40 mg IV BID; HR 88; no pneumonia; cardiac catheterization."
SHORT_MISSING_DOSE = "AKI; Cr 2.1 on 3/14; HR 88; no pneumonia; cardiac catheterization."


class ScriptedModel:
    """A model double: per note, a list of (text, finish_reason) returned by successive attempts."""

    def __init__(self, script: dict[str, list[tuple[str, str]]]):
        self.script = {k: list(v) for k, v in script.items()}
        self.prompts: list[str] = []
        self.calls = 0

    def encode_chats(self, conversations):
        self.prompts.extend(c[0]["content"] for c in conversations)
        return [[1, 2, 3] for _ in conversations]

    def count_tokens(self, texts):
        return [len(t.split()) for t in texts]

    def generate_all(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        self.calls += 1
        results = []
        for r in requests:
            text, reason = self.script[r.key].pop(0)
            results.append(GenerationResult(r.key, text, (), len(r.prompt_ids), 5, reason, 0.1, len(requests)))  # type: ignore[arg-type]
        return results


SETTINGS = CompressionSettings(target_ratio=0.5, retention_threshold=0.9, max_attempts=3, max_length_ratio=1.0)


def test_prompt_contains_the_summary_checklist_and_target_length() -> None:
    checklist = format_entity_checklist(extract_entities(SUMMARY))
    content = compression_messages(SUMMARY, checklist, target_words=20)[0]["content"]
    assert SUMMARY in content  # the seed's stage-2 prompt never contained the summary
    assert "furosemide 40 mg IV BID" in content and "creatinine 2.1" in content and "3/14" in content
    assert "about 20 words" in content
    retry = compression_messages(SUMMARY, checklist, target_words=20, missing=["furosemide 40 mg IV BID"])[0]
    assert "left these out" in retry["content"] and "furosemide 40 mg IV BID" in retry["content"]
    assert SUMMARY in retry["content"]
    with pytest.raises(ValueError):
        compression_messages("   ", checklist, target_words=5)


def test_a_good_first_attempt_is_accepted() -> None:
    model = ScriptedModel({"n1": [(SHORT_ALL, "eos")]})
    (record,) = compress_notes([("n1", SUMMARY)], model, SETTINGS)
    assert record["fallback"] is False and record["attempts"] == 1 and record["accepted_attempt"] == 1
    assert record["summary"] == SHORT_ALL and record["stage1_summary"] == SUMMARY
    assert record["retention"] == 1.0 and record["missing"] == []
    assert "medication:furosemide|40 mg" in record["retained"]
    assert record["ratio_chars"] == round(len(SHORT_ALL) / len(SUMMARY), 4)
    assert record["ratio_tokens"] == round(len(SHORT_ALL.split()) / len(SUMMARY.split()), 4)


def test_lost_entities_are_named_in_the_retry_which_is_accepted() -> None:
    model = ScriptedModel({"n1": [(SHORT_MISSING_DOSE, "eos"), (SHORT_ALL, "eos")]})
    (record,) = compress_notes([("n1", SUMMARY)], model, SETTINGS)
    assert record["attempts"] == 2 and record["accepted_attempt"] == 2 and not record["fallback"]
    first, second = record["attempt_log"]
    assert first["rejected"] == "entities_lost" and "medication:furosemide|40 mg" in first["missing"]
    assert second["rejected"] is None
    assert "furosemide 40 mg IV BID" in model.prompts[1].split("left these out")[1]
    assert "left these out" not in model.prompts[0]


def test_no_acceptable_attempt_falls_back_to_stage1_after_max_attempts() -> None:
    model = ScriptedModel({"n1": [(SHORT_MISSING_DOSE, "eos")] * 3})
    (record,) = compress_notes([("n1", SUMMARY)], model, SETTINGS)
    assert record["fallback"] is True and record["attempts"] == 3 and record["accepted_attempt"] is None
    assert record["summary"] == SUMMARY and record["ratio_chars"] == 1.0
    assert record["retention"] == 1.0 and record["missing"] == []  # the fallback text keeps everything
    assert [a["rejected"] for a in record["attempt_log"]] == ["entities_lost"] * 3
    assert model.calls == 3


@pytest.mark.parametrize(
    ("output", "reason", "rejected"),
    [
        (SUMMARY + " " + SHORT_ALL, "eos", "too_long"),
        (SHORT_ALL, "length", "cut_off"),
        ("", "eos", "empty"),
    ],
)
def test_too_long_cut_off_or_empty_attempts_are_rejected(output: str, reason: str, rejected: str) -> None:
    model = ScriptedModel({"n1": [(output, reason), (SHORT_ALL, "eos")]})
    (record,) = compress_notes([("n1", SUMMARY)], model, SETTINGS)
    assert record["attempt_log"][0]["rejected"] == rejected
    assert record["accepted_attempt"] == 2
    if rejected in ("too_long", "cut_off"):
        assert "stay near" in model.prompts[1]


def test_retries_batch_only_the_failing_notes_and_records_keep_input_order() -> None:
    model = ScriptedModel({"a": [(SHORT_MISSING_DOSE, "eos"), (SHORT_ALL, "eos")], "b": [(SHORT_ALL, "eos")]})
    records = compress_notes([("a", SUMMARY), ("b", SUMMARY)], model, SETTINGS)
    assert [r["note_id"] for r in records] == ["a", "b"]
    assert model.calls == 2 and len(model.prompts) == 3  # round 1: a and b; round 2: a only


def test_summary_without_entities_and_empty_summary() -> None:
    text = "The patient did well and went home. " * 4
    model = ScriptedModel({"x": [("The patient did well.", "eos")]})
    empty_model = ScriptedModel({})
    (record,) = compress_notes([("x", text)], model, SETTINGS)
    assert record["retention"] is None and not record["fallback"]  # nothing to lose
    (empty,) = compress_notes([("e", "")], empty_model, SETTINGS)
    assert empty["fallback"] is True and empty["attempts"] == 0 and empty_model.calls == 0


def test_generation_is_capped_near_the_stage1_length() -> None:
    seen: list[int] = []

    class Capture(ScriptedModel):
        def generate_all(self, requests):
            seen.extend(r.max_new_tokens for r in requests)
            return super().generate_all(requests)

    settings = CompressionSettings(max_new_tokens=512, max_length_ratio=1.0, max_attempts=1)
    compress_notes([("n1", SUMMARY)], Capture({"n1": [(SHORT_ALL, "eos")]}), settings)
    assert seen == [len(SUMMARY.split()) + 16]


def test_summary_statistics_distinguish_ratio_of_totals_from_mean_of_ratios() -> None:
    records = [
        {"retention": 1.0, "ratio_chars": 0.5, "chars": 50, "stage1_chars": 100, "fallback": False, "attempts": 1,
         "new_tokens": 10, "seconds": 1.0},
        {"retention": 0.5, "ratio_chars": 2.0, "chars": 20, "stage1_chars": 10, "fallback": True, "attempts": 3,
         "new_tokens": 30, "seconds": 2.0},
    ]  # fmt: skip
    stats = summarize_stage2(records)
    assert stats["ratio_chars_mean"] == 1.25
    assert stats["ratio_chars_of_totals"] == round(70 / 110, 4)
    assert stats["fallbacks"] == 1 and stats["fallback_rate"] == 0.5 and stats["mean_attempts"] == 2.0
    assert stats["mean_retention"] == 0.75
    assert stats["mean_retention_accepted"] == 1.0 and stats["notes_with_entities"] == 2


def test_stage2_log_line_does_not_pass_fallbacks_off_as_retention() -> None:
    # The demo's case: every compression failed; three kept stage-1 summaries have entities (retention 1.0 against
    # themselves), five have none (retention null). "mean entity retention 1.0" said the opposite of what happened.
    records = [
        {"retention": 1.0 if k < 3 else None, "ratio_chars": 1.0, "chars": 10, "stage1_chars": 10, "fallback": True,
         "attempts": 2, "new_tokens": 4, "seconds": 0.1}
        for k in range(8)
    ]  # fmt: skip
    line = describe_stage2(summarize_stage2(records))
    assert "8 fallbacks" in line and "no accepted compression" in line and "3 of 8 stage-1 summaries" in line
    assert "1.0" not in line.split("length ratio")[0]


# ---------------------------------------------------------------------------------------------------------------
# Input checks before any model is loaded
# ---------------------------------------------------------------------------------------------------------------


def _stage1_dir(tmp_path: Path, status: str, lines: list[dict]) -> Path:
    d = tmp_path / "generate"
    d.mkdir(parents=True)
    (d / "manifest.json").write_text(json.dumps({"stage": "generate", "status": status, "outputs": {}}))
    (d / "stage1.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return d / "stage1.jsonl"


def test_read_stage1_refuses_half_written_or_malformed_inputs(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="running"):
        read_stage1(_stage1_dir(tmp_path / "a", "running", [{"note_id": "n", "summary": "s"}]))
    with pytest.raises(ArtifactError, match="appears twice"):
        read_stage1(_stage1_dir(tmp_path / "b", "complete", [{"note_id": "n", "summary": "s"}] * 2))
    with pytest.raises(ArtifactError, match="lacks"):
        read_stage1(_stage1_dir(tmp_path / "c", "complete", [{"note_id": "n"}]))
    with pytest.raises(ArtifactError, match="no such directory"):
        read_stage1(tmp_path / "missing" / "stage1.jsonl")
    ok = _stage1_dir(tmp_path / "d", "complete", [{"note_id": "n", "summary": "s"}])
    assert read_stage1(ok) == [("n", "s")]


def test_compress_with_a_half_written_input_exits_2_before_loading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dischargesum.modeling
    from dischargesum.cli import run_stage
    from dischargesum.config import CompressConfig
    from dischargesum.inference.compress import run_compress

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(dischargesum.modeling, "load_base_model", refuse)
    monkeypatch.setattr(dischargesum.modeling, "read_model_info", refuse)
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("dischargesum").addHandler(handler)
    try:
        path = _stage1_dir(tmp_path, "running", [{"note_id": "n", "summary": "s"}])
        rc = run_stage(CompressConfig, run_compress, ["--output_dir", str(tmp_path / "o"), "--input", str(path)], "c")
    finally:
        logging.getLogger("dischargesum").removeHandler(handler)
    assert rc == 2
    assert any("`input`" in m and "Rerun it to completion" in m for m in messages)


def test_pipeline_memory_note_on_cpu_and_gpu() -> None:
    from dischargesum.inference.pipeline import _memory_note

    assert _memory_note(None, None) == "no CUDA device: memory not measured"  # was "CUDA allocated: None bytes"
    assert _memory_note(2048, 0) == "CUDA allocated: 2,048 bytes before stage 1, 0 after"
