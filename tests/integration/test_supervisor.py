"""scripts/launch.py (the supervisor) with stand-in launchers: the cases real accelerate here cannot show.

The launcher command is replaced (``DISCHARGESUM_LAUNCH``) by a fake that, like accelerate's single-process
launcher, reports its child's failure as 1. Its child is a fake training process that speaks the real protocol
(:mod:`dischargesum.training.preemption`: registers, records its exit) and "commits a checkpoint" (sleeps) when
signalled. Seconds per test, no torch. The real launcher and trainer are in test_preemption_launch.py and
tests/distributed/test_preemption_launch_ddp.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dischargesum.training.supervisor import DEFAULT_GRACE_SECONDS, UsageError, decide_exit_code, parse_args
from tests.helpers import ROOT, subprocess_env

pytestmark = pytest.mark.integration

FAKE_LAUNCHER = """\
import subprocess, sys
sys.exit(1 if subprocess.call([sys.executable, *sys.argv[1:]]) else 0)  # default SIGTERM disposition: dies at once
"""

# argv: record_dir mode; mode: "commit" (on SIGTERM: 1.5 s of "saving", exit 143), "hang" (ignores SIGTERM),
# "crash" (exits 1 on its own after 0.5 s), "late" (registers only after 1 s).
FAKE_TRAINER = """\
import os, signal, sys, time
rec, mode = sys.argv[1], sys.argv[2]
if mode == "late":
    time.sleep(1.0)
from dischargesum.training import preemption as p
p.install_preemption_handlers()
if mode == "hang":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
open(os.path.join(rec, f"ready-{os.getpid()}"), "w").close()
deadline = time.time() + 30
while not p.preemption_requested() and time.time() < deadline:
    time.sleep(0.02)
    if mode == "crash" and time.time() > deadline - 29.5:
        p.record_exit(1)
        sys.exit(1)
if mode == "hang":
    time.sleep(60)
time.sleep(1.5)  # commit a checkpoint
open(os.path.join(rec, "committed"), "w").close()
p.set_preemption_outcome("committed checkpoint-7")
p.record_exit(143)
sys.exit(143)
"""


@pytest.fixture
def fakes(tmp_path: Path) -> dict:
    rec = tmp_path / "rec"
    rec.mkdir()
    (tmp_path / "launcher.py").write_text(FAKE_LAUNCHER)
    (tmp_path / "trainer.py").write_text(FAKE_TRAINER)
    return {"rec": rec, "tmp": tmp_path}


def start(fakes: dict, mode: str, grace: float = 10.0, wrapper: list[str] | None = None) -> subprocess.Popen:
    tmp = fakes["tmp"]
    env = subprocess_env(DISCHARGESUM_LAUNCH=f"{sys.executable} {tmp / 'launcher.py'}")
    cmd = [*(wrapper or []), sys.executable, str(ROOT / "scripts" / "launch.py"), "--grace_seconds", str(grace)]
    cmd += [str(tmp / "trainer.py"), str(fakes["rec"]), mode]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_ready(fakes: dict, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 30
    while not list(fakes["rec"].glob("ready-*")):
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, "the fake training process never started"
        time.sleep(0.02)


def supervisor_pid(proc: subprocess.Popen) -> int:
    """The supervisor's pid: ``proc`` itself, or its child when ``proc`` is the ``unshare`` wrapper."""
    import psutil

    for child in psutil.Process(proc.pid).children(recursive=True):
        if "launch.py" in " ".join(child.cmdline()):
            return child.pid
    return proc.pid


