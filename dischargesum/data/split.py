"""Patient-level splits: a note's split depends only on its ``subject_id`` and the seed.

Each patient is placed by a keyed hash — ``u = sha256(f"{seed}:{subject_id}")`` read as a number in [0, 1) —
into ``test`` (``u < test_fraction``), ``validation`` (``u < test_fraction + validation_fraction``) or ``train``.
So every note of a patient lands in the same split, adding rows never moves an existing patient, and the split
needs no global state (it streams). The realised fractions of *rows* vary with patients' note counts; the data
card records them.

Inputs that are already split (``input_split_column``) keep their assignment after :class:`SplitTracker` has
checked that no patient appears in two splits.
"""

from __future__ import annotations

import hashlib
from collections import Counter

from dischargesum.data.schema import SPLITS

_INPUT_SPLIT_NAMES = {
    "train": "train",
    "training": "train",
    "validation": "validation",
    "valid": "validation",
    "val": "validation",
    "dev": "validation",
    "test": "test",
    "testing": "test",
}


def patient_unit_interval(subject_id: str, seed: int) -> float:
    """A number in [0, 1) fixed by (seed, subject_id): the first 8 bytes of a sha256, scaled."""
    digest = hashlib.sha256(f"{seed}:{subject_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def assign_split(subject_id: str, *, seed: int, validation_fraction: float, test_fraction: float) -> str:
    """``train`` / ``validation`` / ``test`` for one patient."""
    u = patient_unit_interval(subject_id, seed)
    if u < test_fraction:
        return "test"
    if u < test_fraction + validation_fraction:
        return "validation"
    return "train"


def normalise_input_split(value: object) -> str | None:
    """Map a pre-split input's label (train/val/dev/test, any case) to our split name; None if unknown."""
    if not isinstance(value, str):
        return None
    return _INPUT_SPLIT_NAMES.get(value.strip().lower())


class SplitTracker:
    """Records which splits each patient's rows went to, to prove no patient crosses splits."""

    def __init__(self) -> None:
        self._first: dict[str, str] = {}
        self._crossing: dict[str, set[str]] = {}
        self.rows: Counter[str] = Counter()

    def add(self, subject_id: str, split: str) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}")
        self.rows[split] += 1
        first = self._first.setdefault(subject_id, split)
        if first != split:
            self._crossing.setdefault(subject_id, {first}).add(split)

    @property
    def crossing_patients(self) -> int:
        """Patients with rows in more than one split."""
        return len(self._crossing)

    def patients_per_split(self) -> dict[str, int]:
        """Distinct patients with at least one row in each split (a crossing patient counts in each of its splits)."""
        counts: Counter[str] = Counter(self._first.values())
        for subject_id, splits in self._crossing.items():
            for split in splits - {self._first[subject_id]}:
                counts[split] += 1
        return {split: counts.get(split, 0) for split in SPLITS}

    @property
    def patients(self) -> int:
        return len(self._first)
