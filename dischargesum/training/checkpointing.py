"""Checkpoints you can trust after a crash: atomic commit with a manifest, validation, rotation, resume guards.

Why our own layer: the HF Trainer writes ``checkpoint-<step>`` in place (a kill mid-save leaves a directory that
looks like a checkpoint), resumes from the highest-numbered directory without checking it is complete, and its
rotation can delete the last good checkpoint while keeping a broken one. Here:

* **Commit protocol** (:class:`CheckpointingTrainerMixin`): every rank writes into ``.staging-checkpoint-<step>``
  with HF's own writers (adapter/model, optimizer, scheduler, scaler, per-rank RNG states, trainer state — so
  DeepSpeed and FSDP keep saving collectively); after a barrier the committing process fsyncs every file, hashes
  it, writes ``checkpoint_manifest.json`` LAST, fsyncs, and renames the directory to ``checkpoint-<step>`` (one
  atomic rename on the same filesystem); a final barrier releases the ranks. Only that process renames, so there
  is no race. A directory named ``checkpoint-<step>`` without a matching manifest is never used.
* **Validation** (:func:`validate_checkpoint`): the manifest parses, names the same step, and every listed file
  exists with the recorded size (and sha256, unless asked for the quick check).
* **Resume** (:func:`resolve_resume_checkpoint`): ``auto`` takes the newest *valid* checkpoint by parsed step
  (``checkpoint-10`` after ``checkpoint-9``), warning about each invalid one and why; an explicit path that is
  invalid is an error (exit 2), never a silent fresh start. Resume guards refuse a checkpoint whose effective batch,
  data fingerprint, base model, quantisation, LoRA config or ``max_seq_length`` differ from this run's.
* **Rotation** (:func:`rotate_checkpoints`): runs only after a newer checkpoint is committed, keeps the last K
  valid ones by step, removes invalid leftovers and stale staging directories, and never deletes the last valid one.
* **Preemption** (:class:`PreemptionCallback`, :mod:`dischargesum.training.preemption`): SIGTERM / SIGUSR1 set a
  flag; at the next micro-batch, step end or prediction step of an evaluation the ranks agree (all-reduce MAX),
  commit a full checkpoint and stop; the entry point exits with :data:`PREEMPTED_EXIT_CODE` (143). Between
  micro-batches the partial accumulation is dropped and the last completed step is saved (with the RNG state it
  left), so the stop does not wait for a long optimizer step. A signal that lands during a save is seen right
  after the commit (``on_save``): that checkpoint is the one to resume from, nothing more is trained or saved.
* **Exact resume**: weights, optimizer, scheduler, per-rank RNG and data position continue exactly; nothing runs
  between a preemption checkpoint and the exit (no epoch-end evaluation, no second save) and a resume at or past
  ``max_steps`` trains nothing (HF would train one extra step), so a resumed run equals an uninterrupted one.

Test-only fault injection: ``DISCHARGESUM_FAULT_AFTER_FILE=N`` SIGKILLs the committing process at the N-th event of
a checkpoint save (each file appearing in the staging directory, then ``manifest``, ``commit`` and each rotation
deletion), in the save at step ``DISCHARGESUM_FAULT_AT_STEP`` (default: the first save of the process);
``DISCHARGESUM_FAULT_TRACE=FILE`` appends that save's events to FILE. ``DISCHARGESUM_FAULT_PAUSE=PHASE`` sleeps
``DISCHARGESUM_FAULT_PAUSE_SECONDS`` (default 3) once, in ``load`` (sft_qlora, before the model is loaded), ``save``
(after the first file of that save) or ``evaluate`` (at the first prediction step), and appends ``pause:PHASE`` to
the trace first: the signal tests use it to land a signal inside that phase. Never set them outside tests.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import os
import re
import shutil
import signal
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers.trainer_callback import TrainerCallback

from dischargesum.cli import UserError
from dischargesum.logging_utils import get_logger, process_rank
from dischargesum.manifest import canonical_hash, library_versions
from dischargesum.training.preemption import (
    PREEMPTED_EXIT_CODE,
    agree_across_ranks,
    install_preemption_handlers,
    preemption_requested,
    preemption_signal_name,
)

__all__ = [
    "CHECKPOINT_MANIFEST_NAME",
    "PREEMPTED_EXIT_CODE",
    "CheckpointError",
    "CheckpointRotationCallback",
    "CheckpointStatus",
    "CheckpointingTrainerMixin",
    "PreemptionCallback",
    "RunFacts",
    "commit_checkpoint",
    "find_latest_valid_checkpoint",
    "list_checkpoint_dirs",
    "make_checkpoint_callbacks",
    "preemption_requested",
    "resolve_resume_checkpoint",
    "rotate_checkpoints",
    "validate_checkpoint",
]

logger = get_logger(__name__)

CHECKPOINT_PREFIX = "checkpoint"
CHECKPOINT_MANIFEST_NAME = "checkpoint_manifest.json"
MANIFEST_FORMAT = "dischargesum-checkpoint/1"
STAGING_PREFIX = ".staging-checkpoint-"
TRASH_PREFIX = ".trash-checkpoint-"
TRAINER_STATE_NAME = "trainer_state.json"  # transformers.trainer.TRAINER_STATE_NAME
_CHECKPOINT_RE = re.compile(rf"^{CHECKPOINT_PREFIX}-(\d+)$")

FAULT_AFTER_FILE_ENV = "DISCHARGESUM_FAULT_AFTER_FILE"
FAULT_AT_STEP_ENV = "DISCHARGESUM_FAULT_AT_STEP"
FAULT_TRACE_ENV = "DISCHARGESUM_FAULT_TRACE"
FAULT_PAUSE_ENV = "DISCHARGESUM_FAULT_PAUSE"
FAULT_PAUSE_SECONDS_ENV = "DISCHARGESUM_FAULT_PAUSE_SECONDS"

# Libraries whose versions go into RunFacts: a change can alter numerics, so a resume across versions warns.
_FACT_LIBRARIES = ("dischargesum", "torch", "transformers", "trl", "peft", "accelerate", "bitsandbytes", "deepspeed")


class CheckpointError(UserError):
    """A checkpoint cannot be resumed from (invalid, or recorded for a different run); exit code 2."""


# ---------------------------------------------------------------------------------------------------------------
# What a run is: recorded in every checkpoint, compared on resume
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class RunFacts:
    """The facts a checkpoint must share with the run that resumes it (plus a few recorded for the audit trail)."""

    config_hash: str
    data_fingerprint: str
    base_model: str
    quantization: dict[str, Any]
    lora: dict[str, Any]
    max_seq_length: int
    world_size: int
    per_device_train_batch_size: int
    gradient_accumulation_steps: int
    library_versions: dict[str, str | None] = field(default_factory=dict)

    @property
    def effective_batch(self) -> int:
        """Sequences per optimizer step: world size x per-device batch x gradient accumulation."""
        return self.world_size * self.per_device_train_batch_size * self.gradient_accumulation_steps

    @classmethod
    def create(
        cls,
        *,
        config_hash: str,
        data_fingerprint: str,
        base_model: str,
        quantization: dict[str, Any] | None,
        lora: dict[str, Any],
        max_seq_length: int,
        per_device_train_batch_size: int,
        gradient_accumulation_steps: int,
        world_size: int | None = None,
        versions: dict[str, str | None] | None = None,
    ) -> RunFacts:
        """Build the facts of this run; ``world_size`` defaults to the launcher's ``WORLD_SIZE`` (1 when unset),
        ``versions`` to the installed versions of the training libraries. ``quantization`` is None or {} for
        non-quantised training. Values are normalised through JSON (tuples become lists, dtypes strings), so the
        facts compare equal to what a checkpoint recorded.
        """
        if world_size is None:
            world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
        return cls(
            config_hash=str(config_hash),
            data_fingerprint=str(data_fingerprint),
            base_model=str(base_model),
            quantization=_jsonable(dict(quantization or {})),
            lora=_jsonable(dict(lora)),
            max_seq_length=int(max_seq_length),
            world_size=int(world_size),
            per_device_train_batch_size=int(per_device_train_batch_size),
            gradient_accumulation_steps=int(gradient_accumulation_steps),
            library_versions=dict(versions) if versions is not None else library_versions(_FACT_LIBRARIES),
        )

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["effective_batch"] = self.effective_batch
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunFacts:
        """Rebuild facts from :meth:`to_dict` output; unknown keys (newer formats) are ignored.

        Raises:
            ValueError: a required key is missing.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in data and f.name != "library_versions"]
        if missing:
            raise ValueError(f"run facts lack {missing}")
        return cls(**{k: v for k, v in data.items() if k in names})


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str))


