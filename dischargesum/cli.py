"""The common body of every ``scripts/*.py`` entry point: parse, set up logging, run, map errors to exit codes.

Exit codes: 0 success; 2 a user error found before or during the run (bad config, missing column, invalid input
artifact — the message says what to fix); 3 training stopped on a non-finite loss or gradient norm (the last finite
state is committed; lower learning_rate / set max_grad_norm); 143 preempted after a checkpoint was committed
(scheduler requeues); 1 anything else (a bug: the traceback is printed).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import TypeVar

from dischargesum.config import BaseConfig, ConfigError, parse_config
from dischargesum.logging_utils import get_logger, setup_logging
from dischargesum.manifest import ArtifactError

C = TypeVar("C", bound=BaseConfig)
logger = get_logger(__name__)

EXIT_USER_ERROR = 2
EXIT_NONFINITE = 3
EXIT_PREEMPTED = 143


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
        logger.error("%s", exc)
        return EXIT_USER_ERROR
    return 0 if rc is None else rc
