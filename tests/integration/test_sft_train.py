"""sft_qlora through `accelerate launch` on one CPU process (accelerate_configs/cpu.yaml), tiny Gemma-3.

One fp32-LoRA run is trained to step 4 (checkpoints at 2 and 4), rerun unchanged (must not retrain), then rerun with
``--max_steps 6`` (an interrupted run: must resume from checkpoint-4 and continue the same TensorBoard curves and
metrics.jsonl). A second run trains the QLoRA path (NF4 base through bitsandbytes' CPU kernels). The checks shared
with the DDP and DeepSpeed tests live here as functions (``check_*``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.helpers import accelerate_launch

pytestmark = pytest.mark.integration

PER_DEVICE_BATCH = 2
ACCUMULATION = 2
SCALARS = (
    "train/loss",
    "train/learning_rate",
    "train/grad_norm",
    "train/tokens_per_second",
    "train/trained_tokens_per_second",
)

# fp32 LoRA on one CPU process, seed 0, OMP_NUM_THREADS=1 (tests.helpers.subprocess_env): the step losses of the
# first 4 steps, pinned exactly as this machine computes them (printed by a run; compared to 1e-6 relative so a
# different CPU's last-bit summation order does not fail the test, while any change to data order, masking, loss
# normalisation or the optimizer does).
PINNED_LOSSES_1PROC = {1: 6.996111869812012, 2: 6.904244899749756, 3: 6.9159955978393555, 4: 6.835609436035156}


def sft_args(
    prepared_dataset_dir: Path, model_dir: Path, out: Path, *, max_steps: int = 4, load_in_4bit: bool = False
) -> list[str]:
    return [
        "--dataset_dir", str(prepared_dataset_dir),
        "--model_name_or_path", str(model_dir),
        "--output_dir", str(out),
        "--seed", "0",
        "--load_in_4bit", str(load_in_4bit).lower(),
        "--lora_r", "4",
        "--lora_alpha", "8",
        "--max_steps", str(max_steps),
        "--save_steps", "2",
        "--save_total_limit", "3",
        "--per_device_train_batch_size", str(PER_DEVICE_BATCH),
        "--gradient_accumulation_steps", str(ACCUMULATION),
        "--learning_rate", "0.005",
        "--warmup_steps", "0",
        "--lr_scheduler_type", "constant",
        "--logging_steps", "1",
        "--log_note_ids", "true",
        "--check_base_unchanged", "true",
        "--eval_steps", "2",
        "--max_eval_samples", "4",
        "--gradient_checkpointing", "true",
    ]  # fmt: skip


def launch(args: list[str], **kw):
    proc = accelerate_launch("sft_qlora.py", args, timeout=600, **kw)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


# ---------------------------------------------------------------------------------------------------------------
# Checks shared by the topologies
# ---------------------------------------------------------------------------------------------------------------


def train_losses(out: Path) -> dict[int, float]:
    from dischargesum.training.metrics import train_loss_by_step

    return train_loss_by_step(out)


def check_completed_run(out: Path, *, steps: int, world_size: int, base_digest: str | None) -> dict:
    """Manifests complete, final/ holds what generate needs, LoRA changed, base unchanged, losses finite."""
    from safetensors.torch import load_file

    from dischargesum.manifest import read_manifest, require_artifact

    manifest = require_artifact(out, stage="sft_qlora", field="output_dir")
    final = out / "final"
    final_manifest = require_artifact(
        final,
        stage="sft_qlora",
        field="adapter",
        files=["adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "run_config.yaml", "README.md"],
    )
    training = final_manifest["training"]
    assert training["global_step"] == steps and training["world_size"] == world_size
    assert manifest["training"] == training and read_manifest(out)["status"] == "complete"
    base = json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert Path(base).is_absolute() and base == final_manifest["base_model"]
    fingerprint = json.loads((final / "data_fingerprint.json").read_text())
    assert fingerprint["data_fingerprint"] == final_manifest["data_fingerprint"]
    card = (final / "README.md").read_text()
    assert f"| optimizer steps | {steps} |" in card and "| hardware |" in card

    # LoRA weights changed: every lora_B starts at exactly zero, so non-zero means every adapter was trained.
    tensors = load_file(str(final / "adapter_model.safetensors"))
    lora_b = {k: v for k, v in tensors.items() if "lora_B" in k}
    assert lora_b and all(float(v.abs().max()) > 0 for v in lora_b.values())
    assert all("lora_" in k for k in tensors), "only adapter weights are saved"
    # The frozen base is byte-identical before and after training (hashed in the training process) ...
    assert training["base_weights_digest_before"] == training["base_weights_digest_after"]
    # ... and (unquantised runs) equal to the weights on disk, hashed here independently.
    if base_digest is not None:
        assert training["base_weights_digest_before"] == base_digest

    losses = train_losses(out)
    assert sorted(losses) == list(range(1, steps + 1))
    assert all(math.isfinite(v) for v in losses.values())
    return training


def check_note_ids(out: Path, *, steps: int, per_step: int) -> dict[int, list[str]]:
    from dischargesum.training.metrics import note_ids_by_step

    seen = note_ids_by_step(out)
    assert sorted(seen) == list(range(1, steps + 1))
    assert all(len(ids) == per_step for ids in seen.values()), {s: len(v) for s, v in seen.items()}
    return seen


def check_tensorboard(out: Path, *, steps: int) -> None:
    """The run's one TensorBoard directory holds the expected scalars, each step once, equal to metrics.jsonl."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = out / "tensorboard"
    assert tb.is_dir() and not [p for p in out.rglob("events.out.tfevents.*") if p.parent != tb]
    acc = EventAccumulator(str(tb), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert set(SCALARS) <= tags, sorted(tags)
    assert "eval/loss" in tags
    for tag in SCALARS:
        assert [e.step for e in acc.Scalars(tag)] == list(range(1, steps + 1)), tag
    tb_loss = {e.step: e.value for e in acc.Scalars("train/loss")}
    assert tb_loss == pytest.approx(train_losses(out), rel=1e-6)


def check_rerun_does_nothing(args: list[str], out: Path, **kw) -> None:
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    proc = launch(args, **kw)
    assert "already holds a completed run of this exact config" in proc.stderr
    after = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert after == before, "a rerun of a completed run must not touch it"


def check_resumed(proc, out: Path, *, first_losses: dict[int, float], steps: int, resumed_from: int) -> None:
    assert f"resuming from {out / f'checkpoint-{resumed_from}'}" in proc.stderr
    losses = train_losses(out)
    assert sorted(losses) == list(range(1, steps + 1))
    assert {s: losses[s] for s in first_losses} == first_losses, "steps before the resume point are kept as logged"
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 2, "the resumed run logs to the same dir"
    check_tensorboard(out, steps=steps)
    from dischargesum.training.metrics import read_metrics

    totals = [r["total_tokens"] for r in read_metrics(out) if "total_tokens" in r]
    assert totals == sorted(totals) and len(totals) == steps, "token totals continue across the resume"


def on_disk_base_digest(model_dir: Path) -> str:
    from dischargesum.modeling import base_weights_digest, load_base_model

    return base_weights_digest(load_base_model(str(model_dir), dtype="float32"))


# ---------------------------------------------------------------------------------------------------------------
# One process
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory: pytest.TempPathFactory, prepared_dataset_dir: Path, tiny_model_dir: Path) -> dict:
    out = tmp_path_factory.mktemp("sft-1proc") / "run"
    args = sft_args(prepared_dataset_dir, tiny_model_dir, out)
    launch(args)
    first = {"losses": train_losses(out), "note_ids": check_note_ids(out, steps=4, per_step=4)}
    first["training"] = check_completed_run(
        out, steps=4, world_size=1, base_digest=on_disk_base_digest(tiny_model_dir)
    )
    check_tensorboard(out, steps=4)
    check_rerun_does_nothing(args, out)
    resumed = launch(sft_args(prepared_dataset_dir, tiny_model_dir, out, max_steps=6))
    return {"out": out, "first": first, "resumed": resumed, "tiny": tiny_model_dir}