# Resume guards: (field, how to read it from facts, what the user should do).
_GUARDS: tuple[tuple[str, str], ...] = (
    ("effective_batch", "keep world size x per_device_train_batch_size x gradient_accumulation_steps the same"),
    ("data_fingerprint", "point `dataset_dir` at the data the checkpoint was trained on"),
    ("base_model", "set `model_name_or_path` to the checkpoint's base model"),
    ("quantization", "use the checkpoint's quantisation settings"),
    ("lora", "use the checkpoint's LoRA settings (r, alpha, dropout, target modules)"),
    ("max_seq_length", "set `max_seq_length` to the checkpoint's value"),
)


# LoRA facts that set the adapter's tensor shapes: a checkpoint that differs in them cannot be loaded at all (PEFT's
# load_state_dict fails with a size-mismatch traceback), so `allow_resume_mismatch` cannot override them.
_SHAPE_LORA_KEYS = ("r", "target_modules")


def _guard_value(facts: dict[str, Any], name: str) -> Any:
    if name == "effective_batch":
        if "effective_batch" in facts:
            return facts["effective_batch"]
        return (
            int(facts.get("world_size", 1))
            * int(facts.get("per_device_train_batch_size", 1))
            * int(facts.get("gradient_accumulation_steps", 1))
        )
    return facts.get(name)


