"""Checkpoint manifest, validation, ordering, rotation, resume guards and the preemption flag (no training)."""

from __future__ import annotations

import json
import logging
import os
import signal
from pathlib import Path

import pytest

from dischargesum.cli import UserError
from dischargesum.training import preemption
from dischargesum.training.checkpoint_store import (
    CHECKPOINT_MANIFEST_NAME,
    STAGING_PREFIX,
    CheckpointError,
    RunFacts,
    commit_checkpoint,
    find_latest_valid_checkpoint,
    list_checkpoint_dirs,
    resolve_resume_checkpoint,
    rotate_checkpoints,
    validate_checkpoint,
)

pytestmark = pytest.mark.unit


def _facts(**overrides) -> RunFacts:
    values = dict(
        config_hash="c0ffee",
        data_fingerprint="d4t4",
        base_model="google/medgemma-4b-it",
        quantization={"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
        lora={"r": 32, "lora_alpha": 64, "target_modules": ["q_proj", "v_proj"]},
        max_seq_length=2048,
        per_device_train_batch_size=1,
        gradient_accumulation_steps=8,
        world_size=1,
        versions={"torch": "2.x"},
    )
    values.update(overrides)
    return RunFacts.create(**values)


def _make_checkpoint(output_dir: Path, step: int, facts: RunFacts | None = None, payload: bytes = b"") -> Path:
    """Commit a checkpoint-<step> with the files HF writes (small fake contents) through the real commit path."""
    staging = output_dir / f"{STAGING_PREFIX}{step}"
    staging.mkdir(parents=True)
    (staging / "adapter_model.safetensors").write_bytes(payload or bytes(range(256)) * 8)
    (staging / "adapter_config.json").write_text('{"r": 32}')
    (staging / "optimizer.pt").write_bytes(b"\x01" * 300)
    (staging / "scheduler.pt").write_bytes(b"\x02" * 20)
    (staging / "rng_state.pth").write_bytes(b"\x03" * 40)
    (staging / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (staging / "global_step1").mkdir()  # DeepSpeed-style subdirectory
    (staging / "global_step1" / "shard.pt").write_bytes(b"\x04" * 10)
    final = output_dir / f"checkpoint-{step}"
    commit_checkpoint(staging, final, step=step, facts=facts or _facts(), world_size=1, resumable=True)
    return final


def test_manifest_round_trip_lists_every_file_with_size_and_sha(tmp_path: Path) -> None:
    facts = _facts()
    ckpt = _make_checkpoint(tmp_path, 5, facts)
    assert not (tmp_path / f"{STAGING_PREFIX}5").exists()
    manifest = json.loads((ckpt / CHECKPOINT_MANIFEST_NAME).read_text())
    listed = {e["path"]: e for e in manifest["files"]}
    on_disk = {p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file()} - {CHECKPOINT_MANIFEST_NAME}
    assert set(listed) == on_disk and "global_step1/shard.pt" in listed
    assert listed["optimizer.pt"]["bytes"] == 300 and len(listed["optimizer.pt"]["sha256"]) == 64
    assert manifest["step"] == 5 and manifest["world_size"] == 1
    assert RunFacts.from_dict(manifest["run"]) == facts
    assert manifest["run"]["effective_batch"] == 8 == facts.effective_batch
    status = validate_checkpoint(ckpt)
    assert status.valid and status.step == 5 and status.reason == "ok"


def test_truncated_missing_or_corrupted_files_are_detected(tmp_path: Path) -> None:
    a, b, c, d = (_make_checkpoint(tmp_path, s) for s in (1, 2, 3, 4))
    adapter = a / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:100])  # truncated
    st = validate_checkpoint(a)
    assert not st.valid and "adapter_model.safetensors" in st.reason and "truncated" in st.reason
    (b / "optimizer.pt").unlink()
    st = validate_checkpoint(b)
    assert not st.valid and "optimizer.pt is missing" in st.reason
    blob = bytearray((c / "rng_state.pth").read_bytes())
    blob[0] ^= 0xFF  # same size, different content: only the checksum catches it
    (c / "rng_state.pth").write_bytes(bytes(blob))
    assert validate_checkpoint(c, verify_checksums=False).valid
    st = validate_checkpoint(c)
    assert not st.valid and "sha256" in st.reason
    (d / CHECKPOINT_MANIFEST_NAME).unlink()
    st = validate_checkpoint(d)
    assert not st.valid and CHECKPOINT_MANIFEST_NAME in st.reason
    # an HF-style in-place checkpoint (no manifest) is never valid
    hf = tmp_path / "checkpoint-9"
    hf.mkdir()
    (hf / "trainer_state.json").write_text("{}")
    assert not validate_checkpoint(hf).valid


