"""scripts/slurm_train.sh forwards SIGTERM / SIGUSR1 to the launcher and its training processes — tested without SLURM.

The launch command is replaced (``DISCHARGESUM_LAUNCH``) by a fake launcher that, like accelerate's single-process
launcher, dies on SIGTERM and starts one "training process" which records the signals it gets, "commits a
checkpoint" (sleeps) and exits 143. ``srun`` and ``scontrol`` are stand-ins on PATH that record their calls.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.integration

FAKE_LAUNCHER = """\
import json, os, subprocess, sys
rec = os.environ["FAKE_RECORD_DIR"]
with open(os.path.join(rec, "launcher_argv.json"), "w") as fh:
    json.dump(sys.argv[1:], fh)
child = subprocess.Popen([sys.executable, os.environ["FAKE_WORKER"]])
sys.exit(child.wait())  # default SIGTERM disposition: dies at once, like accelerate's simple launcher
"""

FAKE_WORKER = """\
import os, signal, sys, time
rec = os.environ["FAKE_RECORD_DIR"]
got = []
def handler(signum, frame):
    got.append(signum)
    with open(os.path.join(rec, "worker_signals.txt"), "a") as fh:
        fh.write(signal.Signals(signum).name + "\\n")
signal.signal(signal.SIGTERM, handler)
signal.signal(signal.SIGUSR1, handler)
open(os.path.join(rec, "worker_ready"), "w").close()
deadline = time.time() + 60
while not got and time.time() < deadline:
    time.sleep(0.02)
time.sleep(1.0)  # commit a checkpoint
open(os.path.join(rec, "worker_done"), "w").close()
sys.exit(143 if got else 0)
"""

FAKE_SRUN = """#!/usr/bin/env bash
echo "$*" >> "$FAKE_RECORD_DIR/srun_calls.txt"
while [[ "${1:-}" == --* ]]; do shift; done
exec "$@"
"""

FAKE_SCONTROL = """#!/usr/bin/env bash
echo "$*" >> "$FAKE_RECORD_DIR/scontrol_calls.txt"
"""


def _write_exec(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@pytest.fixture
def fakes(tmp_path: Path) -> dict:
    rec = tmp_path / "rec"
    rec.mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _write_exec(bin_dir / "srun", FAKE_SRUN)
    _write_exec(bin_dir / "scontrol", FAKE_SCONTROL)
    launcher = tmp_path / "launcher.py"
    launcher.write_text(FAKE_LAUNCHER)
    worker = tmp_path / "worker.py"
    worker.write_text(FAKE_WORKER)
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("SLURM_")
    }  # a developer's shell may be inside a job
    env.update(
        FAKE_RECORD_DIR=str(rec),
        FAKE_WORKER=str(worker),
        DISCHARGESUM_LAUNCH=f"{sys.executable} {launcher}",
        GPUS_PER_NODE="2",
        PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    return {"rec": rec, "env": env}


def _run_and_signal(role: str, sig: signal.Signals, fakes: dict, extra_env: dict[str, str]) -> int:
    rec = fakes["rec"]
    proc = subprocess.Popen(
        [
            "bash",
            str(ROOT / "scripts" / "slurm_train.sh"),
            role,
            "--config",
            "recipes/demo/sft_qlora.yaml",
            "--seed",
            "3",
        ],
        cwd=ROOT,
        env={**fakes["env"], **extra_env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not (rec / "worker_ready").exists():
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "the fake training process never started"
            time.sleep(0.02)
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # The script returned only after the training process had finished committing.
    assert (rec / "worker_done").exists(), out
    assert (rec / "worker_signals.txt").read_text().split() == [sig.name], out
    argv = json.loads((rec / "launcher_argv.json").read_text())
    assert argv[-5:] == ["scripts/sft_qlora.py", "--config", "recipes/demo/sft_qlora.yaml", "--seed", "3"]
    assert argv[argv.index("--num_processes") + 1] == "2" and argv[argv.index("--machine_rank") + 1] == "0"
    return proc.returncode


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_node_role_forwards_signal_to_launcher_group_and_exits_143(sig: signal.Signals, fakes: dict) -> None:
    assert _run_and_signal("node", sig, fakes, {}) == 143


def test_batch_role_forwards_through_srun_and_requeues(fakes: dict) -> None:
    code = _run_and_signal("batch", signal.SIGUSR1, fakes, {"SLURM_JOB_ID": "4242", "DISCHARGESUM_SRUN": "srun"})
    assert code == 143
    rec = fakes["rec"]
    assert "bash" in (rec / "srun_calls.txt").read_text()
    assert (rec / "scontrol_calls.txt").read_text().split() == ["requeue", "4242"]
