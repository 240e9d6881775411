"""Text normalisation: ``clinical`` (the default: lossless for clinical content) and ``seed`` (the seed's lossy
cleaning, for comparison only).

``clinical`` — what a clinician would call "the same note":

1. Strip the instruction prefix some sources put before the note (the Kaggle mirror's ``summarize:\\n``,
   ``generate a brief hospital summary:``, ...): a leading line that starts with an instruction verb
   (summarize, generate, write, create, produce, provide; optionally after "please") and names a summary, note or
   hospital course. Our own instruction is added by the chat prompt; a second, different one would only confuse.
2. Unicode NFC (composed accents; the same string always has the same code points and tokens).
3. Whitespace: ``\\r\\n``/``\\r`` -> ``\\n``; runs of spaces, tabs and other horizontal whitespace -> one space;
   no spaces at line ends; at most one blank line; no leading/trailing whitespace. Line breaks are kept: they
   carry the section structure the length budget uses and the model reads.
4. Nothing else: case, digits, units, punctuation, negations ("no", "not", "denies") and MIMIC's ``___``
   de-identification blanks are kept exactly.

``seed`` — reproduces the seed prototype's cleaning, which destroys what the task must preserve (doses, values,
dates, negations). Use it only to measure how much that costs. Steps: lowercase; every character that is not a
letter a-z becomes a space (digits and punctuation go); NLTK word tokenisation; drop NLTK's English stopwords
(including "no", "not", "nor"); WordNet lemmatisation (NLTK's default, noun POS); drop words that occur fewer
than ``seed_min_word_count`` times in the corpus (done by the pipeline, which sees the whole corpus — see
:func:`filter_rare_words`).

It runs offline. With NLTK's data installed (``punkt_tab``, ``stopwords``, ``wordnet``) it uses it; otherwise a
data-free equivalent, and :func:`seed_backends` says which ran (the data card records it):

- tokeniser: ``nltk.word_tokenize`` needs punkt; NLTK's data-free ``TreebankWordTokenizer`` gives the same
  tokens here, because only letters and spaces are left when tokenisation runs (nothing for punkt to split on).
- stopwords: NLTK's English list (179 words) is embedded below, byte for byte the ``stopwords`` corpus entries.
- lemmatiser: WordNet's noun suffix rules (the detachment rules of WordNet's ``morphy``) without WordNet's
  dictionary. WordNet keeps a candidate lemma only if it is a WordNet noun; without the dictionary the most
  specific rule is taken, and words that end in ``ss``/``us``/``is``/``as`` or have 3 letters or fewer stay as
  they are (status, diagnosis, bias, gas, was). This is an approximation: it differs from WordNet on irregular
  plurals, on words WordNet does not know (WordNet leaves them unchanged) and on "-ches" words like
  "headaches" (here "headach").
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable
from functools import lru_cache
from typing import Any

from dischargesum.logging_utils import get_logger

logger = get_logger(__name__)

# ----------------------------------------------------------------------------------------------------------------
# clinical

_INSTRUCTION_PREFIX = re.compile(
    r"\A[ \t\r\n]*(?P<prefix>(?:please[ \t]+)?(?:summari[sz]e|generate|write|create|produce|provide)\b[^\n]{0,200}?)"
    r"(?:[:.][ \t]*(?:\r?\n|(?=\S))|[ \t]*\r?\n)",
    re.IGNORECASE,
)
_PREFIX_TOPIC = re.compile(r"summar|hospital course|\bbhc\b|\bnote\b|discharge", re.IGNORECASE)
_HORIZONTAL_SPACE = re.compile(r"[^\S\n]+")
_TRAILING_SPACE = re.compile(r" +\n|\n +")
_BLANK_LINES = re.compile(r"\n{3,}")


def strip_instruction_prefix(text: str) -> tuple[str, str | None]:
    """``(text without a leading instruction line, the prefix removed or None)``.

    Only a first line that starts with an instruction verb *and* names a summary/note/hospital course counts, so a
    note that happens to begin "Provide ..." in its own words is not cut. The prefix ends at a colon or full stop
    (the note may follow on the same line) or at the line break.
    """
    match = _INSTRUCTION_PREFIX.match(text)
    if match is None or not _PREFIX_TOPIC.search(match.group("prefix")):
        return text, None
    return text[match.end() :], match.group("prefix").strip()


# ASCII characters other than " " that _HORIZONTAL_SPACE matches (tab, vertical tab, form feed, \x1c-\x1f; \r is
# gone by then).
_ASCII_OTHER_SPACE = tuple(c for c in map(chr, range(128)) if c not in " \r" and _HORIZONTAL_SPACE.fullmatch(c))
_SPACE_RUN = re.compile("  +")


def normalize_whitespace(text: str) -> str:
    """NFC; one space for runs of horizontal whitespace; no spaces around line breaks; at most one blank line.

    Same result as the three substitutions ``_HORIZONTAL_SPACE -> " "``, ``_TRAILING_SPACE -> "\\n"`` (twice) and
    ``_BLANK_LINES -> "\\n\\n"``, computed faster (this runs on every note, summary and entity at 270k rows):
    ASCII text collapses its whitespace with ``str.replace`` and a regex with a literal prefix; and once every run
    of horizontal whitespace is a single space, the two trailing-space passes remove exactly the spaces next to a
    line break, which two ``str.replace`` calls do. ``tests/unit/test_prepare_normalize.py`` checks the equivalence.
    """
    if text.isascii() and text.isprintable():  # one line of plain text (most entity texts): only spaces to fix
        return (_SPACE_RUN.sub(" ", text) if "  " in text else text).strip()
    text = unicodedata.normalize("NFC", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if text.isascii():
        for char in _ASCII_OTHER_SPACE:
            if char in text:
                text = text.replace(char, " ")
        if "  " in text:
            text = _SPACE_RUN.sub(" ", text)
    else:
        text = _HORIZONTAL_SPACE.sub(" ", text)
    # every horizontal-whitespace run is now one " "
    text = text.replace(" \n", "\n").replace("\n ", "\n")
    if "\n\n\n" in text:
        text = _BLANK_LINES.sub("\n\n", text)
    return text.strip()


def normalize_clinical_note(text: str) -> tuple[str, str | None]:
    """``(normalised note, instruction prefix removed or None)``."""
    stripped, prefix = strip_instruction_prefix(text)
    return normalize_whitespace(stripped), prefix


def normalize_entities_json(value: str | None) -> str | None:
    """Apply :func:`normalize_whitespace` to each entity's ``text`` so it stays verbatim in the normalised note.

    Returns None for a missing or unparsable value (the data card counts those).
    """
    if value is None:
        return None
    try:
        entities = json.loads(value)
    except (TypeError, ValueError):
        return None
    if not isinstance(entities, list):
        return None
    for entity in entities:
        if isinstance(entity, dict) and isinstance(entity.get("text"), str):
            entity["text"] = normalize_whitespace(entity["text"])
    return json.dumps(entities, ensure_ascii=False)


# ----------------------------------------------------------------------------------------------------------------
# seed

# NLTK's English stopword list (nltk_data corpora/stopwords/english, 179 entries), in the corpus's order.
NLTK_ENGLISH_STOPWORDS: tuple[str, ...] = (
    "i", "me", "my", "myself", "we", "our", "ours", "ourselves", "you", "you're", "you've", "you'll", "you'd",
    "your", "yours", "yourself", "yourselves", "he", "him", "his", "himself", "she", "she's", "her", "hers",
    "herself", "it", "it's", "its", "itself", "they", "them", "their", "theirs", "themselves", "what", "which",
    "who", "whom", "this", "that", "that'll", "these", "those", "am", "is", "are", "was", "were", "be", "been",
    "being", "have", "has", "had", "having", "do", "does", "did", "doing", "a", "an", "the", "and", "but", "if",
    "or", "because", "as", "until", "while", "of", "at", "by", "for", "with", "about", "against", "between",
    "into", "through", "during", "before", "after", "above", "below", "to", "from", "up", "down", "in", "out",
    "on", "off", "over", "under", "again", "further", "then", "once", "here", "there", "when", "where", "why",
    "how", "all", "any", "both", "each", "few", "more", "most", "other", "some", "such", "no", "nor", "not",
    "only", "own", "same", "so", "than", "too", "very", "s", "t", "can", "will", "just", "don", "don't",
    "should", "should've", "now", "d", "ll", "m", "o", "re", "ve", "y", "ain", "aren", "aren't", "couldn",
    "couldn't", "didn", "didn't", "doesn", "doesn't", "hadn", "hadn't", "hasn", "hasn't", "haven", "haven't",
    "isn", "isn't", "ma", "mightn", "mightn't", "mustn", "mustn't", "needn", "needn't", "shan", "shan't",
    "shouldn", "shouldn't", "wasn", "wasn't", "weren", "weren't", "won", "won't", "wouldn", "wouldn't",
)  # fmt: skip

_NON_LETTERS = re.compile(r"[^a-z]+")
_KEEP_UNLEMMATISED = ("ss", "us", "is", "as")


def _nltk_has(resource: str) -> bool:
    try:
        import nltk

        nltk.data.find(resource)
    except (ImportError, LookupError):
        return False
    return True


@lru_cache(maxsize=1)
def seed_backends() -> dict[str, str]:
    """Which implementation each seed step uses on this machine: NLTK data when installed, else data-free."""
    return {
        "tokenizer": "nltk.word_tokenize (punkt_tab)"
        if _nltk_has("tokenizers/punkt_tab/english/")
        else "nltk.TreebankWordTokenizer (data-free; identical on letters-only text)",
        "stopwords": "nltk stopwords corpus (english)"
        if _nltk_has("corpora/stopwords")
        else "embedded copy of NLTK's English stopword list (179 words)",
        "lemmatizer": "nltk WordNetLemmatizer (wordnet corpus)"
        if _nltk_has("corpora/wordnet")
        else "WordNet noun morphology rules without the WordNet dictionary (data-free approximation)",
    }


@lru_cache(maxsize=1)
def _seed_tools() -> tuple[Any, frozenset[str], Any]:
    backends = seed_backends()
    if backends["tokenizer"].startswith("nltk.word_tokenize"):
        from nltk import word_tokenize as tokenize
    else:
        from nltk.tokenize import TreebankWordTokenizer

        tokenize = TreebankWordTokenizer().tokenize
    if backends["stopwords"].startswith("nltk stopwords"):
        from nltk.corpus import stopwords

        stop = frozenset(stopwords.words("english"))
    else:
        stop = frozenset(NLTK_ENGLISH_STOPWORDS)
    if backends["lemmatizer"].startswith("nltk WordNet"):
        from nltk.stem import WordNetLemmatizer

        lemmatize = lru_cache(maxsize=200_000)(WordNetLemmatizer().lemmatize)
    else:
        lemmatize = _rule_noun_lemma
    return tokenize, stop, lemmatize


# WordNet's noun detachment rules (WordNetCorpusReader.MORPHOLOGICAL_SUBSTITUTIONS[NOUN]), ordered so the most
# specific suffix wins. WordNet tries them all and keeps candidates that are WordNet nouns; without the dictionary
# the most specific rule is the best single guess ("glasses" -> "glass", "boxes" -> "box", "arteries" ->
# "artery"), except "ves" -> "f", which is wrong as often as right ("valves"), so plain "s" removal is used there.
_NOUN_RULES: tuple[tuple[str, str], ...] = (
    ("sses", "ss"),
    ("shes", "sh"),
    ("ches", "ch"),
    ("xes", "x"),
    ("zes", "z"),
    ("ies", "y"),
    ("men", "man"),
    ("s", ""),
)


@lru_cache(maxsize=200_000)
def _rule_noun_lemma(word: str) -> str:
    if len(word) <= 3 or word.endswith(_KEEP_UNLEMMATISED):
        return word
    for old, new in _NOUN_RULES:
        if word.endswith(old):
            return word[: len(word) - len(old)] + new
    return word


def normalize_seed(text: str) -> str:
    """The seed's cleaning without the corpus-level rare-word filter: lowercase, letters only, NLTK tokens,
    no stopwords, WordNet lemmas; tokens joined by single spaces."""
    tokenize, stop, lemmatize = _seed_tools()
    letters = _NON_LETTERS.sub(" ", text.lower())
    return " ".join(lemmatize(token) for token in tokenize(letters) if token not in stop)


def count_words(texts: Iterable[str]) -> Counter[str]:
    """Word frequencies of already seed-normalised texts (space-separated tokens)."""
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(text.split(" ") if text else ())
    return counts


def filter_rare_words(text: str, counts: Counter[str] | dict[str, int], min_count: int) -> str:
    """Drop words seen fewer than ``min_count`` times in the corpus (the seed's rare-word filter)."""
    if min_count <= 1 or not text:
        return text
    return " ".join(word for word in text.split(" ") if counts.get(word, 0) >= min_count)