def test_parse_args_and_the_grace_period_knob(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DISCHARGESUM_GRACE_SECONDS", raising=False)
    assert parse_args(["--config_file", "c.yaml", "s.py"]) == (
        DEFAULT_GRACE_SECONDS,
        ["--config_file", "c.yaml", "s.py"],
    )
    assert parse_args(["--grace_seconds", "7.5", "s.py", "--grace_seconds", "1"])[0] == 7.5
    assert parse_args(["--grace_seconds=3", "s.py"]) == (3.0, ["s.py"])
    monkeypatch.setenv("DISCHARGESUM_GRACE_SECONDS", "12")
    assert parse_args(["s.py"])[0] == 12.0
    for bad in (
        ["--grace_seconds", "soon", "s.py"],
        ["--grace_seconds", "0", "s.py"],
        ["--grace_seconds", "nan", "s.py"],
    ):
        with pytest.raises(UsageError, match="grace_seconds"):
            parse_args(bad)
    with pytest.raises(UsageError, match="nothing to launch"):
        parse_args(["--grace_seconds", "3"])


def test_exit_code_rule() -> None:
    preempted = {1: {"exit_code": 143}, 2: {"exit_code": 143}}
    assert decide_exit_code(0, True, [1], {}) == 0  # finished despite a late signal: done, do not requeue
    assert decide_exit_code(1, True, [1, 2], {1: {"exit_code": 1}}) == 143  # signalled: kills are expected
    assert decide_exit_code(1, False, [1, 2], preempted) == 143  # SIGTERM to a training process
    assert decide_exit_code(1, False, [1, 2], {1: {"exit_code": 143}, 2: {"exit_code": 1}}) == 1  # a crash
    assert decide_exit_code(1, False, [1, 2, 3], preempted) == 1  # one vanished without a record: not clean
    assert decide_exit_code(2, False, [], {}) == 2


def test_launcher_that_dies_the_supervisor_adopts_and_waits_for_the_commit(fakes: dict) -> None:
    import psutil

    proc = start(fakes, "commit")
    wait_ready(fakes, proc)
    # The launcher dies (accelerate < 1.1x on SIGTERM, the OOM killer, ...): its training process is adopted.
    launcher = [c for c in psutil.Process(proc.pid).children() if "launcher.py" in " ".join(c.cmdline())]
    assert len(launcher) == 1
    launcher[0].kill()
    launcher[0].wait(10)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 143, out
    assert (fakes["rec"] / "committed").exists(), out  # it did not exit before the training process had committed
    assert "preempted: committed checkpoint-7" in out


def test_container_pid_1(fakes: dict) -> None:
    # PID 1 of a PID namespace, as in a container: when it exits, the kernel kills every other process in it, so
    # a supervisor that returned before the commit would lose the checkpoint.
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot create a PID namespace here: {probe.stderr.decode()[-200:]}")
    proc = start(fakes, "commit", wrapper=["unshare", "--pid", "--fork", "--mount-proc"])
    wait_ready(fakes, proc)
    os.kill(supervisor_pid(proc), signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 143, out
    assert (fakes["rec"] / "committed").exists(), out


def test_signal_before_the_training_process_registered(fakes: dict) -> None:
    proc = start(fakes, "late")
    assert proc.stdout is not None
    first = proc.stdout.readline()  # the supervisor's handlers are installed and the launcher started
    assert "running:" in first, first
    assert not list(fakes["rec"].glob("ready-*"))
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 143, out


def test_grace_period_over_kills_and_still_exits_143(fakes: dict) -> None:
    proc = start(fakes, "hang", grace=1.5)
    wait_ready(fakes, proc)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 143, out
    assert time.monotonic() - t0 < 6, out
    assert "grace period of 1.5 s over: SIGKILL" in out
    assert not (fakes["rec"] / "committed").exists()


def test_sigterm_to_the_training_process_alone_gives_143(fakes: dict) -> None:
    proc = start(fakes, "commit")
    wait_ready(fakes, proc)
    pid = int(next(fakes["rec"].glob("ready-*")).name.split("-")[1])
    os.kill(pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 143, out  # the fake launcher reports 1 (and is not even waited for)
    assert "training processes [143]); exiting 143" in out


def test_a_crash_is_not_reported_as_a_preemption(fakes: dict) -> None:
    proc = start(fakes, "crash")
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 1, out
    assert "launcher exited 1; exiting 1" in out