def test_one_process_trains_lora_with_pinned_losses(lora_run: dict) -> None:
    first = lora_run["first"]
    assert first["losses"] == pytest.approx(PINNED_LOSSES_1PROC, rel=1e-6), first["losses"]
    assert first["training"]["world_size"] == 1 and first["training"]["compute_dtype"] == "float32"
    assert not first["training"]["load_in_4bit"]
    ids = [i for step in sorted(first["note_ids"]) for i in first["note_ids"][step]]
    assert len(set(ids)) == len(ids), "no note is seen twice within the first epoch"


def test_one_process_resumes_from_the_last_checkpoint(lora_run: dict) -> None:
    out = lora_run["out"]
    check_resumed(lora_run["resumed"], out, first_losses=lora_run["first"]["losses"], steps=6, resumed_from=4)
    check_completed_run(out, steps=6, world_size=1, base_digest=on_disk_base_digest(lora_run["tiny"]))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    cfg = (out / "checkpoint-4" / "run_config.yaml").read_text()
    assert "model_name_or_path:" in cfg, "every checkpoint records the resolved config (generate can load it)"


def test_qlora_path_runs_on_cpu(tmp_path: Path, prepared_dataset_dir: Path, tiny_model_dir: Path) -> None:
    out = tmp_path / "qlora"
    proc = launch(sft_args(prepared_dataset_dir, tiny_model_dir, out, max_steps=2, load_in_4bit=True))
    assert "4-bit=True" in proc.stderr
    training = check_completed_run(out, steps=2, world_size=1, base_digest=None)
    assert training["load_in_4bit"] is True
    check_tensorboard(out, steps=2)
