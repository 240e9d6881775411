"""The one logging helper: INFO on the main process, WARNING on the others, one format everywhere.

Ranks are read from the environment that ``accelerate launch`` / torchrun set (``RANK``, ``LOCAL_RANK``), so the
helper works before any ``Accelerator`` or process group exists.
"""

from __future__ import annotations

import logging
import os
import sys

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


def setup_logging(level: str = "info") -> None:
    """Configure the ``dischargesum`` logger once per process (idempotent; later calls only change the level).

    Library loggers (transformers, datasets, accelerate) follow the same rule: their info messages on the main
    process only, warnings everywhere.
    """
    global _configured
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
    except ImportError:  # pragma: no cover - transformers is a hard dependency
        pass


def get_logger(name: str) -> logging.Logger:
    """A child of the ``dischargesum`` logger; use ``get_logger(__name__)`` in every module."""
    if not name.startswith("dischargesum"):
        name = f"dischargesum.{name}"
    return logging.getLogger(name)
