"""The common body of every ``scripts/*.py`` entry point: parse, set up logging, run, map errors to exit codes.

Exit codes: 0 success; 2 a user error found before or during the run (bad config, missing column, invalid input
artifact — the message says what to fix); 3 training stopped on a non-finite loss or gradient norm (the last finite
state is committed; lower learning_rate / set max_grad_norm); 130 interrupted with Ctrl-C (one line saying how to
resume, no traceback); 143 preempted after a checkpoint was committed (scheduler requeues); 1 anything else (a bug:
the traceback is printed). ``accelerate launch`` turns every non-zero code into its own 1 plus a traceback of its
own; ``scripts/launch.sh`` (dischargesum.launch) passes the stage's code through and prints nothing after its message.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from dischargesum.artifacts import ArtifactError
from dischargesum.config import BaseConfig, ConfigError, parse_config
from dischargesum.logging_utils import get_logger, setup_logging

C = TypeVar("C", bound=BaseConfig)
logger = get_logger(__name__)

EXIT_USER_ERROR = 2
EXIT_NONFINITE = 3
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C
EXIT_PREEMPTED = 143
# Stages whose rerun continues where an interrupted run stopped (sft_qlora: from its newest valid checkpoint).
_RESUMING_STAGES = {"generate", "compress", "pipeline"}


class UserError(RuntimeError):
    """A problem with the user's inputs detected during a run (exit code 2, no traceback)."""


def run_stage(cls: type[C], body: Callable[[C], int | None], argv: Sequence[str] | None, prog: str) -> int:
    """Parse ``cls`` from ``argv`` and call ``body(config)``; return the process exit code."""
    try:
        cfg = parse_config(cls, argv, prog=prog)
    except ConfigError as exc:
        sys.stderr.write(f"{prog}: error: {exc}\n")
        return EXIT_USER_ERROR
    setup_logging(cfg.log_level)
    try:
        rc = body(cfg)
    except (ConfigError, ArtifactError, UserError) as exc:
        logger.error("%s (exit code %d)", exc, EXIT_USER_ERROR)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        # Ctrl-C is not a bug: one line on how to go on instead of a traceback through the training stack.
        logger.error("%s", interrupted_message(cfg))
        return EXIT_INTERRUPTED
    return 0 if rc is None else rc


def interrupted_message(cfg: BaseConfig) -> str:
    """What to tell a user who pressed Ctrl-C: rerun, and from where it resumes."""
    output_dir = getattr(cfg, "output_dir", "")
    if output_dir and any(Path(output_dir).glob("checkpoint-*")):
        # Imported here: the base layer imports no stage at import time (tests/unit/test_architecture.py).
        from dischargesum.training.checkpoint_store import list_checkpoint_dirs, validate_checkpoint

        for _step, path in reversed(list_checkpoint_dirs(output_dir)):
            # Sizes only: hashing a large adapter would keep the user waiting after Ctrl-C; the rerun verifies.
            if validate_checkpoint(path, verify_checksums=False).valid:
                return f"interrupted — rerun the same command to resume from {path.name} ({path})"
    if cfg.STAGE == "sft_qlora":
        return "interrupted before the first checkpoint was committed — rerun the same command to start again"
    if cfg.STAGE in _RESUMING_STAGES:
        return "interrupted — rerun the same command to resume (notes already written are kept)"
    return "interrupted — rerun the same command to start again"
