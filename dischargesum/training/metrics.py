"""``metrics.jsonl``: the per-step numbers of a training run, one JSON object per line (TensorBoard has the same).

Rows (see :mod:`dischargesum.training.sft` for the fields): one per logging step, one per evaluation, one per
optimizer step with its ``note_ids`` when ``log_note_ids`` is on, and one final summary row. On resume from step N,
rows past N (written by the interrupted run after its last checkpoint) are dropped first, so each step appears once
and the totals (tokens, seconds) continue from the checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dischargesum.artifacts import TRAIN_METRICS_FILE as METRICS_FILE
from dischargesum.logging_utils import is_main_process
from dischargesum.manifest import atomic_write_text


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a ``metrics.jsonl`` file (or of ``<dir>/metrics.jsonl``); a torn last line from a kill is skipped."""
    p = Path(path)
    if p.is_dir():
        p = p / METRICS_FILE
    if not p.is_file():
        return []
    rows = []
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def train_loss_by_step(path: str | Path) -> dict[int, float]:
    """``{step: loss}`` of the training log rows."""
    return {int(r["step"]): float(r["loss"]) for r in read_metrics(path) if "loss" in r}


def note_ids_by_step(path: str | Path) -> dict[int, list[str]]:
    """``{step: [note_id, ...]}`` of the ``log_note_ids`` rows."""
    return {int(r["step"]): list(r["note_ids"]) for r in read_metrics(path) if "note_ids" in r}


class MetricsLog:
    """Appends rows to ``metrics.jsonl`` on the main process; trims rows past ``resume_step`` when opened."""

    def __init__(self, path: Path, *, resume_step: int) -> None:
        self.path = path
        self.enabled = is_main_process()
        # Totals of the kept rows, so a resumed run's cumulative numbers continue instead of restarting at 0.
        self.prior_tokens = 0
        self.prior_seconds = 0.0
        if not self.enabled:
            return
        rows = read_metrics(path)
        kept = [r for r in rows if int(r.get("step", 0)) <= resume_step and "train_runtime" not in r]
        if len(kept) != len(rows) or (path.is_file() and not rows):
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
        self.prior_tokens = sum(int(r.get("tokens", 0)) for r in kept)
        self.prior_seconds = sum(float(r.get("window_seconds", 0.0)) for r in kept)

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row, default=float) + "\n")
            fh.flush()