def test_newest_by_parsed_step_and_invalid_ones_skipped_with_reason(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for step in (9, 10, 2):
        _make_checkpoint(tmp_path, step)
    (tmp_path / "checkpoint-x").mkdir()  # not a checkpoint name
    assert [s for s, _ in list_checkpoint_dirs(tmp_path)] == [2, 9, 10]
    assert find_latest_valid_checkpoint(tmp_path) == tmp_path / "checkpoint-10"
    (tmp_path / "checkpoint-10" / "scheduler.pt").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="dischargesum"):
        assert find_latest_valid_checkpoint(tmp_path) == tmp_path / "checkpoint-9"
    assert "checkpoint-10" in caplog.text and "scheduler.pt has 0 bytes" in caplog.text


def test_rotation_keeps_newest_valid_and_never_leaves_zero(tmp_path: Path) -> None:
    for step in (2, 4, 6, 8):
        _make_checkpoint(tmp_path, step)
    (tmp_path / f"{STAGING_PREFIX}10").mkdir()  # leftover of an interrupted save
    removed = rotate_checkpoints(tmp_path, 2)
    assert sorted(p.name for p in removed) == ["checkpoint-2", "checkpoint-4"]
    assert [s for s, _ in list_checkpoint_dirs(tmp_path)] == [6, 8]
    assert not (tmp_path / f"{STAGING_PREFIX}10").exists()
    # the newest checkpoint is broken: keep-last-1 keeps the newest VALID one and removes the broken one
    (tmp_path / "checkpoint-8" / "adapter_model.safetensors").write_bytes(b"x")
    rotate_checkpoints(tmp_path, 1)
    assert [s for s, _ in list_checkpoint_dirs(tmp_path)] == [6]
    assert validate_checkpoint(tmp_path / "checkpoint-6").valid
    # nothing valid at all: rotation deletes nothing
    (tmp_path / "checkpoint-6" / CHECKPOINT_MANIFEST_NAME).unlink()
    assert rotate_checkpoints(tmp_path, 1) == []
    assert (tmp_path / "checkpoint-6").is_dir()
    # protected (best) checkpoints survive; no limit keeps every valid one
    for step in (12, 14, 16):
        _make_checkpoint(tmp_path, step)
    rotate_checkpoints(tmp_path, 1, protect=[tmp_path / "checkpoint-12"])
    assert [s for s, _ in list_checkpoint_dirs(tmp_path)] == [12, 16]
    rotate_checkpoints(tmp_path, None)
    assert [s for s, _ in list_checkpoint_dirs(tmp_path)] == [12, 16]


def test_recommit_of_same_step_replaces_it_atomically(tmp_path: Path) -> None:
    _make_checkpoint(tmp_path, 3, payload=b"a" * 64)
    (tmp_path / "checkpoint-3" / "optimizer.pt").write_bytes(b"")  # now invalid
    _make_checkpoint(tmp_path, 3, payload=b"b" * 64)
    assert validate_checkpoint(tmp_path / "checkpoint-3").valid
    assert (tmp_path / "checkpoint-3" / "adapter_model.safetensors").read_bytes() == b"b" * 64
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-3"]


