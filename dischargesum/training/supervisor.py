"""The preemption-safe outer process: ``accelerate launch`` as a child, signals forwarded, exit 143 when preempted.

Why a process above ``accelerate launch``: the launcher was not written for preemption. Its single-process launcher
reports a child's 143 as a failure (exit 1) and, when SIGTERM reaches the launcher itself, either dies at once
(accelerate < 1.1x) or terminates the training process and SIGKILLs it 5 s later (1.16, ``_run_subprocess``);
torchrun's agent (multi-process) forwards SIGTERM to its workers but also reports their 143 as 1, and SIGKILLs them
after ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT`` (30 s). As a container's PID 1, the container (and every process in it)
ends the moment PID 1 exits, so a launcher that exits before the checkpoint is committed loses it.

What this process does (``scripts/launch.py``, or a container's ``ENTRYPOINT``):

* runs ``python -m accelerate.commands.launch ARGS`` in a new session, so a terminal's Ctrl-C or a ``kill`` of this
  process group reaches only this process, which then decides who is told what, and with SIGTERM / SIGUSR1
  blocked, so that even a signal sent to every process (systemd stopping a VM's services) does not reach the
  launcher's kill-after-a-timeout logic; the training processes unblock them first thing;
* makes itself the child subreaper (Linux; PID 1 is one anyway): training processes whose launcher died are
  re-parented here, and this process exits only after every one of them has;
* the training processes register in a per-launch directory (``DISCHARGESUM_LAUNCH_DIR``, see
  :mod:`dischargesum.training.preemption`); on SIGTERM / SIGINT / SIGHUP / SIGUSR1 it writes the stop file there
  and sends SIGTERM to each registered training process directly (never through the launcher, so no launcher
  timeout applies), then waits up to the grace period for them to commit and exit;
* when the grace period runs out it SIGKILLs what is left (the rerun resumes from the newest *valid* checkpoint, so
  a save cut short costs progress, never correctness) and still exits 143;
* exit code: 0 when the launch succeeded; 143 when it was signalled, or when every training process that recorded
  its exit recorded 143 (a signal sent to a training process directly); otherwise the launcher's own code.

Grace period: ``--grace_seconds`` (before the launcher's arguments) or ``DISCHARGESUM_GRACE_SECONDS``; default 25 s,
which leaves a few seconds of a spot VM's 30 s warning (and of Kubernetes' default 30 s
``terminationGracePeriodSeconds``) for the container to stop. Under torchrun it also becomes the agent's shutdown
timeout, unless ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT`` is set.

No torch import here: this process stays small and starts in milliseconds.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from dischargesum.cli import EXIT_PREEMPTED, EXIT_USER_ERROR
from dischargesum.training.preemption import (
    EXIT_FILE_PREFIX,
    LAUNCH_DIR_ENV,
    PREEMPTION_SIGNALS,
    STOP_FILE,
    TRAINER_FILE_PREFIX,
)

GRACE_ENV = "DISCHARGESUM_GRACE_SECONDS"
# The launcher command (default: this Python's `accelerate launch`); as in scripts/slurm_train.sh, tests replace it.
LAUNCH_COMMAND_ENV = "DISCHARGESUM_LAUNCH"
DEFAULT_GRACE_SECONDS = 25.0
FORWARDED_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)
POLL_SECONDS = 0.05
# Exit codes whose stage already printed the message that matters last (user error, non-finite stop, Ctrl-C).
QUIET_EXIT_CODES = (2, 3, 130)
_PR_SET_CHILD_SUBREAPER = 36

USAGE = """\
usage: python scripts/launch.py [--grace_seconds S] ACCELERATE_LAUNCH_ARGS... SCRIPT [SCRIPT_ARGS...]

Runs `accelerate launch ACCELERATE_LAUNCH_ARGS... SCRIPT SCRIPT_ARGS...` preemption-safely: SIGTERM (or SIGINT,
SIGHUP, SIGUSR1) to this process, to a training process or to all of them commits a checkpoint (or stops before
the first step with nothing to save yet) and this process exits 143 within the grace period. Use it as a
container's entry point:

  ENTRYPOINT ["python", "scripts/launch.py"]
  CMD ["--config_file", "accelerate_configs/single_gpu.yaml", "scripts/sft_qlora.py",
       "--config", "recipes/medgemma-4b/sft_qlora.yaml", "--output_dir", "/runs/medgemma"]

options:
  --grace_seconds S  seconds between the first signal and SIGKILL of the training processes (default:
                     $DISCHARGESUM_GRACE_SECONDS, else 25; set it a few seconds below what the platform allows)
  -h, --help         show this message

