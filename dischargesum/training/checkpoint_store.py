"""The checkpoint store: what a committed checkpoint is on disk, and how to find, validate, commit and rotate one.

Plain files, no Trainer (its integration — the callbacks and the ``_save_checkpoint`` that writes into the staging
directory — is :mod:`dischargesum.training.checkpoint_trainer`). Why our own layer: the HF Trainer writes
``checkpoint-<step>`` in place (a kill mid-save leaves a directory that looks like a checkpoint), resumes from the
highest-numbered directory without checking it is complete, and its rotation can delete the last good checkpoint
while keeping a broken one. Here:

* **Commit** (:func:`commit_checkpoint`): every rank has written into ``.staging-checkpoint-<step>``; the committing
  process fsyncs every file, hashes it, writes ``checkpoint_manifest.json`` LAST, fsyncs, and renames the directory
  to ``checkpoint-<step>`` (one atomic rename on the same filesystem). A directory named ``checkpoint-<step>``
  without a matching manifest is never used.
* **Validation** (:func:`validate_checkpoint`): the manifest parses, names the same step, and every listed file
  exists with the recorded size (and sha256, unless asked for the quick check).
* **Resume** (:func:`resolve_resume_checkpoint`): ``auto`` takes the newest *valid* checkpoint by parsed step
  (``checkpoint-10`` after ``checkpoint-9``), warning about each invalid one and why; an explicit path that is
  invalid is an error (exit 2), never a silent fresh start. Resume guards (:func:`check_resume_guards`) refuse a
  checkpoint whose effective batch, data fingerprint, base model, quantisation, LoRA config or ``max_seq_length``
  differ from this run's (:class:`RunFacts`).
* **Rotation** (:func:`rotate_checkpoints`): runs only after a newer checkpoint is committed, keeps the last K
  valid ones by step, removes invalid leftovers and stale staging directories, and never deletes the last valid one.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dischargesum.cli import UserError
from dischargesum.logging_utils import get_logger
from dischargesum.manifest import canonical_hash, library_versions

__all__ = [
    "CHECKPOINT_MANIFEST_NAME",
    "CheckpointError",
    "CheckpointStatus",
    "RunFacts",
    "check_resume_guards",
    "checkpoint_global_step",
    "commit_checkpoint",
    "find_latest_valid_checkpoint",
    "list_checkpoint_dirs",
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


def commit_checkpoint(
    staging: Path,
    final_dir: Path,
    *,
    step: int,
    facts: RunFacts,
    world_size: int,
    resumable: bool,
    extra: dict[str, Any] | None = None,
    on_event: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Fsync and hash every file in ``staging``, write the manifest last, and rename ``staging`` to ``final_dir``.

    Call on ONE process, after every rank finished writing into ``staging``. An existing ``final_dir`` (a re-save
    of the same step) is moved aside first and deleted after the rename. ``on_event`` is called with ``manifest``
    (written and fsynced) and ``commit`` (renamed): points where the kill-mid-save tests crash
    (:mod:`dischargesum.training.fault_injection`).

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
    if on_event is not None:
        on_event("manifest")
    replaced = None
    if final_dir.exists():
        replaced = final_dir.parent / f"{TRASH_PREFIX}{final_dir.name}-{uuid.uuid4().hex[:8]}"
        os.rename(final_dir, replaced)
    os.rename(staging, final_dir)
    _fsync_dir(final_dir.parent)
    if on_event is not None:
        on_event("commit")
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
    on_event: Callable[[str], None] | None = None,
) -> list[Path]:
    """Keep the newest ``save_total_limit`` valid checkpoints (by step; all when None/<=0); return what was removed.

    Also removes invalid ``checkpoint-*`` directories and staging/trash leftovers — but only when at least one
    valid checkpoint exists, and never the newest valid one. Call only after a checkpoint was committed, on the
    committing process. Validity here is the quick check (manifest + sizes); resume re-verifies checksums.
    ``on_event`` is called with ``rotate:<name>`` after each deletion (see :func:`commit_checkpoint`).
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
        if on_event is not None:
            on_event(f"rotate:{status.path.name}")
    return removed
