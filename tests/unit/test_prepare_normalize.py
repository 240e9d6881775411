"""Normalisation: clinical keeps every clinical detail; seed reproduces the seed's lossy cleaning offline."""

from __future__ import annotations

import json

import pytest

from dischargesum.data.normalize import (
    NLTK_ENGLISH_STOPWORDS,
    count_words,
    filter_rare_words,
    normalize_clinical_note,
    normalize_entities_json,
    normalize_seed,
    normalize_whitespace,
    seed_backends,
    strip_instruction_prefix,
)
from dischargesum.data.synthetic import INSTRUCTION_PREFIXES

pytestmark = pytest.mark.unit

NOTE = (
    "Sex: F\nChief Complaint:\nChest pain\nBP 120/80, HR 72. Denies fevers; no edema. Given furosemide 40 mg IV ___."
)


@pytest.mark.parametrize("prefix", INSTRUCTION_PREFIXES)
def test_every_synthetic_instruction_prefix_is_stripped(prefix: str) -> None:
    note, removed = normalize_clinical_note(prefix + NOTE)
    assert note == NOTE
    assert removed is not None and removed.lower().startswith(prefix.split()[0].lower().rstrip(":"))


@pytest.mark.parametrize(
    "text",
    [
        "summarize: Sex: F",  # prefix and note on one line
        "  Summarize the following clinical note:\r\nSex: F",
        "Please write a brief hospital course summary.\nSex: F",
    ],
)
def test_prefix_variants(text: str) -> None:
    assert normalize_clinical_note(text)[0] == "Sex: F"


@pytest.mark.parametrize(
    "text",
    [
        NOTE,
        "Provide oxygen by nasal cannula.\nSex: F",  # an instruction verb, but not about a summary
        "Summary of labs: Na 138\nK 4.1",  # starts with a topic word, not an instruction verb
    ],
)
def test_non_instruction_first_lines_are_kept(text: str) -> None:
    stripped, removed = strip_instruction_prefix(text)
    assert removed is None and stripped == text


def test_clinical_keeps_case_digits_units_negations_blanks() -> None:
    note, _ = normalize_clinical_note("summarize:\n" + NOTE)
    for kept in ("Chest pain", "120/80", "40 mg IV", "Denies", "no edema", "___", "HR 72."):
        assert kept in note


def test_whitespace_collapses_but_keeps_lines() -> None:
    raw = "Name:  ___          Unit No:   ___\r\n\r\n\r\n\tChief Complaint:  \nCough\u00a0 x3  "
    assert normalize_whitespace(raw) == "Name: ___ Unit No: ___\n\nChief Complaint:\nCough x3"


def test_nfc() -> None:
    assert normalize_whitespace("cafe\u0301") == "caf\u00e9"


def test_entities_follow_the_note_normalisation() -> None:
    entities = json.dumps([{"type": "vital", "text": "BP  120/80"}, {"type": "x", "text": 3}])
    out = json.loads(normalize_entities_json(entities) or "null")
    assert out[0]["text"] == "BP 120/80" and out[1]["text"] == 3
    assert normalize_entities_json("not json") is None
    assert normalize_entities_json(None) is None


# ---- seed mode -------------------------------------------------------------------------------------------------

SEED_CASES = {
    # the seed's documented losses: digits, units, negations ("no", "not"), punctuation, case, plurals
    "The patients were given 2 tablets of aspirin 81mg daily and had no fevers.": (
        "patient given tablet aspirin mg daily fever"
    ),
    "She was NOT hypotensive; BP 90/60 on ___.": "hypotensive bp",
    "Glasses, boxes and arteries: status post diagnosis.": "glass box artery status post diagnosis",
}


@pytest.mark.parametrize(("text", "expected"), SEED_CASES.items())
def test_seed_reproduces_the_seed_transformations(text: str, expected: str) -> None:
    assert normalize_seed(text) == expected


def test_seed_backends_are_reported_and_offline() -> None:
    backends = seed_backends()
    assert set(backends) == {"tokenizer", "stopwords", "lemmatizer"}
    assert all(backends.values())


def test_embedded_stopwords_are_nltk_english() -> None:
    assert len(NLTK_ENGLISH_STOPWORDS) == 179 == len(set(NLTK_ENGLISH_STOPWORDS))
    assert {"no", "not", "nor", "the", "wouldn't"} <= set(NLTK_ENGLISH_STOPWORDS)


def test_data_free_tokenizer_equals_split_on_letters_only_text() -> None:
    from nltk.tokenize import TreebankWordTokenizer

    text = "patient given tablet aspirin  mg daily\nfever"
    assert TreebankWordTokenizer().tokenize(text) == text.split()


def test_rare_word_filter() -> None:
    texts = ["a b b c", "b c c"]
    counts = count_words(texts)
    assert filter_rare_words("a b c", counts, 2) == "b c"
    assert filter_rare_words("a b c", counts, 1) == "a b c"


def _reference_normalize_whitespace(text: str) -> str:
    """The three regex substitutions that normalize_whitespace computes faster (its definition)."""
    import re
    import unicodedata

    text = unicodedata.normalize("NFC", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = re.sub(r"[^\S\n]+", " ", text)
    text = re.sub(r" +\n|\n +", "\n", text)
    text = re.sub(r" +\n|\n +", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def test_normalize_whitespace_equals_the_regex_definition_on_random_text() -> None:
    import random

    rng = random.Random(0)
    alphabet = [" ", " ", " ", "\t", "\n", "\n", "\r", "\x0b", "\x0c", "\x1c", "\x1f", "\xa0", "\x85", "\u2003"]
    alphabet += ["\u2028", "\u3000", "a", "B", "5", "_", "e\u0301", "\u00b5"]
    for _ in range(50_000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 16)))
        assert normalize_whitespace(text) == _reference_normalize_whitespace(text), repr(text)
    for text in (NOTE, " \n \n x \n \n ", "a  \t \n\n\n\n  b", "a\u00a0 \n b", "\r\n\r\n\r\nx\r"):
        assert normalize_whitespace(text) == _reference_normalize_whitespace(text)
