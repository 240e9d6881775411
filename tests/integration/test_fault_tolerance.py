"""Fault tolerance of sft_qlora, proven by killing it: SIGKILL / SIGTERM / crashes inside a checkpoint save.

Every run is the real entry point (``scripts/sft_qlora.py``'s ``main``) on the tiny Gemma-3 with fp32 LoRA (dropout
on, so RNG state matters), gradient accumulation 2 and a run that crosses an epoch boundary. The reference run goes
through ``accelerate launch`` like a user's; the many short runs that get killed are forked from a server process
that has already imported torch/transformers/TRL (a fresh process each, the same code path, without paying ~10 s
of imports per run: the whole module stays inside its CPU budget). Each forked run uses one intra-op thread, as
the launched one does (``OMP_NUM_THREADS=1``), so the runs can be compared bit for bit.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file

from dischargesum.training.checkpoint_store import (
    STAGING_PREFIX,
    find_latest_valid_checkpoint,
    list_checkpoint_dirs,
    validate_checkpoint,
)
from dischargesum.training.metrics import note_ids_by_step, read_metrics, train_loss_by_step
from tests.fixtures_data import make_prepared_dataset
from tests.helpers import ROOT, accelerate_launch, subprocess_env

pytestmark = pytest.mark.integration

MAX_STEPS = 16  # 45 train rows / (2 x 2) per step = 12 steps per epoch: the run crosses an epoch boundary
ADAPTER = "adapter_model.safetensors"


def common_args(prepared_dataset_dir: Path, model_dir: Path) -> list[str]:
    return [
        "--dataset_dir", str(prepared_dataset_dir),
        "--model_name_or_path", str(model_dir),
        "--load_in_4bit", "false",
        "--lora_r", "4",
        "--lora_alpha", "8",
        "--lora_dropout", "0.1",
        "--per_device_train_batch_size", "2",
        "--gradient_accumulation_steps", "2",
        "--learning_rate", "1e-3",
        "--lr_scheduler_type", "cosine",
        "--warmup_steps", "2",
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


def with_overrides(args: list[str], **overrides: Any) -> list[str]:
    """``args`` with ``--key value`` pairs replaced or appended."""
    out = list(args)
    for key, value in overrides.items():
        flag = f"--{key}"
        if flag in out:
            out[out.index(flag) + 1] = str(value)
        else:
            out += [flag, str(value)]
    return out


# ---------------------------------------------------------------------------------------------------------------
# Running the script in fresh processes forked from a pre-imported server
# ---------------------------------------------------------------------------------------------------------------


def _child(argv: list[str], env: dict[str, str], log_path: str) -> None:
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ.update(env)
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT / "scripts"))
    import sft_qlora

    code = sft_qlora.main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class ScriptRunner:
    """Starts ``scripts/sft_qlora.py``'s main in a new process forked from a server that imported the stack."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.ctx = multiprocessing.get_context("forkserver")
        self.ctx.set_forkserver_preload(
            [
                "torch",
                "transformers",
                "peft",
                "trl",
                "datasets",
                "dischargesum.training.sft",
                "dischargesum.training.trainer",
            ]
        )
        self.count = 0

    def start(self, argv: list[str], env: dict[str, str] | None = None, name: str = "run") -> tuple[Any, Path]:
        self.count += 1
        log = self.log_dir / f"{self.count:02d}-{name}.log"
        proc = self.ctx.Process(target=_child, args=(list(argv), dict(env or {}), str(log)))
        proc.start()
        return proc, log

    def run(
        self, argv: list[str], env: dict[str, str] | None = None, name: str = "run", timeout: float = 300
    ) -> tuple[int, str]:
        proc, log = self.start(argv, env, name)
        proc.join(timeout)
        if proc.exitcode is None:
            proc.kill()
            proc.join()
            raise AssertionError(f"{name} did not finish in {timeout} s:\n{log.read_text()[-3000:]}")
        return proc.exitcode, log.read_text(encoding="utf-8", errors="replace")


