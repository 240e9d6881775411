"""Clinical vocabulary shared by the synthetic note generator and the entity extractor.

One source of truth: the generator writes notes from these lists and the extractor (``evaluation.entities``)
recognises the same names, so synthetic ground truth and extraction agree on spelling. The lists are written
by hand from common inpatient medicine (discharge medication lists, basic metabolic panel / CBC, frequent
problems and procedures in MIMIC-IV discharge notes); they are not derived from MIMIC text.

The word lists live in ``lexicon.toml`` beside this module (shipped as package data); this module only holds the
record types and a loader that checks every entry against the types of the ``Lexicon`` fields and turns TOML
arrays into tuples and inline tables into records. Each table of the TOML file is the upper-case constant of the
same name here (``medications`` -> ``MEDICATIONS``). The file's header says what each column means.

Extending a list is safe: add a line to the table, in the shape its comment gives (a wrong shape stops the import
with an error naming the file and the entry). Renaming, removing or reordering an entry of a table the generator
draws from (medications, labs, vitals, diagnoses, procedures, section_headers) changes synthetic data and the
pinned test fingerprints; the extractor-only tables change only what the extractor recognises.
"""

from __future__ import annotations

import functools
import tomllib
import typing
from dataclasses import MISSING, dataclass, fields, is_dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Medication:
    name: str  # generic name as written in notes
    doses: tuple[str, ...]  # typical strengths, as strings ("0.5", "40")
    unit: str  # canonical unit (mg, mcg, units, g, mEq, mL, puff)
    routes: tuple[str, ...]  # PO, IV, SC, INH, PR, SL, TD
    frequencies: tuple[str, ...]  # daily, BID, TID, QID, q6h, qHS, PRN ...
    brands: tuple[str, ...] = ()


@dataclass(frozen=True)
class Lab:
    name: str  # canonical name
    aliases: tuple[str, ...]  # spellings seen in notes ("Cr", "Creat")
    unit: str  # canonical unit ("" for unitless ratios)
    low: float  # plausible range used by the generator
    high: float
    decimals: int


@dataclass(frozen=True)
class Vital:
    name: str  # canonical name: BP, HR, RR, SpO2, Temp, Weight
    aliases: tuple[str, ...]
    unit: str


@dataclass(frozen=True)
class Lexicon:
    """Every table of ``lexicon.toml``; a field's type is the shape its entries must have."""

    medications: tuple[Medication, ...]
    labs: tuple[Lab, ...]
    vitals: tuple[Vital, ...]
    diagnoses: tuple[tuple[str, tuple[str, ...]], ...]
    procedures: tuple[tuple[str, tuple[str, ...]], ...]
    negation_cues: tuple[str, ...]
    section_headers: tuple[str, ...]
    medication_aliases: tuple[tuple[str, str], ...]
    extra_medications: tuple[tuple[str, tuple[str, ...]], ...]
    lab_aliases: tuple[tuple[str, str], ...]
    extra_labs: tuple[tuple[str, tuple[str, ...], str], ...]
    vital_aliases: tuple[tuple[str, str], ...]
    diagnosis_aliases: tuple[tuple[str, str], ...]
    extra_diagnoses: tuple[tuple[str, tuple[str, ...]], ...]
    procedure_aliases: tuple[tuple[str, str], ...]
    extra_procedures: tuple[tuple[str, tuple[str, ...]], ...]
    shorthand_medications: tuple[tuple[str, tuple[str, ...]], ...]
    shorthand_labs: tuple[tuple[str, tuple[str, ...], str], ...]
    shorthand_vitals: tuple[tuple[str, str], ...]
    shorthand_diagnoses: tuple[tuple[str, tuple[str, ...]], ...]
    shorthand_procedures: tuple[tuple[str, tuple[str, ...]], ...]
    symptoms_and_findings: tuple[str, ...]
    finding_heads: tuple[str, ...]
    procedure_heads: tuple[str, ...]


class LexiconError(ValueError):
    """``lexicon.toml`` is missing, is not valid TOML, or an entry does not have the shape of its table."""


def _describe(hint: Any) -> str:
    """A hint in TOML words: tuple[str, tuple[str, ...]] -> [string, [string, ...]]."""
    if hint is str:
        return "string"
    if hint is int:
        return "integer"
    if hint is float:
        return "number"
    if is_dataclass(hint):
        return "{ " + ", ".join(f.name + " = ..." for f in fields(hint)) + " }"
    args = typing.get_args(hint)
    if len(args) == 2 and args[1] is Ellipsis:
        return f"[{_describe(args[0])}, ...]"
    return "[" + ", ".join(_describe(arg) for arg in args) + "]"


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    """A record's field types, resolved once (the annotations are strings under ``from __future__``)."""
    return typing.get_type_hints(cls)


