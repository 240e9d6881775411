"""Preemption: turn SIGTERM / SIGUSR1 into "commit a checkpoint at the next step boundary, then exit 143".

Spot VMs, Kubernetes and SLURM give a process a warning signal (SIGTERM; SLURM can send SIGUSR1 ahead of time
with ``--signal``) and SIGKILL it some seconds later (torchrun waits 30 s). The handler only sets a flag — it never
raises, so a signal that lands while a checkpoint is being written (or a second signal) cannot interrupt the
write. The training loop polls the flag at every optimizer-step boundary and in evaluation loops, agreeing across
ranks with an all-reduce MAX: a signal that reaches only one rank (or reaches ranks at different steps) still stops
every rank at the same step, so the checkpoint they write together is consistent.

The flag is process-global on purpose: a signal handler has nowhere else to put it, and the entry point reads it
after ``trainer.train()`` returns to choose the exit code (:data:`PREEMPTED_EXIT_CODE`).

From process start, not from the first step: ``scripts/sft_qlora.py`` installs the handlers as the first thing its
``main`` does, so a signal during imports or model/data loading (which can take minutes for a 4B model) is recorded
instead of killing the process. Loading is not interrupted mid-way (a half-loaded model is useless, and a rank that
left alone would strand the others in a collective); :func:`stop_if_preempted` runs between the loading stages, the
ranks agree there too, and they all leave with :class:`PreemptedBeforeTraining`: "nothing to save yet", exit 143.

Under the supervisor (:mod:`dischargesum.training.supervisor`, ``scripts/launch.py``) each training process
registers in the directory named by ``DISCHARGESUM_LAUNCH_DIR`` (so the supervisor can forward a signal to it, not
only to accelerate's launcher), picks up a stop the supervisor requested before it registered, and records its exit
code and outcome there on exit (the launcher itself reports any non-zero child as 1).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

from dischargesum.cli import EXIT_PREEMPTED
from dischargesum.logging_utils import get_logger, process_rank

logger = get_logger(__name__)

# 128 + SIGTERM: what a shell reports for a process killed by SIGTERM, and what schedulers (SLURM --requeue
# scripts, Kubernetes restart policies) treat as "preempted, run me again".
PREEMPTED_EXIT_CODE = EXIT_PREEMPTED

PREEMPTION_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGUSR1)

# The supervisor <-> training process protocol: a directory (one per supervised launch) holding
# trainer-<pid>.json (written when the handlers are installed), exit-<pid>.json (written on exit) and STOP_FILE
# (written by the supervisor when it was signalled, for processes that had not registered yet).
LAUNCH_DIR_ENV = "DISCHARGESUM_LAUNCH_DIR"
STOP_FILE = "stop"
TRAINER_FILE_PREFIX = "trainer-"
EXIT_FILE_PREFIX = "exit-"

# signal: the first signal this process received (signal_at: when, time.time()); agreed: a collective check found
# the flag set on some rank (so a rank that got no signal itself still reports the run as preempted and exits 143
# with the others); outcome: what the preempted run left ("committed <checkpoint>" / "nothing to save yet").
_state: dict[str, Any] = {
    "signal": None,
    "signal_at": None,
    "count": 0,
    "installed": False,
    "agreed": False,
    "outcome": None,
}
_install_lock = threading.Lock()


class PreemptedBeforeTraining(Exception):
    """The ranks agreed on a preemption before the first training step: nothing to save yet (exit 143)."""

    def __init__(self, stage: str) -> None:
        super().__init__(f"preempted during loading ({stage}): nothing to save yet")
        self.stage = stage


def _handler(signum: int, frame: FrameType | None) -> None:
    # Set the flag and count, nothing else (no logging, no raising, no I/O): a second signal only increments the
    # count, and the save or load that is in progress finishes untouched.
    if _state["signal"] is None:
        _state["signal"] = signum
        _state["signal_at"] = time.time()
    _state["count"] += 1


def install_preemption_handlers() -> bool:
    """Install the flag-setting handlers for SIGTERM and SIGUSR1 (once per process; later calls do nothing).

    Returns whether handlers are installed (False off the main thread, where Python cannot install them).
    """
    with _install_lock:
        if _state["installed"]:
            return True
        if threading.current_thread() is not threading.main_thread():
            logger.warning("preemption handlers not installed: not on the main thread (signals would be ignored)")
            return False
        for sig in PREEMPTION_SIGNALS:
            signal.signal(sig, _handler)
        # The supervisor starts the launcher with these signals blocked (the mask is inherited): take them here;
        # one that arrived while they were blocked is delivered now, to the handler above.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, PREEMPTION_SIGNALS)
        _state["installed"] = True
    _register_with_supervisor()
    return True


def _launch_dir() -> Path | None:
    value = os.environ.get(LAUNCH_DIR_ENV, "")
    return Path(value) if value and Path(value).is_dir() else None


def _register_with_supervisor() -> None:
    # Register first, then look for the stop file: the supervisor writes the stop file first, then reads the
    # registrations, so a stop requested at any moment reaches this process one way or the other.
    launch_dir = _launch_dir()
    if launch_dir is None:
        return
    record = {"pid": os.getpid(), "rank": process_rank(), "registered_at": time.time()}
    _write_json(launch_dir / f"{TRAINER_FILE_PREFIX}{os.getpid()}.json", record)
    if (launch_dir / STOP_FILE).exists():
        _handler(signal.SIGTERM, None)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data), encoding="utf-8")
    os.replace(tmp, path)


def set_preemption_outcome(outcome: str) -> None:
    """What a preempted run left behind, for the exit record (``committed <checkpoint>`` / ``nothing to save yet``)."""
    _state["outcome"] = outcome


def record_exit(exit_code: int) -> None:
    """Write this process's exit record for the supervisor (no-op when not supervised).

    The supervisor decides its own exit code from these records: accelerate's launcher (and torchrun) report a
    child's 143 as a failure (exit 1), so the records are the only place the "preempted, committed" fact survives.
    """
    launch_dir = _launch_dir()
    if launch_dir is None:
        return
    record = {
        "pid": os.getpid(),
        "rank": process_rank(),
        "exit_code": int(exit_code),
        "preempted": preemption_requested(),
        "signal": preemption_signal_name(),
        "signal_at": _state["signal_at"],
        "outcome": _state["outcome"],
    }
    try:
        _write_json(launch_dir / f"{EXIT_FILE_PREFIX}{os.getpid()}.json", record)
    except OSError as exc:  # the supervisor then treats this process as failed: never hide that
        logger.warning("could not write the exit record into %s: %s", launch_dir, exc)


def exit_preempted() -> None:
    """End a preempted process now with :data:`PREEMPTED_EXIT_CODE`, without the interpreter's teardown.

    Why: tearing down torch, transformers, datasets and DeepSpeed took 2-10 s per process on a loaded CPU (measured
    here), time taken from the grace period for nothing — the checkpoint, the manifests and the exit record are
    already written and fsynced, and the TensorBoard writer was closed at the end of training.
    """
    import contextlib
    import logging
    import sys

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(PREEMPTED_EXIT_CODE)


def stop_if_preempted(stage: str) -> None:
    """Between loading stages: leave with :class:`PreemptedBeforeTraining` when any rank was signalled.

    Collective once the process group exists (every rank must call it at the same stages, which the loading code
    guarantees); a local check before.

    Raises:
        PreemptedBeforeTraining: a preemption signal reached this or another rank.
    """
    if agree_across_ranks(preemption_requested()):
        raise PreemptedBeforeTraining(stage)


def preemption_requested() -> bool:
    """True once this process received SIGTERM or SIGUSR1, or the ranks agreed that one of them did.

    The entry point checks it after ``trainer.train()`` returns: True means the run stopped early for preemption
    (a checkpoint was committed) and the process should exit with :data:`PREEMPTED_EXIT_CODE`.
    """
    return _state["signal"] is not None or bool(_state["agreed"])


def preemption_signal_name() -> str | None:
    sig = _state["signal"]
    return None if sig is None else signal.Signals(sig).name


def signals_received() -> int:
    return int(_state["count"])


def request_preemption(signum: int = signal.SIGTERM) -> None:
    """Set the flag as if ``signum`` had arrived (used by tests and by code that wants a clean stop)."""
    _handler(signum, None)


def reset_preemption_state() -> None:
    """Clear the flag (tests only; a real process never un-preempts)."""
    _state["signal"] = None
    _state["signal_at"] = None
    _state["count"] = 0
    _state["agreed"] = False
    _state["outcome"] = None


def agree_across_ranks(local_flag: bool) -> bool:
    """All-reduce MAX of ``local_flag`` over the default process group; the local value when not distributed.

    Collective: every rank must call it at the same point (the trainer's step end / prediction step), which the
    callbacks guarantee. The tensor lives on the device the backend needs (CUDA for NCCL, CPU for gloo).
    """
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        if local_flag:
            _state["agreed"] = True
        return local_flag
    backend = str(dist.get_backend()).lower()
    if "nccl" in backend and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    flag = torch.tensor([1 if local_flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    agreed = bool(flag.item())
    if agreed:
        _state["agreed"] = True
    return agreed