def wait_for_step(out: Path, step: int, proc: Any, timeout: float = 240) -> int:
    """Poll metrics.jsonl until a loss row for ``step`` (or later) appears; return the newest logged step."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        losses = train_loss_by_step(out)
        if losses and max(losses) >= step:
            return max(losses)
        if not proc.is_alive():
            raise AssertionError(f"run ended (exit {proc.exitcode}) before step {step}")
        time.sleep(0.01)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def adapter_tensors(directory: Path) -> dict[str, Any]:
    return load_file(str(directory / ADAPTER))


def assert_same_run(run_dir: Path, reference_dir: Path) -> None:
    """Final adapter bit-identical; every step's loss and note_ids identical (metrics.jsonl keeps one row per step,
    the resumed run's rows replacing the interrupted run's rows past its checkpoint)."""
    ref, got = adapter_tensors(reference_dir / "final"), adapter_tensors(run_dir / "final")
    assert ref.keys() == got.keys()
    different = [k for k in ref if not (ref[k].dtype == got[k].dtype and bool((ref[k] == got[k]).all()))]
    assert not different, f"adapter tensors differ from the uninterrupted run: {different[:5]}"
    ref_loss, got_loss = train_loss_by_step(reference_dir), train_loss_by_step(run_dir)
    assert sorted(got_loss) == list(range(1, MAX_STEPS + 1)) == sorted(ref_loss)
    assert got_loss == ref_loss
    ref_ids, got_ids = note_ids_by_step(reference_dir), note_ids_by_step(run_dir)
    assert sorted(got_ids) == list(range(1, MAX_STEPS + 1))
    assert got_ids == ref_ids


def resumed_from(run_dir: Path) -> str | None:
    return json.loads((run_dir / "manifest.json").read_text())["inputs"].get("resume_from")


# ---------------------------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def args(prepared_dataset_dir: Path, tiny_model_dir: Path) -> list[str]:
    return common_args(prepared_dataset_dir, tiny_model_dir)


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> ScriptRunner:
    # The forkserver (and every run forked from it) gets this environment: offline, one thread, fixed hashing.
    saved = dict(os.environ)
    os.environ.update(subprocess_env())
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        r = ScriptRunner(tmp_path_factory.mktemp("ft-logs"))
        from multiprocessing import forkserver

        forkserver.ensure_running()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return r


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, args: list[str]) -> Path:
    """The uninterrupted run, through accelerate launch (one process, fp32 LoRA)."""
    out = tmp_path_factory.mktemp("ft-reference") / "run"
    proc = accelerate_launch("sft_qlora.py", [*args, "--output_dir", str(out)], config_file="cpu.yaml")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (out / "final" / ADAPTER).is_file()
    return out


# ---------------------------------------------------------------------------------------------------------------
# SIGKILL at a random step -> rerun -> identical to the uninterrupted run
# ---------------------------------------------------------------------------------------------------------------


# Seeded random kill steps: seed 1 kills after step 6 (resume mid-epoch), seed 5 after step 13 (resume from
# checkpoint-12, the epoch boundary, where HF restores the RNG before drawing the next epoch's shuffle).
@pytest.mark.parametrize("seed", [1, 5])
def test_sigkill_at_random_step_then_rerun_equals_uninterrupted_run(
    seed: int, tmp_path: Path, args: list[str], runner: ScriptRunner, reference: Path
) -> None:
    out = tmp_path / "run"
    argv = [*args, "--output_dir", str(out)]
    kill_at = random.Random(seed).randint(4, MAX_STEPS - 2)
    proc, log = runner.start(argv, name=f"sigkill-{seed}")
    reached = wait_for_step(out, kill_at, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    assert proc.exitcode == -signal.SIGKILL, log.read_text()[-2000:]
    assert not (out / "final").exists()
    assert list_checkpoint_dirs(out), "no checkpoint before the kill"

    code, text = runner.run(argv, name=f"sigkill-{seed}-rerun")
    assert code == 0, text[-3000:]
    resume = resumed_from(out)
    assert resume is not None and int(resume.rsplit("-", 1)[1]) <= reached, (resume, reached)
    assert_same_run(out, reference)


# ---------------------------------------------------------------------------------------------------------------
# SIGTERM -> checkpoint committed, exit 143, rerun resumes from it
# ---------------------------------------------------------------------------------------------------------------


def test_sigterm_commits_checkpoint_exits_143_and_rerun_resumes(
    tmp_path: Path, args: list[str], runner: ScriptRunner, reference: Path
) -> None:
    out = tmp_path / "run"
    # No periodic checkpoint: the only one is the one SIGTERM asks for.
    argv = with_overrides(args, output_dir=out, save_steps=1000)
    proc, log = runner.start(argv, name="sigterm")
    wait_for_step(out, 5, proc)
    os.kill(proc.pid, signal.SIGTERM)
    time.sleep(0.05)
    os.kill(proc.pid, signal.SIGTERM)  # a second signal (schedulers repeat them) must not corrupt anything
    proc.join(120)
    text = log.read_text()
    assert proc.exitcode == 143, text[-3000:]
    ckpts = list_checkpoint_dirs(out)
    assert len(ckpts) == 1, ckpts
    step, ckpt = ckpts[0]
    status = validate_checkpoint(ckpt)
    assert status.valid, status.reason
    files = {e["path"] for e in status.manifest["files"]}
    assert {ADAPTER, "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"} <= files
    assert json.loads((ckpt / "trainer_state.json").read_text())["global_step"] == step >= 5
    assert max(train_loss_by_step(out)) == step  # stopped at the step it checkpointed
    assert f"agreed across ranks at step {step}" in text and "exiting with 143" in text
    assert not (out / "final").exists()

    code, text = runner.run(argv, name="sigterm-rerun")
    assert code == 0, text[-3000:]
    assert resumed_from(out) == str(ckpt)
    assert_same_run(out, reference)


# ---------------------------------------------------------------------------------------------------------------
# Crash after each file of a checkpoint save -> the next run resumes from the previous valid checkpoint
# ---------------------------------------------------------------------------------------------------------------


def test_crash_at_every_point_of_a_save_resumes_from_previous_valid_checkpoint(
    tmp_path: Path, args: list[str], runner: ScriptRunner
) -> None:
    # Two steps, a checkpoint after each, keep one: the save at step 2 writes every file, the manifest, commits
    # and then removes checkpoint-1 — every point where a crash can land.
    short = with_overrides(args, max_steps=2, save_steps=1, save_total_limit=1)
    trace = tmp_path / "trace.tsv"
    ref = tmp_path / "uninterrupted"
    code, text = runner.run(
        with_overrides(short, output_dir=ref),
        env={"DISCHARGESUM_FAULT_TRACE": str(trace), "DISCHARGESUM_FAULT_AT_STEP": "2"},
        name="fault-trace",
    )
    assert code == 0, text[-3000:]
    events = [line.split("\t")[1] for line in trace.read_text().splitlines() if line.strip()]
    names = [e for e in events if e.startswith("write:")]
    assert {f"write:{ADAPTER}", "write:optimizer.pt", "write:trainer_state.json", "write:rng_state.pth"} <= set(names)
    assert events[len(names) :] == ["manifest", "commit", "rotate:checkpoint-1"], events

    for n, event in enumerate(events, start=1):
        out = tmp_path / f"crash-{n}"
        argv = with_overrides(short, output_dir=out)
        env = {"DISCHARGESUM_FAULT_AFTER_FILE": str(n), "DISCHARGESUM_FAULT_AT_STEP": "2"}
        code, text = runner.run(argv, env=env, name=f"fault-{n}")
        assert code == -signal.SIGKILL, f"event {n} ({event}): exit {code}\n{text[-2000:]}"
        assert f"SIGKILL after save event {n} ({event})" in text
        committed = n >= events.index("commit") + 1
        expected = out / ("checkpoint-2" if committed else "checkpoint-1")
        assert find_latest_valid_checkpoint(out) == expected, (n, event, sorted(p.name for p in out.iterdir()))
        if not committed:
            assert (out / f"{STAGING_PREFIX}2").is_dir()  # the half-written save is a staging dir, never a checkpoint
        # The next run resumes from there and ends exactly like the uninterrupted run (checked for a crash in the
        # middle of the file writes and for one between the manifest and the rename; the other points leave the
        # same states).
        if event in (f"write:{ADAPTER}", "manifest"):
            code, text = runner.run(argv, name=f"fault-{n}-rerun")
            assert code == 0, text[-3000:]
            assert resumed_from(out) == str(out / "checkpoint-1")
            assert adapter_tensors(out / "final").keys() == adapter_tensors(ref / "final").keys()
            for key, value in adapter_tensors(ref / "final").items():
                assert bool((adapter_tensors(out / "final")[key] == value).all()), key
            assert not list(out.glob(f"{STAGING_PREFIX}*")) and not list(out.glob(".trash-*"))
            assert [p.name for _s, p in list_checkpoint_dirs(out)] == ["checkpoint-2"]


def test_truncated_adapter_is_detected_and_an_explicit_resume_from_it_fails(
    tmp_path: Path, args: list[str], runner: ScriptRunner
) -> None:
    out = tmp_path / "run"
    argv = with_overrides(args, output_dir=out, max_steps=4, save_steps=2, save_total_limit=3)
    code, text = runner.run(argv, name="truncate-setup")
    assert code == 0, text[-3000:]
    shutil.rmtree(out / "final")
    (out / "manifest.json").unlink()
    ckpt4 = out / "checkpoint-4"
    adapter = ckpt4 / ADAPTER
    adapter.write_bytes(adapter.read_bytes()[: adapter.stat().st_size // 2])
    status = validate_checkpoint(ckpt4)
    assert not status.valid and ADAPTER in status.reason and "truncated" in status.reason
    # explicit: an error naming the problem, exit 2, nothing trained
    code, text = runner.run(with_overrides(argv, resume_from_checkpoint=ckpt4), name="truncate-explicit")
    assert code == 2, text[-3000:]
    assert "is not a valid checkpoint" in text and ADAPTER in text
    assert not (out / "final").exists()
    # auto: skips it with a warning that says why, resumes from checkpoint-2
    assert find_latest_valid_checkpoint(out) == out / "checkpoint-2"
    assert validate_checkpoint(out / "checkpoint-2").valid


# ---------------------------------------------------------------------------------------------------------------
# Resume guards and the override; a rerun past max_steps
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def guard_base(
    tmp_path_factory: pytest.TempPathFactory, args: list[str], runner: ScriptRunner
) -> tuple[Path, list[str]]:
    out = tmp_path_factory.mktemp("ft-guards") / "run"
    argv = with_overrides(args, output_dir=out, max_steps=4, save_steps=2)
    proc, _log = runner.start(argv, name="guard-base")
    wait_for_step(out, 3, proc)
    os.kill(proc.pid, signal.SIGKILL)  # leave an unfinished run with checkpoint-2
    proc.join()
    assert find_latest_valid_checkpoint(out) == out / "checkpoint-2"
    return out, argv


def test_each_resume_guard_refuses_with_the_field_and_override_resumes(
    tmp_path_factory: pytest.TempPathFactory,
    guard_base: tuple[Path, list[str]],
    runner: ScriptRunner,
    tiny_model_dir: Path,
) -> None:
    out, argv = guard_base
    other_data = make_prepared_dataset(tmp_path_factory.mktemp("ft-other-data"), tiny_model_dir, seed=1)
    other_model = tmp_path_factory.mktemp("ft-other-model") / "tiny"
    shutil.copytree(tiny_model_dir, other_model)
    cases = {
        "effective_batch": {"gradient_accumulation_steps": 1},
        "data_fingerprint": {"dataset_dir": other_data},
        "base_model": {"model_name_or_path": other_model},
        "quantization": {"load_in_4bit": "true"},
        "lora": {"lora_r": 8},
        "max_seq_length": {"max_seq_length": 600},
    }
    for field, change in cases.items():
        code, text = runner.run(with_overrides(argv, **change), name=f"guard-{field}")
        assert code == 2, f"{field}: exit {code}\n{text[-3000:]}"
        assert f"`{field}` differs" in text and "--allow_resume_mismatch" in text, text[-2000:]
    assert not (out / "final").exists()
    assert [p.name for _s, p in list_checkpoint_dirs(out)] == ["checkpoint-2"]  # nothing touched

    code, text = runner.run(
        with_overrides(argv, gradient_accumulation_steps=1, allow_resume_mismatch="true"), name="guard-override"
    )
    assert code == 0, text[-3000:]
    assert "`effective_batch` differs" in text and "allow_resume_mismatch is set" in text
    assert resumed_from(out) == str(out / "checkpoint-2")
    assert sorted(train_loss_by_step(out)) == [1, 2, 3, 4]


def test_rerun_from_a_checkpoint_at_max_steps_says_so_and_does_not_train(
    tmp_path: Path, args: list[str], runner: ScriptRunner, reference: Path
) -> None:
    out = tmp_path / "run"
    out.mkdir()
    last = list_checkpoint_dirs(reference)[-1][1]
    assert last.name == f"checkpoint-{MAX_STEPS}"
    shutil.copytree(last, out / last.name)
    argv = [*args, "--output_dir", str(out)]
    code, text = runner.run(argv, name="past-max-steps")
    assert code == 0, text[-3000:]
    assert f"already at step {MAX_STEPS}, at or past max_steps={MAX_STEPS}: nothing to train" in text
    assert [p.name for _s, p in list_checkpoint_dirs(out)] == [last.name]  # no checkpoint-17
    ref, got = adapter_tensors(reference / "final"), adapter_tensors(out / "final")
    assert all(bool((ref[k] == got[k]).all()) for k in ref)
    assert not [r for r in read_metrics(out) if "loss" in r and r["step"] > MAX_STEPS]


# ---------------------------------------------------------------------------------------------------------------
# Preemption inside an evaluation loop and between micro-batches (the mixin on a plain HF Trainer, where a callback
# can make the signal land at an exact point)
# ---------------------------------------------------------------------------------------------------------------


def _trainer_child(model_dir: str, out: str, mode: str, signal_at: int, result_path: str) -> None:
    """A tiny LoRA run on random token ids with the mixin. ``mode``: ``eval`` (GA 1, evaluation every 4 steps, the
    signal lands in the evaluation after step ``signal_at``) or ``accumulation`` (GA 3, the signal lands after the
    first micro-batch of the step after ``signal_at``); ``signal_at`` 0 sends none."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from dischargesum.training.checkpoint_store import RunFacts, resolve_resume_checkpoint
    from dischargesum.training.checkpoint_trainer import CheckpointingTrainerMixin, make_checkpoint_callbacks
    from dischargesum.training.preemption import preemption_requested

    torch.set_num_threads(1)
    accumulation = 3 if mode == "accumulation" else 1

    class MixinTrainer(CheckpointingTrainerMixin, Trainer):
        pass

    class SendSignal(TrainerCallback):  # runs after PreemptionCallback: the next check point sees the flag
        predictions = 0
        substeps = 0

        def on_prediction_step(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            self.predictions += 1
            if mode == "eval" and signal_at and state.global_step == signal_at and self.predictions == 2:
                os.kill(os.getpid(), signal.SIGTERM)

        def on_substep_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            self.substeps += 1
            if mode == "accumulation" and signal_at and state.global_step == signal_at and self.substeps % 2 == 1:
                os.kill(os.getpid(), signal.SIGTERM)

    g = torch.Generator().manual_seed(0)
    data = [
        {"input_ids": (ids := torch.randint(5, 500, (24,), generator=g)), "labels": ids.clone()} for _ in range(32)
    ]
    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
        LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"]),
    )
    facts = RunFacts.create(
        config_hash=mode, data_fingerprint="synthetic-ids", base_model=model_dir, quantization=None, lora={"r": 4},
        max_seq_length=24, per_device_train_batch_size=2, gradient_accumulation_steps=accumulation,
    )  # fmt: skip
    targs = TrainingArguments(
        output_dir=out, max_steps=8, per_device_train_batch_size=2, gradient_accumulation_steps=accumulation,
        per_device_eval_batch_size=2, eval_strategy="steps" if mode == "eval" else "no", eval_steps=4,
        save_steps=100, logging_steps=1, report_to=[], use_cpu=True, seed=0, learning_rate=1e-2, disable_tqdm=True,
    )  # fmt: skip
    trainer = MixinTrainer(
        model=model,
        args=targs,
        train_dataset=data[:16] if mode == "eval" else data[:24],  # accumulation: 4 steps per epoch
        eval_dataset=data[24:],
        callbacks=[*make_checkpoint_callbacks(facts, Path(out), 2), SendSignal()],
    )
    resume = resolve_resume_checkpoint("auto", Path(out), facts, False)
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    evals = [h["step"] for h in trainer.state.log_history if "eval_loss" in h]
    torch.save({k: v.detach() for k, v in model.named_parameters() if "lora" in k}, Path(out) / "weights.pt")
    result = {"step": trainer.state.global_step, "preempted": preemption_requested(), "evals": evals}
    result["resumed"] = str(resume) if resume else None
    Path(result_path).write_text(json.dumps(result))
    os._exit(0)


