"""Artifact manifests: what produced a directory, from what, and whether it finished.

Every stage writes ``run_config.yaml`` (the resolved config) and ``manifest.json`` into its output directory when
it starts (``status: running``) and marks the manifest ``complete`` — with fingerprints of its outputs — only at
the very end. A later stage calls :func:`require_artifact` on its input before loading any model, so a
half-written or foreign directory is refused with a message that says which stage to rerun.

No secrets land here: the config dataclasses have no token fields, and argv is recorded with values of any
``--*token*`` flag masked.

Permissions: files that hold patient text (split parquets, ``rejects.jsonl``, ``stage1/2.jsonl`` and their part
files, the datasets cache of a training run) are created owner-only (``PRIVATE_FILE_MODE`` 0600, directories
``PRIVATE_DIR_MODE`` 0700) through :func:`open_private`, :func:`create_private`, :func:`private_dir` and
:func:`private_umask`, as the atomic writers here always did (``mkstemp`` creates 0600).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import platform
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dischargesum.artifacts import MANIFEST_NAME, RESOLVED_CONFIG_NAME, ArtifactError
from dischargesum.logging_utils import get_logger, is_main_process

if TYPE_CHECKING:
    from dischargesum.config import BaseConfig

_LIBRARIES = (
    "dischargesum",
    "torch",
    "transformers",
    "trl",
    "peft",
    "accelerate",
    "bitsandbytes",
    "datasets",
    "deepspeed",
    "tokenizers",
    "spacy",
    "scispacy",
    "bert-score",
    "pandas",
    "pyarrow",
    "numpy",
)


PRIVATE_FILE_MODE = 0o600
PRIVATE_DIR_MODE = 0o700


def library_versions(names: Iterable[str] = _LIBRARIES) -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_revision() -> str | None:
    """The source tree's commit (with ``-dirty`` when it has uncommitted changes), or None outside git."""
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{rev}-dirty" if dirty else rev


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def fingerprint_file(path: str | Path, root: str | Path | None = None) -> dict[str, Any]:
    p = Path(path)
    rel = str(p.relative_to(root)) if root is not None else p.name
    return {"path": rel, "bytes": p.stat().st_size, "sha256": sha256_file(p)}


def canonical_hash(data: Any) -> str:
    """sha256 of a JSON-serialisable value with sorted keys (stable across runs and machines)."""
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()


# Fields that say where a run writes, how much it logs or what to do with earlier outputs, not what it computes.
HASH_EXCLUDED_FIELDS = ("output_dir", "log_level", "overwrite")


def config_hash(cfg: BaseConfig, exclude: Iterable[str] = HASH_EXCLUDED_FIELDS) -> str:
    skip = set(exclude)
    return canonical_hash({k: v for k, v in cfg.to_dict().items() if k not in skip})


def private_dir(path: str | Path) -> Path:
    """Create ``path`` (and missing parents) owner-only (0700); an existing directory is made 0700 too."""
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR_MODE)
    if stat.S_IMODE(p.stat().st_mode) != PRIVATE_DIR_MODE:
        os.chmod(p, PRIVATE_DIR_MODE)
    return p


def open_private(path: str | Path, mode: str = "w", **kwargs: Any) -> Any:
    """``open(path, mode)`` for a file that holds patient text: created 0600 (an existing file is set to 0600)."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if "a" in mode else os.O_TRUNC)
    fd = os.open(path, flags, PRIVATE_FILE_MODE)
    try:
        os.fchmod(fd, PRIVATE_FILE_MODE)
        return os.fdopen(fd, mode, **kwargs)
    except BaseException:
        os.close(fd)
        raise


def create_private(path: str | Path) -> Path:
    """Create an empty 0600 file for a library writer to fill (truncating an existing file keeps its mode)."""
    with open_private(path, "wb"):
        pass
    return Path(path)


@contextlib.contextmanager
def private_umask() -> Iterator[None]:
    """Files and directories that libraries create inside the block (the datasets cache) are owner-only.

    The umask is per process: only for code whose writers cannot be given a mode.
    """
    previous = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(previous)


def chmod_private_tree(root: str | Path) -> None:
    """Make every file under ``root`` 0600 and every directory 0700 (for files written by worker processes)."""
    base = Path(root)
    if not base.is_dir():
        return
    for directory, _dirs, files in os.walk(base):
        os.chmod(directory, PRIVATE_DIR_MODE)
        for name in files:
            path = os.path.join(directory, name)
            if not os.path.islink(path):
                os.chmod(path, PRIVATE_FILE_MODE)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file, fsync and rename, so readers never see half a file."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def _sanitised_argv(argv: list[str]) -> list[str]:
    out: list[str] = []
    mask_next = False
    for token in argv:
        if mask_next:
            out.append("***")
            mask_next = False
            continue
        if token.startswith("--") and "token" in token.lower():
            if "=" in token:
                out.append(token.split("=", 1)[0] + "=***")
            else:
                out.append(token)
                mask_next = True
            continue
        out.append(token)
    return out


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def warn_if_replacing(output_dir: str | Path, stage: str) -> None:
    """Say so before a run replaces an earlier run's outputs in ``output_dir``; refuse another stage's directory.

    Raises:
        ArtifactError: ``output_dir`` holds the outputs of a different stage (writing there would destroy them).
    """
    previous = read_manifest(output_dir)
    if previous is None:
        return
    if previous.get("stage") != stage:
        raise ArtifactError(
            f"`output_dir` = {output_dir} holds `{previous.get('stage')}` outputs, not `{stage}` outputs; writing "
            f"there would replace its manifest. Choose another `output_dir`."
        )
    finished = previous.get("finished_at") or "never"
    get_logger(__name__).warning(
        "%s already holds `%s` outputs (%s, finished %s); they are replaced",
        output_dir,
        stage,
        previous.get("status"),
        finished,
    )


def start_run(output_dir: str | Path, cfg: BaseConfig, inputs: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Create ``output_dir`` and write the resolved config plus a ``running`` manifest (main process only)."""
    out = Path(output_dir)
    manifest = {
        "stage": cfg.STAGE,
        "status": "running",
        "started_at": _now(),
        "finished_at": None,
        "host": socket.gethostname(),
        "git_revision": git_revision(),
        "argv": _sanitised_argv(list(sys.argv)),
        "world_size": int(os.environ.get("WORLD_SIZE", "1") or 1),
        "config_hash": config_hash(cfg),
        "library_versions": library_versions(),
        "inputs": dict(inputs or {}),
        "outputs": {},
    }
    if is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / RESOLVED_CONFIG_NAME, cfg.to_yaml())
        atomic_write_json(out / MANIFEST_NAME, manifest)
    return manifest


