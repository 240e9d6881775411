"""Signal scenarios through the real launcher: ``scripts/launch.py`` -> ``accelerate launch`` -> sft_qlora.

A scenario = a signal target x a training phase x a process count. Targets: ``launcher`` (SIGTERM to the outermost
process, as ``docker stop`` / Kubernetes / a SLURM ``scancel`` of the batch step do), ``trainer`` (SIGTERM to one
training process only: rank 1 of two), ``all`` (SIGTERM to every process of the job at once: the outer process
group plus torchrun's workers, which sit in sessions of their own — what systemd does to a service's cgroup when a
VM shuts down). Phases are made to last long enough for a signal to land in them with the test-only pause of
:mod:`dischargesum.training.fault_injection` (``DISCHARGESUM_FAULT_PAUSE``), except mid-step, which is simply a step
after the first two.

The launches of one phase run side by side (one per target), so the imports of the three overlap.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dischargesum.training.checkpoint_store import list_checkpoint_dirs, validate_checkpoint
from dischargesum.training.metrics import train_loss_by_step
from tests.helpers import ACCELERATE_CONFIGS, ROOT, subprocess_env

PHASES = ("loading", "mid-step", "mid-save", "evaluation")
TARGETS = ("launcher", "trainer", "all")
GRACE_SECONDS = 20
PAUSE_SECONDS = 2.5  # below accelerate 1.16's 5 s between its own SIGTERM and SIGKILL of its child (target `all`)
SAVE_STEP = 2


def scenario_args(dataset_dir: Path, model_dir: Path, out: Path, phase: str) -> list[str]:
    args = [
        "--dataset_dir", str(dataset_dir),
        "--model_name_or_path", str(model_dir),
        "--output_dir", str(out),
        "--load_in_4bit", "false",
        "--lora_r", "4",
        "--lora_alpha", "8",
        "--per_device_train_batch_size", "2",
        "--gradient_accumulation_steps", "2",
        "--max_steps", "60",
        "--save_steps", str(SAVE_STEP) if phase == "mid-save" else "1000",
        "--logging_steps", "1",
        "--eval_steps", str(SAVE_STEP) if phase == "evaluation" else "0",
        "--max_eval_samples", "4",
        "--gradient_checkpointing", "false",
        "--max_seq_length", "none",
        "--seed", "0",
    ]  # fmt: skip
    return args


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Scenario:
    target: str
    phase: str
    processes: int
    out: Path
    log: Path
    trace: Path
    proc: subprocess.Popen | None = None
    signalled_at: float | None = None
    exit_code: int | None = None
    seconds_to_exit: float | None = None
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.target}/{self.phase}/{self.processes}p"

    def start(self, dataset_dir: Path, model_dir: Path) -> None:
        launch = [sys.executable, str(ROOT / "scripts" / "launch.py"), "--grace_seconds", str(GRACE_SECONDS)]
        if self.processes == 1:
            launch += ["--config_file", str(ACCELERATE_CONFIGS / "cpu.yaml")]
        else:
            launch += [
                "--config_file", str(ACCELERATE_CONFIGS / "cpu_ddp.yaml"),
                "--num_processes", str(self.processes),
                "--main_process_port", str(_free_port()),
            ]  # fmt: skip
        cmd = [
            *launch,
            str(ROOT / "scripts" / "sft_qlora.py"),
            *scenario_args(dataset_dir, model_dir, self.out, self.phase),
        ]
        env = {"DISCHARGESUM_FAULT_TRACE": str(self.trace), "DISCHARGESUM_FAULT_PAUSE_SECONDS": str(PAUSE_SECONDS)}
        pause = {"loading": "load", "mid-save": "save", "evaluation": "evaluate"}.get(self.phase)
        if pause:
            env["DISCHARGESUM_FAULT_PAUSE"] = pause
        if self.phase == "mid-save":
            env["DISCHARGESUM_FAULT_AT_STEP"] = str(SAVE_STEP)
        with open(self.log, "w", encoding="utf-8") as fh:
            self.proc = subprocess.Popen(
                cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT, env=subprocess_env(**env), start_new_session=True
            )

    def in_phase(self) -> bool:
        """True once the run is inside its phase (so the signal lands there)."""
        if self.phase == "mid-step":
            losses = train_loss_by_step(self.out) if (self.out / "metrics.jsonl").is_file() else {}
            return bool(losses) and max(losses) >= 2
        pause = {"loading": "load", "mid-save": "save", "evaluation": "evaluate"}[self.phase]
        lines = self.trace.read_text().splitlines() if self.trace.is_file() else []
        # The save pause is on the committing rank only; the others pause on every rank.
        wanted = 1 if self.phase == "mid-save" else self.processes
        return sum(line.startswith(f"pause:{pause}") for line in lines) >= wanted

    def trainers(self) -> dict[int, int]:
        """``{rank: pid}`` of the training processes below the launch."""
        import psutil

        found: dict[int, int] = {}
        assert self.proc is not None
        for child in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                env, cmdline = child.environ(), " ".join(child.cmdline())
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            if "sft_qlora.py" in cmdline and "accelerate" not in cmdline:
                found[int(env.get("RANK", "0"))] = child.pid
        return found

    def send_signal(self) -> None:
        import psutil

        assert self.proc is not None
        self.signalled_at = time.monotonic()
        if self.target == "launcher":
            os.kill(self.proc.pid, signal.SIGTERM)
        elif self.target == "trainer":
            ranks = self.trainers()
            assert len(ranks) == self.processes, (self.name, ranks)
            os.kill(ranks[max(ranks)], signal.SIGTERM)  # rank 1 of two: not the rank that commits
        else:
            everyone = [self.proc.pid, *(c.pid for c in psutil.Process(self.proc.pid).children(recursive=True))]
            os.killpg(self.proc.pid, signal.SIGTERM)
            for pid in everyone[1:]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)

    def poll_exit(self) -> bool:
        """True once the outermost process has exited (and its exit code and time are recorded)."""
        assert self.proc is not None and self.signalled_at is not None
        if self.exit_code is None and self.proc.poll() is not None:
            self.exit_code = self.proc.returncode
            self.seconds_to_exit = round(time.monotonic() - self.signalled_at, 1)
        return self.exit_code is not None

    def collect(self) -> None:
        ckpts = list_checkpoint_dirs(self.out) if self.out.is_dir() else []
        statuses = [validate_checkpoint(p) for _s, p in ckpts]
        manifest_path = self.out / "manifest.json"
        manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
        losses = train_loss_by_step(self.out) if (self.out / "metrics.jsonl").is_file() else {}
        self.facts = {
            "checkpoints": [s.path.name for s in statuses if s.valid],
            "invalid": [s.path.name for s in statuses if not s.valid],
            "last_step": max(losses) if losses else 0,
            "manifest_status": manifest.get("status"),
            "manifest_checkpoint": manifest.get("checkpoint"),
            "log": self.log.read_text(encoding="utf-8", errors="replace"),
        }

    def row(self) -> str:
        saved = ", ".join(self.facts["checkpoints"]) or "nothing to save yet"
        return f"{self.name:24} exit {self.exit_code}  {saved}  {self.seconds_to_exit} s"


def run_phase(
    phase: str, processes: int, tmp_path: Path, dataset_dir: Path, model_dir: Path, timeout: float = 420
) -> list[Scenario]:
    """The three targets of one phase, launched side by side; returns them finished."""
    scenarios = []
    for target in TARGETS:
        d = tmp_path / target
        d.mkdir()
        scenarios.append(Scenario(target, phase, processes, d / "run", d / "launch.log", d / "trace.tsv"))
    try:
        for s in scenarios:
            s.start(dataset_dir, model_dir)
        pending = list(scenarios)
        deadline = time.monotonic() + timeout
        while pending:
            for s in list(pending):
                assert s.proc is not None
                if s.proc.poll() is not None:
                    raise AssertionError(f"{s.name}: the launch ended (exit {s.proc.returncode}) before its phase:\n"
                                         f"{s.log.read_text()[-4000:]}")  # fmt: skip
                if s.in_phase():
                    s.send_signal()
                    pending.remove(s)
            assert time.monotonic() < deadline, f"phases not reached in {timeout} s: {[s.name for s in pending]}"
            time.sleep(0.02)
        deadline = time.monotonic() + GRACE_SECONDS + 60
        while not all(s.poll_exit() for s in scenarios):
            assert time.monotonic() < deadline, f"still running: {[s.name for s in scenarios if s.exit_code is None]}"
            time.sleep(0.05)
        for s in scenarios:
            s.collect()
    finally:
        for s in scenarios:
            if s.proc is not None and s.proc.poll() is None:
                os.killpg(s.proc.pid, signal.SIGKILL)
                s.proc.wait()
    return scenarios


def check_scenario(s: Scenario, table: str = "") -> None:
    """The contract: exit 143 from the outermost process within the grace period, and a committed checkpoint of
    the phase's step — or, before the first step, none and the manifest marked interrupted. ``table``: every
    scenario of the launch group's row, shown with a failure."""
    f, log = s.facts, f"{table}\n\n{s.name}:\n{s.facts['log'][-5000:]}"
    assert s.exit_code == 143, f"{s.name}: exit {s.exit_code}\n{log}"
    assert s.seconds_to_exit is not None and s.seconds_to_exit < GRACE_SECONDS, f"{s.name}: {s.seconds_to_exit} s"
    assert "s over: SIGKILL" not in f["log"], f"{s.name}: the supervisor had to kill at the deadline\n{log}"
    assert not f["invalid"], f"{s.name}: invalid checkpoints {f['invalid']}"
    assert f["manifest_status"] == "interrupted", f"{s.name}: manifest {f['manifest_status']}\n{log}"
    if s.phase == "loading":
        assert f["checkpoints"] == [] and f["last_step"] == 0, (s.name, f["checkpoints"])
        assert "nothing to save yet" in f["log"], log
        return
    assert len(f["checkpoints"]) == 1, (s.name, f["checkpoints"], log)
    step = int(f["checkpoints"][0].rsplit("-", 1)[1])
    assert f["manifest_checkpoint"].endswith(f"checkpoint-{step}"), (s.name, f["manifest_checkpoint"])
    if s.phase in ("mid-save", "evaluation"):
        assert step == SAVE_STEP, (s.name, step)  # the checkpoint being written / the step evaluated, no later one
    else:
        assert step >= 2, (s.name, step)
    assert f["last_step"] == step, (s.name, f["last_step"], step)  # nothing trained past the checkpoint
    assert f"committed {s.out}/checkpoint-{step}" in f["log"], log


def run_and_check_phase(phase: str, processes: int, tmp_path: Path, dataset_dir: Path, model_dir: Path) -> None:
    """Run the three signal targets of ``phase`` side by side, print their table (pytest -rP shows it), check each."""
    scenarios = run_phase(phase, processes, tmp_path, dataset_dir, model_dir)
    table = "\n".join(s.row() for s in scenarios)
    print(table)
    for s in scenarios:
        check_scenario(s, table)