def check_resume_guards(
    checkpoint: Path, recorded: dict[str, Any], facts: RunFacts, *, allow_resume_mismatch: bool
) -> list[str]:
    """Compare this run's facts with a checkpoint's record; return the mismatch messages that were allowed.

    Raises:
        CheckpointError: a guarded field differs and ``allow_resume_mismatch`` is False (message names the field),
            or the LoRA rank / target modules differ (never overridable: the tensors would not load).
    """
    current = facts.to_dict()
    problems: list[str] = []
    for name, fix in _GUARDS:
        was, now = _guard_value(recorded, name), _guard_value(current, name)
        if canonical_hash(was) != canonical_hash(now):
            problems.append(f"`{name}` differs: the checkpoint recorded {was!r}, this run has {now!r} ({fix})")
    was_lora, now_lora = recorded.get("lora") or {}, current["lora"] or {}
    shape = [k for k in _SHAPE_LORA_KEYS if canonical_hash(was_lora.get(k)) != canonical_hash(now_lora.get(k))]
    unloadable = (
        "the LoRA "
        + ", ".join(f"`{k}` ({was_lora.get(k)!r} -> {now_lora.get(k)!r})" for k in shape)
        + " sets the adapter's tensor shapes, so this checkpoint cannot be loaded even with "
        "`--allow_resume_mismatch true`: use the checkpoint's lora_r / lora_target_modules, or start a fresh "
        "`output_dir`"
    )
    if shape and allow_resume_mismatch:
        raise CheckpointError(f"refusing to resume from {checkpoint}: {unloadable}.")
    if problems and not allow_resume_mismatch:
        raise CheckpointError(
            f"refusing to resume from {checkpoint}: "
            + "; ".join(problems)
            + ". Resuming would silently train a different run. "
            + (
                f"Note: {unloadable}."
                if shape
                else "Fix the setting, start a fresh `output_dir`, or pass `--allow_resume_mismatch true` to resume "
                "anyway."
            )
        )
    for problem in problems:
        logger.warning("resuming from %s although %s (allow_resume_mismatch is set)", checkpoint, problem)
    if recorded.get("world_size") != current["world_size"] and not problems:
        logger.warning(
            "resuming from %s with world size %s (checkpoint: %s): the effective batch is unchanged, but data order "
            "across ranks and per-rank RNG streams differ, so the run will not match an uninterrupted one exactly",
            checkpoint,
            current["world_size"],
            recorded.get("world_size"),
        )
    if recorded.get("config_hash") != current["config_hash"]:
        logger.info("config changed since %s was written (hash %s -> %s)", checkpoint, recorded.get("config_hash"),
                    current["config_hash"])  # fmt: skip
    was_versions, now_versions = recorded.get("library_versions") or {}, current["library_versions"]
    changed = {k: (was_versions.get(k), v) for k, v in now_versions.items() if was_versions.get(k, v) != v}
    if changed:
        logger.warning("library versions changed since %s was written (%s): numerics may differ", checkpoint, changed)
    return problems


# ---------------------------------------------------------------------------------------------------------------
# Finding and validating checkpoints
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class CheckpointStatus:
    path: Path
    valid: bool
    reason: str
    step: int | None = None
    manifest: dict[str, Any] | None = None


def parse_checkpoint_step(name: str) -> int | None:
    """The step of a ``checkpoint-<step>`` directory name, or None for any other name."""
    match = _CHECKPOINT_RE.match(name)
    return int(match.group(1)) if match else None