def finish_run(output_dir: str | Path, outputs: Mapping[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """Mark the run ``complete`` with output fingerprints and extra summary fields (main process only)."""
    path = Path(output_dir) / MANIFEST_NAME
    manifest = read_manifest(output_dir) or {}
    manifest.update(extra)
    manifest["outputs"] = dict(outputs or {})
    manifest["status"] = "complete"
    manifest["finished_at"] = _now()
    if is_main_process():
        atomic_write_json(path, manifest)
    return manifest


def mark_interrupted(output_dir: str | Path, **extra: Any) -> dict[str, Any] | None:
    """Mark a ``running`` manifest ``interrupted`` (preempted; rerun to resume) with extra fields (main process only).

    A manifest in any other state (none, complete) is left alone and None is returned.
    """
    manifest = read_manifest(output_dir)
    if not manifest or manifest.get("status") != "running":
        return None
    manifest.update(extra)
    manifest["status"] = "interrupted"
    manifest["interrupted_at"] = _now()
    if is_main_process():
        atomic_write_json(Path(output_dir) / MANIFEST_NAME, manifest)
    return manifest


def read_manifest(directory: str | Path) -> dict[str, Any] | None:
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def completed_run_status(cfg: BaseConfig) -> tuple[bool, str]:
    """Whether ``cfg.output_dir`` holds a completed run of ``cfg``'s stage with exactly these settings (the same
    :func:`config_hash`) and intact recorded outputs: ``(True, "complete")`` or ``(False, why not)``. Read-only;
    ``scripts/run_medgemma.sh`` uses it to decide where a rerun continues."""
    try:
        manifest = require_artifact(cfg.output_dir, stage=cfg.STAGE, field="output_dir")
    except ArtifactError as exc:
        return False, str(exc)
    if manifest.get("config_hash") != config_hash(cfg):
        return False, f"`output_dir` = {cfg.output_dir} holds a completed {cfg.STAGE} run with other settings"
    return True, "complete"


def require_artifact(
    directory: str | Path, *, stage: str | tuple[str, ...], field: str, files: Iterable[str] = ()
) -> dict[str, Any]:
    """Check that ``directory`` is a completed output of ``stage`` and holds ``files``; return its manifest.

    Recorded output files are checked by size (cheap; the sha256 stays available for a full audit).

    Raises:
        ArtifactError: the directory or a file is missing, the manifest is absent or unreadable, the producing
            stage differs, the run did not complete, or a recorded output's size changed.
    """
    stages = (stage,) if isinstance(stage, str) else stage
    d = Path(directory)
    want = " or ".join(stages)
    if not d.is_dir():
        raise ArtifactError(f"`{field}` = {directory}: no such directory. Run {want} first (or fix the path).")
    manifest = read_manifest(d)
    if manifest is None:
        raise ArtifactError(
            f"`{field}` = {directory} has no readable {MANIFEST_NAME}: it was not written by dischargesum's "
            f"{want}, or that run was interrupted before it started. Rerun {want} into this directory."
        )
    if manifest.get("stage") not in stages:
        raise ArtifactError(
            f"`{field}` = {directory} was produced by `{manifest.get('stage')}`, expected {want}. Fix `{field}`."
        )
    if manifest.get("status") != "complete":
        raise ArtifactError(
            f"`{field}` = {directory}: the {manifest.get('stage')} run that writes it has status "
            f"`{manifest.get('status')}` (interrupted or still running). Rerun it to completion first."
        )
    for name in files:
        if not (d / name).exists():
            raise ArtifactError(f"`{field}` = {directory} lacks {name}. Rerun {want} into this directory.")
    recorded = manifest.get("outputs", {})
    for name, info in recorded.items() if isinstance(recorded, dict) else ():
        if not isinstance(info, dict) or "bytes" not in info:
            continue
        p = d / str(info.get("path", name))
        if not p.exists() or p.stat().st_size != info["bytes"]:
            raise ArtifactError(
                f"`{field}` = {directory}: {p.name} changed or vanished since {manifest.get('stage')} wrote it "
                f"(recorded {info['bytes']} bytes). Rerun {manifest.get('stage')}."
            )
    return manifest
