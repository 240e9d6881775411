"""TEST-ONLY fault injection for the checkpoint save path and the preemption tests. Never set these outside tests.

The kill-mid-save and signal tests launch the real ``sft_qlora`` entry point in subprocesses, so the crash and pause
points must live in the package; they are kept here, in one module, and reach the training code only through
hooks that are absent unless a variable below is set: :func:`save_fault_injector` (None otherwise) feeds the save
path, whose store (:func:`~dischargesum.training.checkpoint_store.commit_checkpoint`, ``rotate_checkpoints``) only
calls an ``on_event`` callable it is handed; :func:`evaluation_pause_callback` (None otherwise) is a Trainer
callback; ``sft_qlora`` calls :func:`fault_pause` ``("load")`` once, a no-op without the variable.

* ``DISCHARGESUM_FAULT_AFTER_FILE=N`` SIGKILLs the committing process at the N-th event of a checkpoint save (each
  file appearing in the staging directory, then ``manifest``, ``commit`` and each rotation deletion), in the save at
  step ``DISCHARGESUM_FAULT_AT_STEP`` (default: the first save of the process).
* ``DISCHARGESUM_FAULT_TRACE=FILE`` appends that save's events to FILE.
* ``DISCHARGESUM_FAULT_PAUSE=PHASE`` sleeps ``DISCHARGESUM_FAULT_PAUSE_SECONDS`` (default 3) once, in ``load``
  (sft_qlora, before the model is loaded), ``save`` (after the first file of that save) or ``evaluate`` (at the
  first prediction step), and appends ``pause:PHASE`` to the trace first: the signal tests use it to land a signal
  inside that phase.

Tests: tests/integration/test_fault_tolerance.py, tests/distributed/test_fault_tolerance_ddp.py,
tests/preemption_scenarios.py.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

from dischargesum.logging_utils import get_logger, process_rank

logger = get_logger(__name__)

FAULT_AFTER_FILE_ENV = "DISCHARGESUM_FAULT_AFTER_FILE"
FAULT_AT_STEP_ENV = "DISCHARGESUM_FAULT_AT_STEP"
FAULT_TRACE_ENV = "DISCHARGESUM_FAULT_TRACE"
FAULT_PAUSE_ENV = "DISCHARGESUM_FAULT_PAUSE"
FAULT_PAUSE_SECONDS_ENV = "DISCHARGESUM_FAULT_PAUSE_SECONDS"
_FAULT_ENVS = (FAULT_AFTER_FILE_ENV, FAULT_AT_STEP_ENV, FAULT_TRACE_ENV, FAULT_PAUSE_ENV)

_paused_phases: set[str] = set()


def fault_pause(phase: str) -> None:
    """Test-only: sleep once in ``phase`` when ``DISCHARGESUM_FAULT_PAUSE`` names it (see the module docstring)."""
    if os.environ.get(FAULT_PAUSE_ENV, "") != phase or phase in _paused_phases:
        return
    _paused_phases.add(phase)
    seconds = float(os.environ.get(FAULT_PAUSE_SECONDS_ENV, "") or 3)
    trace = os.environ.get(FAULT_TRACE_ENV, "")
    if trace:
        with open(trace, "a", encoding="utf-8") as fh:
            fh.write(f"pause:{phase}\trank{process_rank()}\n")
    logger.warning("fault injection: pausing %.1f s in %s", seconds, phase)
    time.sleep(seconds)  # a signal runs its handler and the sleep goes on (PEP 475): the pause keeps its length


class SaveFaultInjector:
    """Crash / trace / pause points of one checkpoint save (see the module docstring).

    Made by :func:`save_fault_injector`; the save path calls :meth:`files_appeared` after each writer and hands
    :meth:`event` to the store.
    """

    _saves_seen = 0

    def __init__(self, step: int) -> None:
        raw = os.environ.get(FAULT_AFTER_FILE_ENV, "")
        at_step = os.environ.get(FAULT_AT_STEP_ENV, "")
        SaveFaultInjector._saves_seen += 1
        armed = int(at_step) == step if at_step else SaveFaultInjector._saves_seen == 1
        self.trace = os.environ.get(FAULT_TRACE_ENV, "") if armed else ""
        self.crash_at = int(raw) if raw and armed else 0
        self.pause = armed and os.environ.get(FAULT_PAUSE_ENV, "") == "save"
        self.events = 0
        self.seen: set[str] = set()

    @property
    def active(self) -> bool:
        return bool(self.crash_at or self.trace or self.pause)

    def event(self, name: str) -> None:
        if not self.active:
            return
        self.events += 1
        if self.trace:
            with open(self.trace, "a", encoding="utf-8") as fh:
                fh.write(f"{self.events}\t{name}\n")
        if self.crash_at and self.events >= self.crash_at:
            logger.warning("fault injection: SIGKILL after save event %d (%s)", self.events, name)
            os.kill(os.getpid(), signal.SIGKILL)
        if self.pause:
            fault_pause("save")

    def files_appeared(self, staging: Path) -> None:
        if not self.active or not staging.is_dir():
            return
        for f in sorted(p for p in staging.rglob("*") if p.is_file()):
            rel = f.relative_to(staging).as_posix()
            if rel not in self.seen:
                self.seen.add(rel)
                self.event(f"write:{rel}")


def save_fault_injector(step: int) -> SaveFaultInjector | None:
    """The injector for the save at ``step`` on the committing process; None (no hooks at all) unless a
    ``DISCHARGESUM_FAULT_*`` variable is set."""
    if not any(os.environ.get(name) for name in _FAULT_ENVS):
        return None
    return SaveFaultInjector(step)


def evaluation_pause_callback() -> Any:
    """A Trainer callback that runs :func:`fault_pause` ``("evaluate")`` at each prediction step, or None unless
    ``DISCHARGESUM_FAULT_PAUSE=evaluate``."""
    if os.environ.get(FAULT_PAUSE_ENV, "") != "evaluate":
        return None
    from transformers.trainer_callback import TrainerCallback

    class EvaluationPause(TrainerCallback):
        def on_prediction_step(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            fault_pause("evaluate")
            return control

    return EvaluationPause()
