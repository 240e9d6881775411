"""Token budget: counts equal TRL's SFTTrainer tokenization; notes are shortened, summaries never."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from dischargesum.data.budget import TokenCounter, count_tokens, fit_to_budget, tokenize_examples
from dischargesum.data.formatting import DEFAULT_INSTRUCTION, completion_messages, prompt_messages
from dischargesum.data.normalize import normalize_clinical_note
from dischargesum.data.shorten import DROP_ORDER, MARKER, find_sections, middle_cut, shorten_note
from dischargesum.data.synthetic import generate_rows
from dischargesum.modeling import load_tokenizer

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    return load_tokenizer(str(tiny_model_dir))


@pytest.fixture(scope="module")
def rows() -> list[tuple[str, str]]:
    out = []
    for row in generate_rows(24, profile="kaggle", seed=5, with_entities=False):
        out.append((normalize_clinical_note(row["input"])[0], row["target"]))
    return out


def _junk(rng: random.Random, n: int) -> str:
    alphabet = "ab \n\t_/.,:;-0123456789\u00e9\u00b5\u00a0" + "<start_of_turn><end_of_turn>"
    return "".join(rng.choice(alphabet) for _ in range(n))


def test_counts_equal_trl_tokenize_fn(tokenizer, rows) -> None:
    """Run TRL's own preprocessing (SFTTrainer._prepare_dataset's tokenize_fn) and compare."""
    from datasets import Dataset
    from trl import SFTConfig
    from trl.trainer.sft_trainer import SFTTrainer

    notes, summaries = zip(*rows[:6])
    dataset = Dataset.from_dict(
        {
            "prompt": [prompt_messages(n, DEFAULT_INSTRUCTION) for n in notes],
            "completion": [completion_messages(s) for s in summaries],
        }
    )
    args = SFTConfig(output_dir="unused", max_length=None, report_to=[], use_cpu=True, bf16=False)
    trainer = SFTTrainer.__new__(SFTTrainer)  # only the dataset preparation, no model
    trainer._tokenizer = tokenizer
    trainer.chat_template = None
    trainer.completion_only_loss = True
    processed = SFTTrainer._prepare_dataset(trainer, dataset, tokenizer, args, False, None, "train")
    _prompt, completion, total = count_tokens(tokenizer, list(notes), list(summaries))
    assert [len(ids) for ids in processed["input_ids"]] == total.tolist()
    assert [sum(1 for label in labels if label != -100) for labels in processed["labels"]] == completion.tolist()


def test_token_counter_split_equals_exact(tokenizer, rows) -> None:
    rng = random.Random(0)
    notes = [n for n, _ in rows] + [_junk(rng, rng.randint(1, 300)) for _ in range(40)]
    summaries = [s for _, s in rows] + [_junk(rng, rng.randint(1, 120)) for _ in range(40)]
    counter = TokenCounter(tokenizer, verify_every=1)
    assert counter.mode == "split" and counter.split_token == "<start_of_turn>"
    exact = tokenize_examples(tokenizer, notes, summaries)
    prompt, completion, total = counter.count(notes, summaries)
    assert prompt.tolist() == exact.prompt_lengths.tolist()
    assert completion.tolist() == exact.completion_lengths.tolist()
    assert total.tolist() == exact.total_lengths.tolist()
    assert counter.stats["verified_rows"] == len(notes)
    assert TokenCounter(tokenizer, mode="exact").mode == "exact"


def test_fit_shortens_notes_never_summaries(tokenizer, rows) -> None:
    notes, summaries = [n for n, _ in rows], [s for _, s in rows]
    counter = TokenCounter(tokenizer)
    limit = 700
    fitted = fit_to_budget(counter, notes, summaries, max_seq_length=limit, min_note_tokens=32, strategy="sections")
    kept = [i for i in range(len(notes)) if i not in fitted.rejected]
    assert fitted.shortened.any() and fitted.rejected and kept
    _, _, total = count_tokens(tokenizer, [fitted.notes[i] for i in kept], [summaries[i] for i in kept])
    assert (total <= limit).all() and total.tolist() == fitted.total_tokens[kept].tolist()
    for i in kept:
        if fitted.shortened[i]:
            assert MARKER in fitted.notes[i] and len(fitted.notes[i]) < len(notes[i])
            assert fitted.total_tokens[i] > limit * 0.8  # little more removed than needed
        else:
            assert fitted.notes[i] == notes[i]
    # rejected rows: the summary alone (with the bare marker as note) leaves < min_note_tokens
    _, _, bare = count_tokens(tokenizer, [MARKER] * len(fitted.rejected), [summaries[i] for i in fitted.rejected])
    assert (bare > limit - 32).all()


def test_sections_are_dropped_least_useful_first() -> None:
    note = normalize_clinical_note(next(generate_rows(1, profile="kaggle", seed=3))["input"])[0]
    names = [s.name for s in find_sections(note)]
    assert {"history of present illness", "discharge medications", "discharge diagnosis"} <= set(names)
    previous = len(note)
    dropped_so_far: list[str] = []
    for remove in (50, 400, 1500, 3000, len(note)):
        result = shorten_note(note, remove, "sections")
        assert len(result.text) <= previous  # monotone
        assert len(note) - len(result.text) >= min(remove, len(note) - len(MARKER))
        previous = len(result.text)
        order = [DROP_ORDER.index(name) for name in result.dropped]
        assert order == sorted(order)
        assert result.dropped[: len(dropped_so_far)] == dropped_so_far
        dropped_so_far = result.dropped
        if not result.middle_cut_chars:
            assert "History of Present Illness:" in result.text and "Discharge Medications:" in result.text


def test_middle_cut() -> None:
    text = " ".join(f"w{i}" for i in range(200))
    cut, removed = middle_cut(text, 300)
    assert cut.startswith("w0 w1") and cut.endswith("w198 w199") and MARKER in cut
    assert removed >= 300 - len(MARKER) and len(cut) < len(text) - 250
    assert middle_cut(text, 10_000) == (MARKER, len(text))
    assert shorten_note("no sections here " * 20, 100, "sections").middle_cut_chars > 0


def test_physionet_tags_are_sections() -> None:
    note = "<SEX> F <CHIEF COMPLAINT> Cough <FAMILY HISTORY> Mother with CAD. <DISCHARGE DIAGNOSIS> CAP"
    result = shorten_note(note, 10, "sections")
    assert result.dropped == ["family history"] and "<FAMILY HISTORY> [...]" in result.text
    assert result.text.endswith("<DISCHARGE DIAGNOSIS> CAP")


def test_tokenizer_without_template_is_a_config_error(tmp_path: Path, tiny_model_dir: Path) -> None:
    import shutil

    from dischargesum.config import ConfigError

    with pytest.raises(ConfigError, match="could not be loaded"):
        load_tokenizer(str(tmp_path / "nothing"))
    plain = tmp_path / "plain"
    shutil.copytree(tiny_model_dir, plain)
    for name in ("chat_template.jinja",):
        (plain / name).unlink(missing_ok=True)
    config = (plain / "tokenizer_config.json").read_text()
    import json

    data = json.loads(config)
    data.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="no chat template"):
        load_tokenizer(str(plain))


def test_prompt_plus_completion_is_total(tokenizer, rows) -> None:
    prompt, completion, total = count_tokens(tokenizer, [n for n, _ in rows], [s for _, s in rows])
    assert np.array_equal(prompt + completion, total)


def _counts_equal_exact(counter: TokenCounter, tokenizer, notes: list[str], summaries: list[str]) -> None:
    exact = tokenize_examples(tokenizer, notes, summaries)
    prompt, completion, total = counter.count(notes, summaries)
    assert prompt.tolist() == exact.prompt_lengths.tolist()
    assert completion.tolist() == exact.completion_lengths.tolist()
    assert total.tolist() == exact.total_lengths.tolist()


def test_token_counter_fast_paths_equal_exact_on_random_inputs(tokenizer, rows) -> None:
    """Fixed chat frame, Rust-side lengths and the remembered summary side give TRL's counts, re-counts included."""
    rng = random.Random(1)
    counter = TokenCounter(tokenizer, verify_every=10_000)  # rely on the fast paths, check here instead
    assert counter.mode == "split" and counter.frame is not None
    for _ in range(3):
        notes = [n for n, _ in rows] + [_junk(rng, rng.randint(1, 400)).strip() or "x" for _ in range(30)]
        summaries = [s for _, s in rows] + [_junk(rng, rng.randint(1, 150)) for _ in range(30)]
        notes += [_junk(rng, 50) + " ", " " + _junk(rng, 50)]  # surrounding whitespace: rendered by Jinja
        summaries += ["s ", "\ns"]
        _counts_equal_exact(counter, tokenizer, notes, summaries)
        # re-count shortened notes against the same summaries (their side comes from the memory), and bare markers
        _counts_equal_exact(counter, tokenizer, [n[: len(n) // 2].strip() or "y" for n in notes], summaries)
        _counts_equal_exact(counter, tokenizer, [MARKER] * len(summaries), summaries)
    assert counter.stats["verified_rows"] < counter.stats["split_rows"]
    frame = counter.frame
    assert frame.applies("note", "summary") and not frame.applies("note ", "summary")
    assert not frame.applies("note", "") and not frame.applies("", "summary")
    # the Rust-side lengths equal the wrapper's id lists
    texts = [n for n, _ in rows[:5]] + ["<start_of_turn>user\nx<end_of_turn>\n", "\u00e9\u00b5 \U0001f489"]
    assert counter._token_lengths(texts) == [len(ids) for ids in counter._encode(texts)]
    assert counter._token_ids(texts) == counter._encode(texts)


def test_token_counter_summary_memory_is_bounded(tokenizer, rows) -> None:
    counter = TokenCounter(tokenizer, verify_every=10_000, max_cached_summaries=5)
    notes, summaries = [n for n, _ in rows], [s for _, s in rows]
    for start in range(0, len(notes), 4):
        _counts_equal_exact(counter, tokenizer, notes[start : start + 4], summaries[start : start + 4])
        assert len(counter._tails) <= 5
    _counts_equal_exact(counter, tokenizer, notes, summaries)  # more rows than the memory holds at once


def test_token_counter_without_a_fixed_frame_renders_with_jinja(tokenizer, rows) -> None:
    """A template that transforms the message text has no fixed frame; counts stay exact through Jinja."""
    import copy

    upper = copy.deepcopy(tokenizer)
    upper.chat_template = tokenizer.chat_template.replace("message['content'] | trim", "message['content'] | upper")
    assert upper.chat_template != tokenizer.chat_template
    counter = TokenCounter(upper, verify_every=1)
    assert counter.frame is None
    notes, summaries = [n for n, _ in rows[:6]], [s for _, s in rows[:6]]
    _counts_equal_exact(counter, upper, notes, summaries)
