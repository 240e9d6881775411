"""Multi-node training on one host: ``accelerate_configs/multi_node.yaml`` as two "machines" of one CPU process each.

Each machine runs the same command with its own ``--machine_rank`` (what ``scripts/slurm_train.sh`` does on a
cluster); they meet at ``--main_process_ip 127.0.0.1``. What accelerate needs for this on CPU, found by running
it: the config's ``distributed_type: MULTI_GPU`` goes through torchrun (``--nnodes 2 --node_rank r``), which sets
RANK / WORLD_SIZE / LOCAL_RANK, and the trainer's ``use_cpu`` turns that into gloo. ``MULTI_CPU`` would NOT work
here: accelerate's MULTI_CPU launcher starts one plain process per invocation and expects MPI (``mpirun``) to
provide the ranks, so without MPI every "machine" trains alone; ``--cpu`` on top of this config falls back to the
same single-process launcher. Both machines share this filesystem, as nodes sharing a network filesystem would.

The run is trained to step 2 (checkpoint-2), then the command is rerun with ``--max_steps 4``: it must resume from
checkpoint-2 on both machines, continue the data order (no note seen twice), and only the world's main process
writes checkpoints and the adapter.
"""

from __future__ import annotations

import json
import math
import re
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from dischargesum.training.checkpoint_store import validate_checkpoint
from dischargesum.training.metrics import read_metrics
from tests.helpers import accelerate_launch

pytestmark = pytest.mark.distributed

PER_DEVICE_BATCH = 2
WORLD = 2


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _train_on_two_machines(model: Path, data: Path, out: Path, max_steps: int) -> list[str]:
    """Start machine 0 and machine 1 together (same command, own --machine_rank); return their logs."""
    port = _free_port()
    args = [
        "--config", "recipes/demo/sft_qlora.yaml",
        "--model_name_or_path", str(model),
        "--dataset_dir", str(data),
        "--output_dir", str(out),
        "--max_steps", str(max_steps),
        "--save_steps", "2",
        "--logging_steps", "1",
        "--eval_steps", "0",
        "--per_device_train_batch_size", str(PER_DEVICE_BATCH),
        "--gradient_accumulation_steps", "1",
        "--log_note_ids", "true",
        "--seed", "0",
    ]  # fmt: skip

    def machine(rank: int):
        launch = ["--num_machines", "2", "--machine_rank", str(rank)]
        launch += ["--main_process_ip", "127.0.0.1", "--main_process_port", str(port)]
        return accelerate_launch(
            "sft_qlora.py",
            args,
            config_file="multi_node.yaml",
            num_processes=WORLD,
            extra_launch_args=launch,
            timeout=300,
        )

    with ThreadPoolExecutor(max_workers=2) as pool:
        procs = list(pool.map(machine, range(2)))
    logs = [p.stdout + p.stderr for p in procs]
    for rank, (proc, log) in enumerate(zip(procs, logs)):
        assert proc.returncode == 0, f"machine {rank} exited {proc.returncode}:\n{log[-4000:]}"
    return logs


def _printed_losses(log: str) -> dict[int, float]:
    """Losses a machine's local main process printed (HF's printer), in order: step i+1 -> loss."""
    found = re.findall(r"'loss': '?([-+0-9.eE]+|nan|inf)'?", log)
    return {i + 1: float(v) for i, v in enumerate(found)}


def test_two_machines_train_then_resume_from_checkpoint(
    tmp_path: Path, tiny_model_dir: Path, prepared_dataset_dir: Path
) -> None:
    out = tmp_path / "run"

    logs = _train_on_two_machines(tiny_model_dir, prepared_dataset_dir, out, max_steps=2)
    ckpt2 = out / "checkpoint-2"
    status = validate_checkpoint(ckpt2)
    assert status.valid, status.reason
    manifest = json.loads((ckpt2 / "checkpoint_manifest.json").read_text())
    assert manifest["world_size"] == WORLD
    # The resume guards compare these: they must count both machines' processes.
    assert manifest["run"]["world_size"] == WORLD
    assert manifest["run"]["effective_batch"] == WORLD * PER_DEVICE_BATCH
    files = {e["path"] for e in manifest["files"]}
    # Each rank saved its own RNG state into the one checkpoint: both machines took part in the save.
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= files
    assert "training" in logs[0] and "on 2 process(es)" in logs[0]

    logs = _train_on_two_machines(tiny_model_dir, prepared_dataset_dir, out, max_steps=4)
    run_manifest = json.loads((out / "manifest.json").read_text())
    assert run_manifest["status"] == "complete"
    assert Path(run_manifest["inputs"]["resume_from"]).name == "checkpoint-2"
    assert "resuming from" in logs[0] and "checkpoint-2" in logs[0]
    assert validate_checkpoint(out / "checkpoint-4").valid

    # Only the world's main process (machine 0) commits checkpoints and writes final/, once per invocation.
    assert logs[0].count("committed ") == 1 and logs[0].count("done: 4 steps") == 1
    assert "committed " not in logs[1] and "done:" not in logs[1]
    assert (out / "final" / "adapter_model.safetensors").is_file()
    assert json.loads((out / "final" / "manifest.json").read_text())["status"] == "complete"

    rows = read_metrics(out)
    losses = {r["step"]: r for r in rows if "loss" in r}
    assert sorted(losses) == [1, 2, 3, 4]
    for row in losses.values():
        assert math.isfinite(row["loss"]) and math.isfinite(row["grad_norm"])
    # Both machines agree on every step's loss (machine 1's local main prints the same gathered value).
    printed = _printed_losses(logs[1])
    assert sorted(printed) == [1, 2], printed  # this invocation trained steps 3 and 4
    for i, step in enumerate((3, 4), start=1):
        assert printed[i] == pytest.approx(losses[step]["loss"], rel=1e-3)

    # Every step trained on both ranks' examples, and the resumed run continued the data order: no note twice.
    note_ids = {r["step"]: r["note_ids"] for r in rows if "note_ids" in r}
    assert sorted(note_ids) == [1, 2, 3, 4]
    seen = [n for step in sorted(note_ids) for n in note_ids[step]]
    assert all(len(note_ids[s]) == WORLD * PER_DEVICE_BATCH for s in note_ids)
    assert len(set(seen)) == len(seen), note_ids