@pytest.mark.parametrize(
    ("mode", "signal_at", "checkpoint_step"),
    [
        ("eval", 4, 4),  # abandons the evaluation, saves the step it followed
        ("accumulation", 5, 5),  # mid-step: drops the partial accumulation of step 6, saves step 5
        ("accumulation", 4, 5),  # first step of an epoch: finishes the step, then saves
    ],
)
def test_sigterm_inside_evaluation_or_accumulation_saves_stops_and_resumes_exactly(
    mode: str, signal_at: int, checkpoint_step: int, tmp_path: Path, runner: ScriptRunner, tiny_model_dir: Path
) -> None:
    import torch

    def run(out: Path, send_at: int, tag: str) -> dict[str, Any]:
        result = tmp_path / f"{tag}.json"
        proc = runner.ctx.Process(
            target=_trainer_child, args=(str(tiny_model_dir), str(out), mode, send_at, str(result))
        )
        proc.start()
        proc.join(180)
        assert proc.exitcode == 0, tag
        return json.loads(result.read_text())

    evals = [4, 8] if mode == "eval" else []
    reference = run(tmp_path / "ref", 0, "ref")
    assert reference == {"step": 8, "preempted": False, "evals": evals, "resumed": None}
    interrupted = run(tmp_path / "run", signal_at, "interrupted")
    assert interrupted["preempted"] and interrupted["step"] == checkpoint_step and interrupted["evals"] == []
    assert [p.name for _s, p in list_checkpoint_dirs(tmp_path / "run")] == [f"checkpoint-{checkpoint_step}"]
    assert validate_checkpoint(tmp_path / "run" / f"checkpoint-{checkpoint_step}").valid
    resumed = run(tmp_path / "run", 0, "resumed")
    assert resumed["step"] == 8 and resumed["resumed"] == str(tmp_path / "run" / f"checkpoint-{checkpoint_step}")
    ref_w = torch.load(tmp_path / "ref" / "weights.pt", weights_only=True)
    got_w = torch.load(tmp_path / "run" / "weights.pt", weights_only=True)
    assert all(torch.equal(ref_w[k], got_w[k]) for k in ref_w)