@pytest.mark.parametrize(
    ("field", "change"),
    [
        ("effective_batch", {"gradient_accumulation_steps": 4}),
        ("effective_batch", {"world_size": 2}),
        ("data_fingerprint", {"data_fingerprint": "other"}),
        ("base_model", {"base_model": "google/gemma-3-4b-it"}),
        ("quantization", {"quantization": {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4"}}),
        ("lora", {"lora": {"r": 32, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}}),
        ("max_seq_length", {"max_seq_length": 1024}),
    ],
)
def test_resume_guards_refuse_and_override_allows(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, field: str, change: dict
) -> None:
    ckpt = _make_checkpoint(tmp_path, 4, _facts())
    other = _facts(**change)
    for setting in ("auto", str(ckpt)):
        with pytest.raises(CheckpointError, match=rf"`{field}` differs") as info:
            resolve_resume_checkpoint(setting, tmp_path, other, allow_resume_mismatch=False)
        assert "--allow_resume_mismatch" in str(info.value)
    with caplog.at_level(logging.WARNING, logger="dischargesum"):
        assert resolve_resume_checkpoint("auto", tmp_path, other, allow_resume_mismatch=True) == ckpt
    assert f"`{field}` differs" in caplog.text


@pytest.mark.parametrize(
    "lora",
    [
        {"r": 16, "lora_alpha": 64, "target_modules": ["q_proj", "v_proj"]},
        {"r": 32, "lora_alpha": 64, "target_modules": ["q_proj", "k_proj", "v_proj"]},
    ],
)
def test_lora_shape_mismatch_is_refused_even_with_override(tmp_path: Path, lora: dict) -> None:
    # allow_resume_mismatch with another rank ended in a load_state_dict size-mismatch traceback
    ckpt = _make_checkpoint(tmp_path, 4, _facts())
    for setting in ("auto", str(ckpt)):
        with pytest.raises(CheckpointError, match=r"cannot be loaded even with `--allow_resume_mismatch true`"):
            resolve_resume_checkpoint(setting, tmp_path, _facts(lora=lora), allow_resume_mismatch=True)
    # without the override the refusal must not suggest it
    with pytest.raises(CheckpointError, match=r"`lora` differs.*cannot be loaded even with"):
        resolve_resume_checkpoint("auto", tmp_path, _facts(lora=lora), allow_resume_mismatch=False)


def test_same_effective_batch_on_other_world_size_resumes_with_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ckpt = _make_checkpoint(tmp_path, 4, _facts())
    other = _facts(world_size=2, gradient_accumulation_steps=4)
    with caplog.at_level(logging.WARNING, logger="dischargesum"):
        assert resolve_resume_checkpoint("auto", tmp_path, other, allow_resume_mismatch=False) == ckpt
    assert "world size 2" in caplog.text


def test_resolve_none_auto_and_explicit_invalid(tmp_path: Path) -> None:
    facts = _facts()
    assert resolve_resume_checkpoint("none", tmp_path, facts, False) is None
    assert resolve_resume_checkpoint("auto", tmp_path / "missing", facts, False) is None
    bad = _make_checkpoint(tmp_path, 7, facts)
    (bad / "adapter_model.safetensors").write_bytes(b"short")
    assert resolve_resume_checkpoint("auto", tmp_path, facts, False) is None  # only an invalid one: fresh start
    with pytest.raises(CheckpointError, match=r"not a valid checkpoint: adapter_model\.safetensors") as info:
        resolve_resume_checkpoint(str(bad), tmp_path, facts, False)
    assert isinstance(info.value, UserError)
    with pytest.raises(CheckpointError, match="no such directory"):
        resolve_resume_checkpoint(str(tmp_path / "checkpoint-99"), tmp_path, facts, False)
    good = _make_checkpoint(tmp_path, 3, facts)
    assert resolve_resume_checkpoint("auto", tmp_path, facts, False) == good


def test_signal_sets_flag_without_raising_and_second_signal_is_harmless() -> None:
    old = {sig: signal.getsignal(sig) for sig in preemption.PREEMPTION_SIGNALS}
    preemption.reset_preemption_state()
    preemption._state["installed"] = False
    try:
        assert preemption.install_preemption_handlers()
        assert preemption.install_preemption_handlers()  # idempotent
        assert not preemption.preemption_requested()
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # second signal: still alive, first one recorded
        assert preemption.preemption_requested()
        assert preemption.preemption_signal_name() == "SIGUSR1"
        assert preemption.signals_received() == 2
        assert preemption.agree_across_ranks(True) and not preemption.agree_across_ranks(False)  # not distributed
        assert preemption.PREEMPTED_EXIT_CODE == 143
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        preemption._state["installed"] = False
        preemption.reset_preemption_state()


def test_supervisor_protocol_registration_stop_file_exit_record_and_loading_stop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = {sig: signal.getsignal(sig) for sig in preemption.PREEMPTION_SIGNALS}
    preemption.reset_preemption_state()
    preemption._state["installed"] = False
    monkeypatch.setenv(preemption.LAUNCH_DIR_ENV, str(tmp_path))
    (tmp_path / preemption.STOP_FILE).write_text("SIGTERM")  # the supervisor was signalled before we registered
    try:
        preemption.install_preemption_handlers()
        registered = json.loads((tmp_path / f"trainer-{os.getpid()}.json").read_text())
        assert registered["pid"] == os.getpid() and registered["rank"] == 0
        assert preemption.preemption_requested() and preemption.preemption_signal_name() == "SIGTERM"
        with pytest.raises(preemption.PreemptedBeforeTraining, match=r"\(model loaded\): nothing to save yet"):
            preemption.stop_if_preempted("model loaded")
        preemption.set_preemption_outcome("nothing to save yet")
        preemption.record_exit(143)
        record = json.loads((tmp_path / f"exit-{os.getpid()}.json").read_text())
        assert record["exit_code"] == 143 and record["preempted"] and record["outcome"] == "nothing to save yet"
        assert record["signal"] == "SIGTERM" and record["signal_at"] > 0
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        preemption._state["installed"] = False
        preemption.reset_preemption_state()
    preemption.stop_if_preempted("no signal")  # no flag: nothing raised


def test_mark_interrupted_only_touches_a_running_manifest(tmp_path: Path) -> None:
    from dischargesum.manifest import MANIFEST_NAME, mark_interrupted, read_manifest

    assert mark_interrupted(tmp_path, checkpoint=None) is None  # no manifest: nothing written
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({"stage": "sft_qlora", "status": "complete"}))
    assert mark_interrupted(tmp_path) is None and read_manifest(tmp_path)["status"] == "complete"
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({"stage": "sft_qlora", "status": "running"}))
    mark_interrupted(tmp_path, interrupted_by="SIGTERM", checkpoint="checkpoint-4")
    manifest = read_manifest(tmp_path)
    assert manifest["status"] == "interrupted" and manifest["checkpoint"] == "checkpoint-4"
    assert manifest["interrupted_by"] == "SIGTERM" and manifest["interrupted_at"]


def test_run_facts_normalise_and_reject_incomplete() -> None:
    facts = _facts(lora={"r": 8, "target_modules": ("q_proj",)})
    assert facts.lora["target_modules"] == ["q_proj"]
    assert RunFacts.from_dict(facts.to_dict()) == facts
    with pytest.raises(ValueError, match="data_fingerprint"):
        RunFacts.from_dict({k: v for k, v in facts.to_dict().items() if k != "data_fingerprint"})


def test_the_checkpoint_store_needs_no_trainer_and_no_fault_hooks_without_the_variables(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import subprocess
    import sys

    from dischargesum.training import fault_injection

    # The store is plain files: importing it pulls in neither transformers nor torch (generate and the CLI read it).
    code = (
        "import sys, dischargesum.training.checkpoint_store; "
        "print('transformers' in sys.modules, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=os.environ)
    assert out.stdout.split() == ["False", "False"]
    # The save path gets no fault hooks at all unless a DISCHARGESUM_FAULT_* variable is set.
    for name in ("DISCHARGESUM_FAULT_AFTER_FILE", "DISCHARGESUM_FAULT_AT_STEP", "DISCHARGESUM_FAULT_TRACE",
                 "DISCHARGESUM_FAULT_PAUSE"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    assert fault_injection.save_fault_injector(2) is None
    monkeypatch.setenv("DISCHARGESUM_FAULT_AT_STEP", "3")
    injector = fault_injection.save_fault_injector(2)
    assert injector is not None and not injector.active  # armed for step 3 only
    from dischargesum.training.checkpoint_trainer import PreemptionCallback, make_checkpoint_callbacks

    names = [type(cb).__name__ for cb in make_checkpoint_callbacks(_facts(), "out", None)]
    assert names == ["CheckpointRotationCallback", "PreemptionCallback"]
    monkeypatch.setenv("DISCHARGESUM_FAULT_PAUSE", "evaluate")
    callbacks = make_checkpoint_callbacks(_facts(), "out", None)
    # the pause runs right before the preemption check of the same prediction step
    assert [type(cb).__name__ for cb in callbacks] == [
        "CheckpointRotationCallback",
        "EvaluationPause",
        "PreemptionCallback",
    ]
    assert isinstance(callbacks[2], PreemptionCallback)
