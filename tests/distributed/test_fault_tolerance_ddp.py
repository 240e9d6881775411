"""Fault tolerance with two CPU processes (DDP over gloo, ``accelerate launch --config_file cpu_ddp.yaml``).

One chain of launches against an uninterrupted two-process run: SIGTERM reaches ONLY rank 1 -> both ranks agree,
stop at the same step, commit one checkpoint and exit 143; the rerun is SIGKILLed (rank 0 in the middle of a later
checkpoint save, then the whole process group); the next rerun completes. The end result — final adapter, every
step's loss and every step's note_ids (both ranks' shards) — is bit-identical to the uninterrupted run.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from dischargesum.training.checkpoint_store import list_checkpoint_dirs, validate_checkpoint
from dischargesum.training.metrics import note_ids_by_step, train_loss_by_step
from tests.fixtures_data import make_prepared_dataset
from tests.helpers import ACCELERATE_CONFIGS, ROOT, accelerate_launch, subprocess_env

pytestmark = pytest.mark.distributed

WORLD = 2
MAX_STEPS = 12  # 45 train rows / (2 ranks x 2 x 2) = 6 steps per epoch: the run crosses an epoch boundary


def ddp_args(dataset_dir: Path, model_dir: Path, out: Path) -> list[str]:
    return [
        "--dataset_dir", str(dataset_dir),
        "--model_name_or_path", str(model_dir),
        "--output_dir", str(out),
        "--load_in_4bit", "false",
        "--lora_r", "4",
        "--lora_alpha", "8",
        "--lora_dropout", "0.1",
        "--per_device_train_batch_size", "2",
        "--gradient_accumulation_steps", "2",
        "--learning_rate", "1e-3",
        "--warmup_steps", "1",
        "--max_steps", str(MAX_STEPS),
        "--save_steps", "3",
        "--save_total_limit", "2",
        "--logging_steps", "1",
        "--log_note_ids", "true",
        "--eval_steps", "0",
        "--gradient_checkpointing", "false",
        "--max_seq_length", "none",
        "--seed", "0",
    ]  # fmt: skip


def start_launch(args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(ACCELERATE_CONFIGS / "cpu_ddp.yaml"),
        "--num_processes", str(WORLD),
        str(ROOT / "scripts" / "sft_qlora.py"), *args,
    ]  # fmt: skip
    with open(log, "w", encoding="utf-8") as fh:
        return subprocess.Popen(
            cmd,
            stdout=fh,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=subprocess_env(**(env or {})),
            start_new_session=True,
        )


def wait_for_step(out: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        losses = train_loss_by_step(out)
        if losses and max(losses) >= step:
            return max(losses)
        if proc.poll() is not None:
            raise AssertionError(f"launch ended (exit {proc.returncode}) before step {step}")
        time.sleep(0.01)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def worker_pids(launcher_pid: int) -> dict[int, int]:
    """``{rank: pid}`` of the training processes under the launcher (read from their environment)."""
    import psutil

    found: dict[int, int] = {}
    for child in psutil.Process(launcher_pid).children(recursive=True):
        try:
            env, cmdline = child.environ(), " ".join(child.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if "sft_qlora.py" in cmdline and "RANK" in env:
            found[int(env["RANK"])] = child.pid
    return found


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict:
    data = make_prepared_dataset(tmp_path_factory.mktemp("ftd-data"), tiny_model_dir)
    reference = tmp_path_factory.mktemp("ftd-reference") / "run"
    proc = accelerate_launch(
        "sft_qlora.py", ddp_args(data, tiny_model_dir, reference), config_file="cpu_ddp.yaml", num_processes=WORLD
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "on 2 process(es)" in proc.stderr
    return {"data": data, "reference": reference, "model": tiny_model_dir}


def test_sigterm_to_one_rank_stops_both_at_the_same_step_then_sigkill_then_resume_is_exact(
    setup: dict, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    args = ddp_args(setup["data"], setup["model"], out)

    # 1. SIGTERM to rank 1 only: rank 0 learns of it through the all-reduce and stops at the same step.
    log1 = tmp_path / "sigterm.log"
    proc = start_launch(args, log1)
    try:
        wait_for_step(out, 4, proc)
        ranks = worker_pids(proc.pid)
        assert sorted(ranks) == [0, 1], ranks
        os.kill(ranks[1], signal.SIGTERM)
        proc.wait(180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = log1.read_text()
    agreed = re.findall(r"\[dischargesum\.training\.checkpoint_trainer rank(\d)\] preemption \((\w[\w ]*)\) agreed "
                        r"across ranks at step (\d+)", text)  # fmt: skip
    assert sorted((rank, step) for rank, _why, step in agreed) == [("0", agreed[0][2]), ("1", agreed[0][2])], text
    assert {rank: why for rank, why, _ in agreed} == {"0": "signal on another rank", "1": "SIGTERM"}
    stop = int(agreed[0][2])
    assert len(re.findall(r"rank\d\] preempted: checkpoint committed, exiting with 143", text)) == WORLD
    assert re.search(r"exitcode\s*: 143", text), "rank 1 exits 143"  # torchrun's failure report
    ckpt = out / f"checkpoint-{stop}"
    status = validate_checkpoint(ckpt)
    assert status.valid and status.manifest["world_size"] == WORLD, status.reason
    assert {f"rng_state_{r}.pth" for r in range(WORLD)} <= {e["path"] for e in status.manifest["files"]}
    assert max(train_loss_by_step(out)) == stop and not (out / "final").exists()

    # 2. rerun; rank 0 is SIGKILLed in the middle of writing the checkpoint after next (at a random file of the
    # save, through the test-only fault hook), then the whole process group, as when the VM disappears. (A kill
    # timed from outside could land after this fast run has finished; the single-process tests do that.)
    next_save = (stop // 3 + 1) * 3
    crash_step = next_save + 3
    crash_event = random.Random(0).randint(1, 6)
    log2 = tmp_path / "sigkill.log"
    env = {"DISCHARGESUM_FAULT_AT_STEP": str(crash_step), "DISCHARGESUM_FAULT_AFTER_FILE": str(crash_event)}
    proc = start_launch(args, log2, env)
    try:
        wait_for_step(out, crash_step, proc)
        deadline = time.monotonic() + 120
        while f"SIGKILL after save event {crash_event}" not in log2.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log2.read_text()[-3000:]
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert f"resume from {ckpt}" in log2.read_text()
    assert not (out / "final").exists()
    assert (out / f".staging-checkpoint-{crash_step}").is_dir()  # the interrupted save never became a checkpoint

    # 3. rerun to completion: identical to the uninterrupted run.
    proc3 = accelerate_launch("sft_qlora.py", args, config_file="cpu_ddp.yaml", num_processes=WORLD)
    assert proc3.returncode == 0, proc3.stderr[-4000:]
    resumed = json.loads((out / "manifest.json").read_text())["inputs"]["resume_from"]
    assert resumed == str(out / f"checkpoint-{next_save}"), (resumed, stop, crash_step)
    reference = setup["reference"]
    ref_w, got_w = (
        load_file(str(reference / "final" / "adapter_model.safetensors")),
        load_file(str(out / "final" / "adapter_model.safetensors")),
    )
    assert ref_w.keys() == got_w.keys() and all(bool((ref_w[k] == got_w[k]).all()) for k in ref_w)
    assert train_loss_by_step(out) == train_loss_by_step(reference)
    assert sorted(train_loss_by_step(out)) == list(range(1, MAX_STEPS + 1))
    ids, ref_ids = note_ids_by_step(out), note_ids_by_step(reference)
    assert ids == ref_ids and all(len(v) == WORLD * 2 * 2 for k, v in ids.items() if k % 6)  # full steps: 8 notes
    assert [s for s, _p in list_checkpoint_dirs(out)] == [s for s, _p in list_checkpoint_dirs(reference)]