def _convert(value: Any, hint: Any, where: str) -> Any:
    """``value`` as loaded by tomllib, checked against ``hint``; arrays become tuples, inline tables records.

    A ``float`` column also takes an integer and keeps it an integer (``125`` stays ``int``, as in the tables).
    """
    if hint is str and isinstance(value, str):
        return value
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        return value
    if isinstance(hint, type) and is_dataclass(hint) and isinstance(value, dict):
        names = {f.name for f in fields(hint)}
        unknown = sorted(set(value) - names)
        missing = [f.name for f in fields(hint) if f.name not in value and f.default is MISSING]
        if unknown or missing:
            raise ValueError(
                f"{where}: unknown columns {unknown}, missing columns {missing}; expected {_describe(hint)}"
            )
        hints = _type_hints(hint)
        return hint(**{name: _convert(item, hints[name], f"{where}.{name}") for name, item in value.items()})
    args = typing.get_args(hint)
    if typing.get_origin(hint) is tuple and isinstance(value, list):
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(item, args[0], f"{where}[{i}]") for i, item in enumerate(value))
        if len(value) == len(args):
            return tuple(_convert(item, arg, f"{where}[{i}]") for i, (item, arg) in enumerate(zip(value, args)))
    raise ValueError(f"{where}: expected {_describe(hint)}, got {value!r}")


def load_lexicon(path: Path | str | None = None) -> Lexicon:
    """Read and check ``lexicon.toml`` (the packaged file unless ``path`` is given).

    Raises ``LexiconError`` naming the file and the problem: never returns empty or partial tables.
    """
    source: Traversable = (
        Path(path) if path is not None else resources.files("dischargesum.data").joinpath("lexicon.toml")
    )
    try:
        raw = tomllib.loads(source.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise LexiconError(
            f"{source}: lexicon file not found; restore it (the package ships it as dischargesum/data/lexicon.toml)"
        ) from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise LexiconError(f"{source}: not valid TOML ({exc}); fix the syntax at that line") from exc
    hints = typing.get_type_hints(Lexicon)
    unknown, missing = sorted(set(raw) - set(hints)), sorted(set(hints) - set(raw))
    if unknown or missing:
        raise LexiconError(
            f"{source}: unknown tables {unknown}, missing tables {missing}; the tables are the fields of "
            "dischargesum.data.lexicon.Lexicon (a new table needs a field there)"
        )
    tables: dict[str, tuple[Any, ...]] = {}
    for name, hint in hints.items():
        entries = raw[name]
        if not isinstance(entries, list):
            raise LexiconError(f"{source}: {name} must be an array [...] of entries, got {entries!r}")
        converted = []
        for i, entry in enumerate(entries):
            try:
                converted.append(_convert(entry, typing.get_args(hint)[0], f"{name}[{i}]"))
            except (ValueError, TypeError) as exc:
                raise LexiconError(
                    f"{source}: {exc} (entry {entry!r}); write it in the shape the table's comment and the file "
                    "header give"
                ) from exc
        tables[name] = tuple(converted)
    return Lexicon(**tables)


_LEXICON = load_lexicon()

MEDICATIONS: tuple[Medication, ...] = _LEXICON.medications
LABS: tuple[Lab, ...] = _LEXICON.labs
VITALS: tuple[Vital, ...] = _LEXICON.vitals
# Diagnoses and problems: (canonical name, abbreviations seen in notes).
DIAGNOSES: tuple[tuple[str, tuple[str, ...]], ...] = _LEXICON.diagnoses
# Procedures: (canonical name, abbreviations seen in notes).
PROCEDURES: tuple[tuple[str, tuple[str, ...]], ...] = _LEXICON.procedures
NEGATION_CUES: tuple[str, ...] = _LEXICON.negation_cues
# In the order MIMIC-IV discharge notes use (the synthetic generator writes sections in this order).
SECTION_HEADERS: tuple[str, ...] = _LEXICON.section_headers

# Extractor-only vocabulary (used by ``dischargesum.evaluation.entities``): see the banners in lexicon.toml.
MEDICATION_ALIASES: tuple[tuple[str, str], ...] = _LEXICON.medication_aliases
EXTRA_MEDICATIONS: tuple[tuple[str, tuple[str, ...]], ...] = _LEXICON.extra_medications
LAB_ALIASES: tuple[tuple[str, str], ...] = _LEXICON.lab_aliases
EXTRA_LABS: tuple[tuple[str, tuple[str, ...], str], ...] = _LEXICON.extra_labs
VITAL_ALIASES: tuple[tuple[str, str], ...] = _LEXICON.vital_aliases
DIAGNOSIS_ALIASES: tuple[tuple[str, str], ...] = _LEXICON.diagnosis_aliases
EXTRA_DIAGNOSES: tuple[tuple[str, tuple[str, ...]], ...] = _LEXICON.extra_diagnoses
PROCEDURE_ALIASES: tuple[tuple[str, str], ...] = _LEXICON.procedure_aliases
EXTRA_PROCEDURES: tuple[tuple[str, tuple[str, ...]], ...] = _LEXICON.extra_procedures
SHORTHAND_MEDICATIONS: tuple[tuple[str, tuple[str, ...]], ...] = _LEXICON.shorthand_medications
SHORTHAND_LABS: tuple[tuple[str, tuple[str, ...], str], ...] = _LEXICON.shorthand_labs
SHORTHAND_VITALS: tuple[tuple[str, str], ...] = _LEXICON.shorthand_vitals
SHORTHAND_DIAGNOSES: tuple[tuple[str, tuple[str, ...]], ...] = _LEXICON.shorthand_diagnoses
SHORTHAND_PROCEDURES: tuple[tuple[str, tuple[str, ...]], ...] = _LEXICON.shorthand_procedures
SYMPTOMS_AND_FINDINGS: tuple[str, ...] = _LEXICON.symptoms_and_findings
FINDING_HEADS: tuple[str, ...] = _LEXICON.finding_heads
PROCEDURE_HEADS: tuple[str, ...] = _LEXICON.procedure_heads
