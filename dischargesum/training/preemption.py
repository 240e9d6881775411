"""Preemption: turn SIGTERM / SIGUSR1 into "commit a checkpoint at the next step boundary, then exit 143".

Spot VMs, Kubernetes and SLURM give a process a warning signal (SIGTERM; SLURM can send SIGUSR1 ahead of time
with ``--signal``) and SIGKILL it some seconds later (torchrun waits 30 s). The handler only sets a flag — it never
raises, so a signal that lands while a checkpoint is being written (or a second signal) cannot interrupt the
write. The training loop polls the flag at every optimizer-step boundary and in evaluation loops, agreeing across
ranks with an all-reduce MAX: a signal that reaches only one rank (or reaches ranks at different steps) still stops
every rank at the same step, so the checkpoint they write together is consistent.

The flag is process-global on purpose: a signal handler has nowhere else to put it, and the entry point reads it
after ``trainer.train()`` returns to choose the exit code (:data:`PREEMPTED_EXIT_CODE`).
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

from dischargesum.cli import EXIT_PREEMPTED
from dischargesum.logging_utils import get_logger

logger = get_logger(__name__)

# 128 + SIGTERM: what a shell reports for a process killed by SIGTERM, and what schedulers (SLURM --requeue
# scripts, Kubernetes restart policies) treat as "preempted, run me again".
PREEMPTED_EXIT_CODE = EXIT_PREEMPTED

PREEMPTION_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGUSR1)

# signal: the first signal this process received; agreed: a collective check found the flag set on some rank (so a
# rank that got no signal itself still reports the run as preempted and exits 143 with the others).
_state: dict[str, Any] = {"signal": None, "count": 0, "installed": False, "agreed": False}
_install_lock = threading.Lock()


def _handler(signum: int, frame: FrameType | None) -> None:
    # Async-signal context: set the flag and count, nothing else (no logging, no raising). A second signal
    # only increments the count; the save that is in progress finishes untouched.
    if _state["signal"] is None:
        _state["signal"] = signum
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
        _state["installed"] = True
    return True


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
    _state["count"] = 0
    _state["agreed"] = False


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