# ---------------------------------------------------------------------------------------------------------------
# QLoRA (NF4 base through bitsandbytes' CPU kernels)
# ---------------------------------------------------------------------------------------------------------------


def test_qlora_with_evaluations_sigkill_then_rerun_is_bit_identical(
    tmp_path: Path, args: list[str], runner: ScriptRunner
) -> None:
    # With evaluations: on CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights for its CPU inference kernel at
    # the first no-grad eval forward, rounding the scales to bf16, so a run that evaluated trains on a different
    # base than one resumed from a checkpoint. That was the ~6e-6 relative loss drift (~1e-4 in the adapter) of
    # QLoRA resumes on CPU; modeling.keep_cpu_4bit_layout keeps one layout, and the resume is bit-exact.
    qargs = with_overrides(args, load_in_4bit="true", max_steps=8, save_steps=3, eval_steps=2, max_eval_samples=4)
    ref = tmp_path / "reference"
    code, text = runner.run(with_overrides(qargs, output_dir=ref), name="qlora-reference")
    assert code == 0, text[-3000:]
    out = tmp_path / "run"
    argv = with_overrides(qargs, output_dir=out)
    proc, _log = runner.start(argv, name="qlora-sigkill")
    wait_for_step(out, 5, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    assert proc.exitcode == -signal.SIGKILL and not (out / "final").exists()
    code, text = runner.run(argv, name="qlora-rerun")
    assert code == 0, text[-3000:]
    assert resumed_from(out) is not None
    ref_loss, got_loss = train_loss_by_step(ref), train_loss_by_step(out)
    assert sorted(got_loss) == list(range(1, 9))
    assert got_loss == ref_loss
    assert note_ids_by_step(out) == note_ids_by_step(ref)
    ref_w, got_w = adapter_tensors(ref / "final"), adapter_tensors(out / "final")
    assert all(bool((ref_w[k] == got_w[k]).all()) for k in ref_w)
