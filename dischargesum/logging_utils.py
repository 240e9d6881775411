"""The one logging helper: INFO on the main process, WARNING on the others, one format everywhere.

Ranks are read from the environment that ``accelerate launch`` / torchrun set (``RANK``, ``LOCAL_RANK``), so the
helper works before any ``Accelerator`` or process group exists.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

_FORMAT = "%(asctime)s %(levelname)s [%(name)s%(rank)s] %(message)s"
_configured = False


def process_rank() -> int:
    """Global rank from the launcher's environment (0 when not launched distributed)."""
    for var in ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "SLURM_PROCID"):
        value = os.environ.get(var)
        if value is not None and value.isdigit():
            return int(value)
    return 0


def is_main_process() -> bool:
    return process_rank() == 0


class _RankFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        record.rank = f" rank{process_rank()}" if world > 1 else ""
        return True


def show_progress() -> bool:
    """Whether this process draws progress bars: the main process, and only when stderr is a terminal.

    A log file (stderr redirected, a SLURM output file) gets no bars: tqdm's carriage returns and cursor-up codes
    (``[A``) interleave with the log lines there and make the file unreadable.
    """
    return is_main_process() and sys.stderr.isatty()


# Third-party warnings that say nothing a user of this project can act on. peft 0.21's get_peft_model reads
# transformers' deprecated `is_gradient_checkpointing` alias (transformers 5.24 renamed it); our own code uses the
# new name. Matched by message so any other FutureWarning still shows.
_SILENCED_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    (r"`is_gradient_checkpointing` is deprecated", FutureWarning),
)


def setup_logging(level: str = "info") -> None:
    """Configure the ``dischargesum`` logger once per process (idempotent; later calls only change the level).

    Library loggers (transformers, datasets, accelerate) follow the same rule: their info messages on the main
    process only, warnings everywhere. When stderr is not a terminal, the libraries' progress bars are switched
    off too (see :func:`show_progress`), and a few third-party warnings nobody here can act on are filtered.
    """
    global _configured
    for message, category in _SILENCED_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    if not show_progress():
        # Read when these libraries create a bar (datasets / huggingface_hub read them at import); the Trainer's
        # bars follow `disable_tqdm` (dischargesum.training.sft).
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    numeric = getattr(logging, level.upper(), logging.INFO)
    if not is_main_process():
        numeric = max(numeric, logging.WARNING)
    root = logging.getLogger("dischargesum")
    if not _configured:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
        handler.addFilter(_RankFilter())
        root.addHandler(handler)
        root.propagate = False
        _configured = True
    root.setLevel(numeric)
    try:
        import transformers

        transformers.utils.logging.set_verbosity(logging.WARNING if numeric <= logging.INFO else numeric)
        if not show_progress():
            transformers.utils.logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a hard dependency
        pass


def get_logger(name: str) -> logging.Logger:
    """A child of the ``dischargesum`` logger; use ``get_logger(__name__)`` in every module."""
    if not name.startswith("dischargesum"):
        name = f"dischargesum.{name}"
    return logging.getLogger(name)