def list_checkpoint_dirs(output_dir: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``checkpoint-<step>`` directory, oldest step first (numeric, not by name)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        step = parse_checkpoint_step(child.name)
        if step is not None and child.is_dir():
            found.append((step, child))
    return sorted(found, key=lambda item: item[0])


def _read_manifest(path: Path) -> tuple[dict[str, Any] | None, str]:
    manifest_path = path / CHECKPOINT_MANIFEST_NAME
    if not manifest_path.is_file():
        return None, f"no {CHECKPOINT_MANIFEST_NAME} (the save was interrupted or the directory was not written here)"
    try:
        data = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, f"{CHECKPOINT_MANIFEST_NAME} is unreadable ({exc})"
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        return None, f"{CHECKPOINT_MANIFEST_NAME} is not a {MANIFEST_FORMAT} manifest"
    return data, ""


def validate_checkpoint(path: str | Path, *, verify_checksums: bool = True) -> CheckpointStatus:
    """Check a checkpoint directory against its manifest (sizes always, sha256 unless ``verify_checksums=False``).

    Never raises for a bad checkpoint: the returned status says what is wrong.
    """
    p = Path(path)
    step = parse_checkpoint_step(p.name)
    if not p.is_dir():
        return CheckpointStatus(p, False, "no such directory", step)
    manifest, problem = _read_manifest(p)
    if manifest is None:
        return CheckpointStatus(p, False, problem, step)
    recorded_step = manifest.get("step")
    if step is not None and recorded_step != step:
        return CheckpointStatus(p, False, f"manifest records step {recorded_step}, directory name says {step}", step)
    files = manifest.get("files")
    if not isinstance(files, list) or not files:
        return CheckpointStatus(p, False, "manifest lists no files", step, manifest)
    names = set()
    for entry in files:
        rel = str(entry.get("path", ""))
        names.add(rel)
        f = p / rel
        if not rel or ".." in Path(rel).parts or not f.is_file():
            return CheckpointStatus(p, False, f"{rel} is missing", step, manifest)
        size = f.stat().st_size
        if size != entry.get("bytes"):
            return CheckpointStatus(
                p, False, f"{rel} has {size} bytes, the manifest recorded {entry.get('bytes')} (truncated?)", step,
                manifest,
            )  # fmt: skip
    if TRAINER_STATE_NAME not in names:
        return CheckpointStatus(p, False, f"manifest lists no {TRAINER_STATE_NAME}", step, manifest)
    if verify_checksums:
        for entry in files:
            digest = _sha256(p / entry["path"])
            if digest != entry.get("sha256"):
                reason = f"{entry['path']} does not match its recorded sha256 (corrupted?)"
                return CheckpointStatus(p, False, reason, step, manifest)
    return CheckpointStatus(p, True, "ok", step if step is not None else recorded_step, manifest)


def _latest_valid_status(output_dir: str | Path, *, verify_checksums: bool) -> CheckpointStatus | None:
    for _step, path in reversed(list_checkpoint_dirs(output_dir)):
        status = validate_checkpoint(path, verify_checksums=verify_checksums)
        if status.valid:
            return status
        logger.warning("skipping %s: %s", path, status.reason)
    return None


def find_latest_valid_checkpoint(output_dir: str | Path, *, verify_checksums: bool = True) -> Path | None:
    """The valid checkpoint with the highest step in ``output_dir``; warns about each newer invalid one."""
    status = _latest_valid_status(output_dir, verify_checksums=verify_checksums)
    return None if status is None else status.path


def resolve_resume_checkpoint(
    setting: str, output_dir: str | Path, facts: RunFacts, allow_resume_mismatch: bool
) -> Path | None:
    """Turn ``resume_from_checkpoint`` (``auto`` / ``none`` / a path) into the checkpoint to resume from.

    Raises:
        CheckpointError: an explicitly named checkpoint is missing or invalid, or a resume guard fails (unless
            ``allow_resume_mismatch``).
    """
    value = str(setting).strip()
    if value.lower() in ("none", "", "false", "no"):
        return None
    if value.lower() == "auto":
        latest = _latest_valid_status(output_dir, verify_checksums=True)
        if latest is None:
            if list_checkpoint_dirs(output_dir):
                logger.warning("no valid checkpoint in %s: starting from the base model", output_dir)
            return None
        found, status = latest.path, latest
    else:
        found = Path(value)
        status = validate_checkpoint(found)
        if not status.valid:
            raise CheckpointError(
                f"`resume_from_checkpoint` = {value} is not a valid checkpoint: {status.reason}. Point it at a "
                f"committed checkpoint-<step> directory (one with {CHECKPOINT_MANIFEST_NAME}), or use `auto` for "
                "the newest valid one, or `none` to start fresh."
            )
    assert status.manifest is not None  # valid implies a manifest
    check_resume_guards(found, status.manifest.get("run") or {}, facts, allow_resume_mismatch=allow_resume_mismatch)
    logger.info("resuming from %s (step %s)", found, status.step)
    return found


def checkpoint_global_step(path: str | Path) -> int | None:
    """``global_step`` recorded in a checkpoint's trainer state (None when unreadable)."""
    try:
        return int(json.loads((Path(path) / TRAINER_STATE_NAME).read_text(encoding="utf-8"))["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


# ---------------------------------------------------------------------------------------------------------------
# Commit and rotation (committing process only)
# ---------------------------------------------------------------------------------------------------------------


def _sha256(path: Path, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def _fsync_and_hash(path: Path, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb+") as fh:
        while block := fh.read(chunk_bytes):
            digest.update(block)
        os.fsync(fh.fileno())
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems (and Windows) cannot fsync a directory; the rename is still atomic
        pass
    finally:
        os.close(fd)


def _remove_tree(path: Path) -> None:
    """Delete a directory by renaming it to a trash name first, so a crash mid-delete never leaves a directory that
    looks like a checkpoint (or a staging dir that a later save would trip over)."""
    if not path.exists():
        return
    if not path.name.startswith(TRASH_PREFIX):
        trash = path.parent / f"{TRASH_PREFIX}{path.name}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(path, trash)
            path = trash
        except OSError:
            pass
    shutil.rmtree(path, ignore_errors=True)


_paused_phases: set[str] = set()


def fault_pause(phase: str) -> None:
    """Test-only: sleep once in ``phase`` when ``DISCHARGESUM_FAULT_PAUSE`` names it (see the module docstring)."""
    if os.environ.get(FAULT_PAUSE_ENV, "") != phase or phase in _paused_phases:
        return
    _paused_phases.add(phase)
    seconds = float(os.environ.get(FAULT_PAUSE_SECONDS_ENV, "") or 3)
    trace = os.environ.get(FAULT_TRACE_ENV, "")
    if trace:
        with open(trace, "a", encoding="utf-8") as fh:
            fh.write(f"pause:{phase}\trank{process_rank()}\n")
    logger.warning("fault injection: pausing %.1f s in %s", seconds, phase)
    time.sleep(seconds)  # a signal runs its handler and the sleep goes on (PEP 475): the pause keeps its length


class _FaultInjector:
    """Test-only crash points in the save path (see the module docstring). Inert unless the env var is set."""

    _saves_seen = 0

    def __init__(self, step: int) -> None:
        raw = os.environ.get(FAULT_AFTER_FILE_ENV, "")
        at_step = os.environ.get(FAULT_AT_STEP_ENV, "")
        _FaultInjector._saves_seen += 1
        armed = int(at_step) == step if at_step else _FaultInjector._saves_seen == 1
        self.trace = os.environ.get(FAULT_TRACE_ENV, "") if armed else ""
        self.crash_at = int(raw) if raw and armed else 0
        self.pause = armed and os.environ.get(FAULT_PAUSE_ENV, "") == "save"
        self.events = 0
        self.seen: set[str] = set()

    @property
    def active(self) -> bool:
        return bool(self.crash_at or self.trace or self.pause)

    def event(self, name: str) -> None:
        if not self.active:
            return
        self.events += 1
        if self.trace:
            with open(self.trace, "a", encoding="utf-8") as fh:
                fh.write(f"{self.events}\t{name}\n")
        if self.crash_at and self.events >= self.crash_at:
            logger.warning("fault injection: SIGKILL after save event %d (%s)", self.events, name)
            os.kill(os.getpid(), signal.SIGKILL)
        if self.pause:
            fault_pause("save")

    def files_appeared(self, staging: Path) -> None:
        if not self.active or not staging.is_dir():
            return
        for f in sorted(p for p in staging.rglob("*") if p.is_file()):
            rel = f.relative_to(staging).as_posix()
            if rel not in self.seen:
                self.seen.add(rel)
                self.event(f"write:{rel}")


def commit_checkpoint(
    staging: Path,
    final_dir: Path,
    *,
    step: int,
    facts: RunFacts,
    world_size: int,
    resumable: bool,
    extra: dict[str, Any] | None = None,
    fault: _FaultInjector | None = None,
) -> dict[str, Any]:
    """Fsync and hash every file in ``staging``, write the manifest last, and rename ``staging`` to ``final_dir``.

    Call on ONE process, after every rank finished writing into ``staging``. An existing ``final_dir`` (a re-save
    of the same step) is moved aside first and deleted after the rename.

    Raises:
        OSError: the filesystem refused a write or the rename.
    """
    t0 = time.perf_counter()
    files = sorted(p for p in staging.rglob("*") if p.is_file() and p.name != CHECKPOINT_MANIFEST_NAME)
    entries = []
    total = 0
    for f in files:
        size = f.stat().st_size
        entries.append({"path": f.relative_to(staging).as_posix(), "bytes": size, "sha256": _fsync_and_hash(f)})
        total += size
    for d in sorted({f.parent for f in files} | {staging}, key=lambda q: len(q.parts), reverse=True):
        _fsync_dir(d)
    manifest = {
        "format": MANIFEST_FORMAT,
        "step": step,
        "committed_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "world_size": world_size,
        "resumable": resumable,
        "total_bytes": total,
        "run": facts.to_dict(),
        **(extra or {}),
        "files": entries,
    }
    manifest_path = staging / CHECKPOINT_MANIFEST_NAME
    with open(manifest_path, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(manifest, indent=2, default=str) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    _fsync_dir(staging)
    if fault is not None:
        fault.event("manifest")
    replaced = None
    if final_dir.exists():
        replaced = final_dir.parent / f"{TRASH_PREFIX}{final_dir.name}-{uuid.uuid4().hex[:8]}"
        os.rename(final_dir, replaced)
    os.rename(staging, final_dir)
    _fsync_dir(final_dir.parent)
    if fault is not None:
        fault.event("commit")
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)
    manifest["commit_seconds"] = round(time.perf_counter() - t0, 3)
    return manifest


def clean_leftovers(output_dir: str | Path) -> list[Path]:
    """Remove staging and trash directories left by interrupted saves or deletions (committing process only)."""
    root = Path(output_dir)
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    for child in root.iterdir():
        if child.is_dir() and child.name.startswith((STAGING_PREFIX, TRASH_PREFIX)):
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child)
    return removed


def rotate_checkpoints(
    output_dir: str | Path,
    save_total_limit: int | None,
    *,
    protect: Iterable[str | Path] = (),
    fault: _FaultInjector | None = None,
) -> list[Path]:
    """Keep the newest ``save_total_limit`` valid checkpoints (by step; all when None/<=0); return what was removed.

    Also removes invalid ``checkpoint-*`` directories and staging/trash leftovers — but only when at least one
    valid checkpoint exists, and never the newest valid one. Call only after a checkpoint was committed, on the
    committing process. Validity here is the quick check (manifest + sizes); resume re-verifies checksums.
    """
    root = Path(output_dir)
    clean_leftovers(root)
    statuses = [validate_checkpoint(p, verify_checksums=False) for _s, p in list_checkpoint_dirs(root)]
    valid = [s for s in statuses if s.valid]
    if not valid:
        logger.warning("no valid checkpoint in %s: rotation deletes nothing", root)
        return []
    protected = {Path(p).resolve() for p in protect}
    keep = valid if not save_total_limit or save_total_limit <= 0 else valid[-save_total_limit:]
    keep_paths = {s.path.resolve() for s in keep} | protected
    removed = []
    for status in statuses:  # oldest first
        if status.path.resolve() in keep_paths:
            continue
        if status.valid:
            logger.info("rotation: removing %s (keeping the newest %s)", status.path, save_total_limit)
        else:
            logger.warning("rotation: removing invalid %s (%s)", status.path, status.reason)
        _remove_tree(status.path)
        removed.append(status.path)
        if fault is not None:
            fault.event(f"rotate:{status.path.name}")
    return removed


# ---------------------------------------------------------------------------------------------------------------
# Trainer integration
# ---------------------------------------------------------------------------------------------------------------


class PreemptedDuringEvaluation(Exception):
    """Raised out of an evaluation loop when the ranks agreed to stop; the mixin turns it into save + stop."""


class CheckpointRotationCallback(TrainerCallback):
    """Holds the run's facts for the manifest; rotates checkpoints after each commit (committing process only)."""

    def __init__(self, facts: RunFacts, output_dir: str | Path, save_total_limit: int | None) -> None:
        self.facts = facts
        self.output_dir = Path(output_dir)
        self.save_total_limit = save_total_limit
        self._pending_fault: _FaultInjector | None = None

    def on_save(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if args.should_save:
            protect = [state.best_model_checkpoint] if state.best_model_checkpoint else []
            fault, self._pending_fault = self._pending_fault, None
            rotate_checkpoints(args.output_dir, self.save_total_limit, protect=protect, fault=fault)
        return control


def capture_rng_state() -> dict[str, Any]:
    """The generator states HF's ``_save_rng_state`` records (python, numpy, torch CPU, every CUDA device)."""
    import random

    import numpy as np
    import torch

    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "cpu": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_state(states: dict[str, Any]) -> None:
    import random

    import numpy as np
    import torch

    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["cpu"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class PreemptionCallback(TrainerCallback):
    """Installs the signal handlers and agrees on the preemption flag across ranks at every micro-batch, step end
    and prediction step; on agreement asks the trainer to commit a full checkpoint and stop.

    Mid-step (between two micro-batches of a gradient-accumulation step) the partial accumulation is dropped and
    the checkpoint is the state after the last *completed* step — weights, optimizer, scheduler and data position
    are untouched until the optimizer step, and the RNG state is the one captured when the dropped step began — so
    the rerun redoes that step exactly. Why: a step of the MedGemma recipe (4 x 8 x 2048 tokens) takes longer than
    a spot VM's warning; waiting for its end could miss the 30 s before SIGKILL. Not done under DeepSpeed (its
    engine tracks micro-steps itself), before the first step, or in the first step of an epoch (a resume there
    re-draws the epoch's shuffle seed after restoring the RNG): those wait for the step end.
    """

    def __init__(self) -> None:
        self.stopped_at_step: int | None = None
        self.stopped_mid_step = False
        self.saved_after_stop = False
        self.allow_mid_step = True  # the mixin turns it off under DeepSpeed
        self.rng_at_step_begin: dict[str, Any] | None = None

    def on_train_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        install_preemption_handlers()
        return control

    def on_step_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if self.allow_mid_step and args.gradient_accumulation_steps > 1:
            self.rng_at_step_begin = capture_rng_state()
        return control

    def on_substep_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        # Every rank evaluates the same condition from the same state, so the collective below stays matched.
        at_epoch_start = state.epoch is not None and float(state.epoch).is_integer()
        if not self.allow_mid_step or state.global_step == 0 or at_epoch_start or self.stopped_at_step is not None:
            return control
        if agree_across_ranks(preemption_requested()):
            self._stop(state, control, mid_step=True)
        return control

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if self.stopped_at_step is None and agree_across_ranks(preemption_requested()):
            self._stop(state, control, mid_step=False)
        return control

    def _stop(self, state: Any, control: Any, *, mid_step: bool, where: str = "") -> None:
        if not where:
            where = (
                f"during step {state.global_step + 1} (partial accumulation dropped)" if mid_step else "at step end"
            )
        logger.warning(
            "preemption (%s) agreed across ranks at step %d, %s: committing a checkpoint, then stopping",
            preemption_signal_name() or "signal on another rank",
            state.global_step,
            where,
        )
        self.stopped_at_step = state.global_step
        self.stopped_mid_step = mid_step
        control.should_save = True
        control.should_evaluate = False
        control.should_log = False
        control.should_training_stop = True

    def on_save(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if self.stopped_at_step is not None:
            self.saved_after_stop = True
        elif agree_across_ranks(preemption_requested()):
            # The signal landed while this checkpoint was being written (every rank calls on_save after the
            # commit): it is the state to resume from, so stop now instead of training on to save another.
            self._stop(state, control, mid_step=False, where="while its checkpoint was being written")
            control.should_save = False
            self.saved_after_stop = True
        return control

    def on_prediction_step(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        fault_pause("evaluate")
        if agree_across_ranks(preemption_requested()):
            raise PreemptedDuringEvaluation
        return control

    def on_epoch_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        # After a preemption nothing may run before the checkpoint and the exit: no evaluation (time, and it draws
        # from the RNG), no second save; a mid-step stop saves here (the loop broke before any step-end save).
        if self.stopped_at_step is not None:
            control.should_evaluate = False
            control.should_log = False
            control.should_save = not self.saved_after_stop
        return control


def make_checkpoint_callbacks(
    facts: RunFacts, output_dir: str | Path, save_total_limit: int | None
) -> list[TrainerCallback]:
    """The callbacks a :class:`CheckpointingTrainerMixin` trainer needs: manifest facts + rotation, preemption."""
    return [CheckpointRotationCallback(facts, output_dir, save_total_limit), PreemptionCallback()]


class CheckpointingTrainerMixin:
    """Mix in before the trainer class: ``class T(CheckpointingTrainerMixin, SFTTrainer)``.

    Replaces ``Trainer._save_checkpoint`` with the staging -> fsync -> manifest -> rename protocol (HF's own
    writers do the writing, so every distributed backend keeps working), checks that all ranks resume from the
    same checkpoint, and turns a preemption agreed inside an evaluation loop into save + stop. Needs the callbacks
    from :func:`make_checkpoint_callbacks`.
    """

    # Provided by transformers.Trainer, which this mixin is always combined with (declared for type checkers).
    args: Any
    state: Any
    control: Any
    accelerator: Any
    callback_handler: Any
    hp_search_backend: Any

    # Set by _save_checkpoint: what the last commit wrote (step, bytes, seconds) — read by benchmarks and logs.
    last_checkpoint_info: dict[str, Any] | None = None
    _preempted_in_evaluation: bool = False

    def _checkpointing_callback(self) -> CheckpointRotationCallback:
        for cb in self.callback_handler.callbacks:
            if isinstance(cb, CheckpointRotationCallback):
                return cb
        raise RuntimeError(
            "CheckpointingTrainerMixin needs the callbacks from make_checkpoint_callbacks(facts, output_dir, "
            "save_total_limit) in the trainer's `callbacks`."
        )

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        """HF's ``train`` after checking that every rank resumes from the same checkpoint (``True``: the newest
        valid one in ``output_dir``).

        Raises:
            CheckpointError: ``True`` but no valid checkpoint, or the ranks chose different checkpoints.
        """
        self._checkpointing_callback()
        if resume_from_checkpoint is True:
            found = find_latest_valid_checkpoint(self.args.output_dir)
            if found is None:
                raise CheckpointError(f"resume requested but {self.args.output_dir} holds no valid checkpoint")
            resume_from_checkpoint = str(found)
        if resume_from_checkpoint in (False, ""):
            resume_from_checkpoint = None
        if resume_from_checkpoint is not None:
            resume_from_checkpoint = str(resume_from_checkpoint)
        _require_same_on_all_ranks(resume_from_checkpoint)
        preemption = self._preemption_callback()
        if preemption is not None and getattr(self, "is_deepspeed_enabled", False):
            preemption.allow_mid_step = False
        return super().train(resume_from_checkpoint, *args, **kwargs)  # type: ignore[misc]

    def _preemption_callback(self) -> PreemptionCallback | None:
        for cb in self.callback_handler.callbacks:
            if isinstance(cb, PreemptionCallback):
                return cb
        return None

    def _run_epoch(self, *args: Any, **kwargs: Any) -> Any:
        # HF's epoch loop starts with a step before it checks `max_steps`: a run resumed from a checkpoint at (or
        # past) max_steps would train one extra step and save checkpoint-<max_steps + 1>. Skip the loop instead;
        # the checkpoint's weights and optimizer state are already loaded (on every backend) at this point.
        state = self.state
        if state.max_steps > 0 and state.global_step >= state.max_steps:
            logger.warning(
                "already at step %d, at or past max_steps=%d: nothing to train (raise `--max_steps` to continue)",
                state.global_step,
                state.max_steps,
            )
            self.control.should_training_stop = True
            return None
        return super()._run_epoch(*args, **kwargs)  # type: ignore[misc]

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        from transformers.trainer_callback import ExportableState
        from transformers.trainer_utils import SaveStrategy

        cb = self._checkpointing_callback()
        args, state, accelerator = self.args, self.state, self.accelerator
        step = state.global_step
        run_dir = Path(self._get_output_dir(trial=trial))  # type: ignore[attr-defined]
        final_dir = run_dir / f"{CHECKPOINT_PREFIX}-{step}"
        staging = run_dir / f"{STAGING_PREFIX}{step}"
        # One process renames: the global main process, or each node's main with `save_on_each_node` (a
        # filesystem per node, where HF's should_save is true on every local main).
        commits = bool(args.should_save)
        fault = _FaultInjector(step) if commits else None
        t0 = time.perf_counter()
        if commits:
            if staging.exists():
                shutil.rmtree(staging)
            staging.mkdir(parents=True)
        accelerator.wait_for_everyone()

        if self.hp_search_backend is None and trial is None:
            self.store_flos()  # type: ignore[attr-defined]
        self.save_model(str(staging), _internal_call=True)  # type: ignore[attr-defined]
        if fault is not None:
            fault.files_appeared(staging)
        saves_best = args.save_strategy in (SaveStrategy.STEPS, SaveStrategy.EPOCH, SaveStrategy.BEST)
        if saves_best and state.best_global_step:
            best_dir = run_dir / f"{CHECKPOINT_PREFIX}-{state.best_global_step}"
            if state.best_global_step == step or best_dir.exists():
                state.best_model_checkpoint = str(best_dir)
        if not args.save_only_model:
            self._save_optimizer_and_scheduler(str(staging))  # type: ignore[attr-defined]
            if fault is not None:
                fault.files_appeared(staging)
            self._save_scaler(str(staging))  # type: ignore[attr-defined]
            preemption = self._preemption_callback()
            # A mid-step preemption checkpoints the last completed step: record the RNG as that step left it (the
            # process exits after this save, so overwriting the live generators is harmless).
            if (
                preemption is not None
                and preemption.stopped_mid_step
                and not preemption.saved_after_stop
                and preemption.rng_at_step_begin is not None
            ):
                restore_rng_state(preemption.rng_at_step_begin)
            self._save_rng_state(str(staging))  # type: ignore[attr-defined]
            if fault is not None:
                fault.files_appeared(staging)
        if args.should_save:
            # As HF: record ExportableState callbacks and the TrainerControl in the trainer state.
            for exportable in [
                c for c in [*self.callback_handler.callbacks, self.control] if isinstance(c, ExportableState)
            ]:
                name = exportable.__class__.__name__
                if isinstance(state.stateful_callbacks.get(name), list):
                    state.stateful_callbacks[name].append(exportable.state())
                else:
                    state.stateful_callbacks[name] = exportable.state()
            state.save_to_json(str(staging / TRAINER_STATE_NAME))
            if fault is not None:
                fault.files_appeared(staging)
        write_seconds = time.perf_counter() - t0
        # Every rank has finished writing its part (DeepSpeed/FSDP shards, rng_state_<rank>.pth) past this barrier.
        accelerator.wait_for_everyone()
        if commits:
            manifest = commit_checkpoint(
                staging,
                final_dir,
                step=step,
                facts=cb.facts,
                world_size=int(args.world_size),
                resumable=not args.save_only_model,
                extra={
                    "distributed_type": str(accelerator.distributed_type),
                    "write_seconds": round(write_seconds, 2),
                },
                fault=fault,
            )
            cb._pending_fault = fault
            self.last_checkpoint_info = {
                "step": step,
                "path": str(final_dir),
                "total_bytes": manifest["total_bytes"],
                "write_seconds": round(write_seconds, 3),
                "commit_seconds": manifest["commit_seconds"],
                "save_seconds": round(time.perf_counter() - t0, 3),
            }
            logger.info(
                "committed %s (%.1f MB in %.2f s)", final_dir, manifest["total_bytes"] / 1e6, time.perf_counter() - t0
            )
        # Nobody proceeds (or reads the checkpoint) before the rename is done.
        accelerator.wait_for_everyone()
        if args.push_to_hub:
            self._push_from_checkpoint(str(final_dir))  # type: ignore[attr-defined]

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        try:
            return super().evaluate(*args, **kwargs)  # type: ignore[misc]
        except PreemptedDuringEvaluation:
            self._preempted_in_evaluation = True
            if not getattr(self, "is_in_train", False):
                logger.warning("preempted during evaluation outside training: evaluation abandoned")
                return {}
            logger.warning(
                "preempted during evaluation at step %d: committing a checkpoint, then stopping",
                self.state.global_step,
            )
            preemption = self._preemption_callback()
            if preemption is not None:  # before on_save, which would otherwise take this for a new preemption
                preemption.stopped_at_step = self.state.global_step
            self._save_checkpoint(getattr(self, "model_wrapped", None), trial=None)
            self.control = self.callback_handler.on_save(self.args, self.state, self.control)
            # Already saved; HF must neither save this step again nor re-run the evaluation at the epoch end (that
            # would advance the RNG past the state the checkpoint holds).
            self.control.should_save = False
            self.control.should_evaluate = False
            self.control.should_training_stop = True
            if preemption is not None:
                preemption.saved_after_stop = True
            return {}

    def _determine_best_metric(self, metrics: dict[str, float], trial: Any) -> bool:
        if self._preempted_in_evaluation and not metrics:
            return False
        return super()._determine_best_metric(metrics, trial)  # type: ignore[misc]


def _require_same_on_all_ranks(resume: str | None) -> None:
    """Every rank must resume from the same checkpoint (each resolves it independently from the filesystem).

    Raises:
        CheckpointError: the ranks disagree (e.g. a node sees a different filesystem state).
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, resume)
    if len(set(gathered)) > 1:
        raise CheckpointError(
            f"ranks chose different checkpoints to resume from: {gathered}. Is `output_dir` on a filesystem every "
            "node sees? Pass an explicit `--resume_from_checkpoint PATH`."
        )