Exit codes: 0 done; 143 preempted (checkpoint committed, or nothing to save yet): rerun the same command to resume;
2 a bad option here; anything else: the launcher's exit code.
"""


class UsageError(ValueError):
    """A bad option of the supervisor itself (exit 2)."""


def parse_args(argv: Sequence[str]) -> tuple[float, list[str]]:
    """``(grace_seconds, launcher_args)``: the supervisor's own leading options, then everything else.

    Raises:
        UsageError: a bad ``--grace_seconds`` / ``DISCHARGESUM_GRACE_SECONDS`` value, or nothing to launch.
    """
    args = list(argv)
    raw = os.environ.get(GRACE_ENV, "")
    source = GRACE_ENV
    while args and args[0].startswith("--grace_seconds"):
        flag = args.pop(0)
        if "=" in flag:
            raw = flag.split("=", 1)[1]
        elif args:
            raw = args.pop(0)
        else:
            raise UsageError("`--grace_seconds` needs a value (seconds), e.g. `--grace_seconds 25`.")
        source = "--grace_seconds"
    try:
        grace = float(raw) if raw else DEFAULT_GRACE_SECONDS
    except ValueError:
        raise UsageError(f"`{source}` = {raw!r} is not a number of seconds; use e.g. 25.") from None
    if not grace > 0 or grace != grace or grace == float("inf"):
        raise UsageError(f"`{source}` = {raw!r} must be a positive finite number of seconds, e.g. 25.")
    if not args:
        raise UsageError("nothing to launch: pass accelerate launch's arguments and the script, see --help.")
    return grace, args


@dataclass
class _Signals:
    """What the handler recorded (it only records; the main loop acts)."""

    first: int | None = None
    first_at: float | None = None
    count: int = 0
    handled: int = 0
    names: list[str] = field(default_factory=list)

    def handler(self, signum: int, frame: FrameType | None) -> None:
        if self.first is None:
            self.first, self.first_at = signum, time.monotonic()
        self.count += 1


def _log(message: str) -> None:
    sys.stderr.write(f"[launch.py {time.strftime('%H:%M:%S')}] {message}\n")
    sys.stderr.flush()


def _become_subreaper() -> bool:
    """Adopt orphaned descendants (a training process whose launcher died), as PID 1 does; Linux only."""
    if os.getpid() == 1:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _reap(launcher_pid: int) -> None:
    """Collect exited adopted children (PID 1 / a subreaper must, or they stay zombies). Never the launcher: its
    status belongs to ``Popen`` (``waitpid(-1)`` would take it, and ``Popen`` would then report 0)."""
    import psutil

    try:
        children = psutil.Process().children()
    except psutil.Error:
        return
    for child in children:
        if child.pid != launcher_pid:
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(child.pid, os.WNOHANG)


def _descendants() -> list[Any]:
    import psutil

    try:
        return [p for p in psutil.Process().children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE]
    except psutil.Error:
        return []


def _read_records(launch_dir: Path, prefix: str) -> dict[int, dict[str, Any]]:
    records: dict[int, dict[str, Any]] = {}
    for path in launch_dir.glob(f"{prefix}*.json"):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            records[int(data["pid"])] = data
        except (OSError, ValueError, KeyError, TypeError):
            continue  # being written (the writer renames a complete file into place), or not ours
    return records


def _signal_pids(pids: Sequence[int], sig: signal.Signals) -> list[int]:
    sent = []
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)
            sent.append(pid)
    return sent


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _all_preempted_and_gone(run_dir: Path, registered: Sequence[int]) -> bool:
    if not registered:
        return False
    exits = _read_records(run_dir, EXIT_FILE_PREFIX)
    return all(exits.get(pid, {}).get("exit_code") == EXIT_PREEMPTED and not _alive(pid) for pid in registered)


def decide_exit_code(
    launcher_code: int, signalled: bool, registered: Sequence[int], exits: dict[int, dict[str, Any]]
) -> int:
    """The supervisor's exit code (see the module docstring).

    A training process that registered but left no exit record crashed hard or was killed: then only a signal to
    this process (after which kills are expected) makes the run a preemption.
    """
    if launcher_code == 0:
        return 0
    if signalled:
        return EXIT_PREEMPTED
    if exits and all(r.get("exit_code") == EXIT_PREEMPTED for r in exits.values()) and set(registered) <= set(exits):
        return EXIT_PREEMPTED
    return launcher_code if launcher_code > 0 else 1


def supervise(launcher_args: Sequence[str], grace_seconds: float, *, launch_dir: Path | None = None) -> int:
    """Run ``accelerate launch launcher_args`` under the protocol above; return this process's exit code."""
    own_dir = launch_dir is None
    run_dir = Path(tempfile.mkdtemp(prefix="dischargesum-launch-")) if launch_dir is None else launch_dir
    signals = _Signals()
    previous = {sig: signal.signal(sig, signals.handler) for sig in FORWARDED_SIGNALS}
    subreaper = _become_subreaper()
    env = dict(os.environ)
    env[LAUNCH_DIR_ENV] = str(run_dir)
    # torchrun's agent SIGKILLs its workers this long after it is signalled itself (as when every process of the
    # job gets SIGTERM): not before our own deadline.
    env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(max(1, int(grace_seconds))))
    launch = os.environ.get(LAUNCH_COMMAND_ENV, "")
    # dischargesum.launch is accelerate's own launcher with the stage's exit code kept (2 a user error, 3 non-finite
    # loss, 143 preempted) instead of accelerate's 1 + traceback: one launcher chain for scripts/launch.sh and .py.
    cmd = [*(shlex.split(launch) if launch else [sys.executable, "-m", "dischargesum.launch"]), *launcher_args]
    _log(f"grace period {grace_seconds:g} s; running: accelerate launch {' '.join(launcher_args)}")
    try:
        # The launcher starts with the preemption signals blocked (a mask survives fork and exec; Python handlers
        # do not change it): a SIGTERM that reaches every process of the job cannot make accelerate's launcher
        # SIGKILL its child 5 s later, nor torchrun's agent after its shutdown timeout. The training processes
        # unblock them as their first act (install_preemption_handlers); this process forwards the signal to them.
        # Signals that arrive here in between stay pending and are handled right after.
        unblock = signal.pthread_sigmask(signal.SIG_BLOCK, PREEMPTION_SIGNALS)
        try:
            launcher = subprocess.Popen(cmd, env=env, start_new_session=True)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, unblock)
        code = _wait(launcher, run_dir, signals, grace_seconds, subreaper)
    finally:
        for sig, handler in previous.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(sig, handler)
        if own_dir:
            shutil.rmtree(run_dir, ignore_errors=True)
    return code


def _wait(launcher: subprocess.Popen, run_dir: Path, signals: _Signals, grace: float, subreaper: bool) -> int:
    deadline: float | None = None
    told: set[int] = set()
    launcher_stopped = killed = False
    while True:
        if signals.count > signals.handled:
            if signals.handled == 0:
                name = signal.Signals(signals.first or signal.SIGTERM).name
                (run_dir / STOP_FILE).write_text(name, encoding="utf-8")
                deadline = (signals.first_at or time.monotonic()) + grace
                _log(
                    f"received {name}: asking the training processes to commit a checkpoint and exit "
                    f"(grace {grace:g} s)"
                )
            else:
                _log("another signal: already stopping, the checkpoint in progress is not interrupted")
            signals.handled = signals.count
        registered = sorted(_read_records(run_dir, TRAINER_FILE_PREFIX))
        if deadline is not None:
            # Registered after the stop file was read: they saw it, or they get the signal here. Either way, once.
            fresh = [pid for pid in registered if pid not in told and _alive(pid)]
            told.update(fresh)
            _signal_pids(fresh, signal.SIGTERM)
            if not registered and not launcher_stopped:
                # No training process has even installed its handlers (the launcher or they are still importing):
                # there is nothing to save, and the launcher does not take SIGTERM (blocked, above). Stop it all now
                # rather than let it start processes only to stop them.
                launcher_stopped = True
                _log("no training process has started yet: nothing to save yet, stopping the launcher")
                for proc in _descendants():
                    with contextlib.suppress(Exception):
                        proc.kill()
        if subreaper:
            _reap(launcher.pid)
        launcher_done = launcher.poll() is not None
        rest = _descendants() if launcher_done else []
        if launcher_done and not rest:
            break
        if _all_preempted_and_gone(run_dir, registered):
            # Every training process committed (or had nothing to save) and exited 143: what is left is the
            # launcher reporting a failure and tearing itself down (seconds of the grace period). Not needed.
            for proc in _descendants():
                with contextlib.suppress(Exception):
                    proc.kill()
            launcher.wait()
            continue
        if deadline is not None and time.monotonic() >= deadline and not killed:
            victims = _descendants()
            _log(
                f"grace period of {grace:g} s over: SIGKILL to {len(victims)} process(es) still running (the rerun "
                "resumes from the newest valid checkpoint)"
            )
            for proc in victims:
                with contextlib.suppress(Exception):
                    proc.kill()
            killed = True
        time.sleep(POLL_SECONDS)
    exits = _read_records(run_dir, EXIT_FILE_PREFIX)
    registered = sorted(_read_records(run_dir, TRAINER_FILE_PREFIX))
    code = decide_exit_code(int(launcher.returncode), deadline is not None, registered, exits)
    outcomes = sorted({str(r.get("outcome")) for r in exits.values() if r.get("outcome")})
    if code == EXIT_PREEMPTED:
        _log(
            f"preempted: {', '.join(outcomes) or 'nothing to save yet'} (launcher exit {launcher.returncode}, "
            f"training processes {sorted(int(r['exit_code']) for r in exits.values())}); exiting {EXIT_PREEMPTED}: "
            "rerun the same command to resume"
        )
    elif code not in (0, *QUIET_EXIT_CODES):
        _log(f"launcher exited {launcher.returncode}; exiting {code}")
    return code


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        sys.stdout.write(USAGE)
        return 0 if args else EXIT_USER_ERROR
    try:
        grace, launcher_args = parse_args(args)
    except UsageError as exc:
        sys.stderr.write(f"launch.py: error: {exc}\n")
        return EXIT_USER_ERROR
    return supervise(launcher_args, grace)
