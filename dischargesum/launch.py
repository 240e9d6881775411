"""``accelerate launch`` that keeps the stage's exit code and ends with the stage's own message.

    bash scripts/launch.sh [accelerate launch options] scripts/<stage>.py --config RECIPE.yaml [--field value ...]
    python -m dischargesum.launch ...            # the same, with any interpreter that has dischargesum installed

Same arguments, same launchers (accelerate's own parser and ``launch_command``). What differs is only what happens
when the stage fails: ``accelerate launch`` raises ``CalledProcessError`` (or torch's ``ChildFailedError``) after
the stage has printed its one-line error, so the user sees a launcher traceback last and the shell sees 1 whatever
the stage returned (2 a user error, 143 preempted, 130 interrupted). Here the stage's stderr has already streamed
through, so nothing more is printed and the stage's code becomes the launcher's. Signals are the business of the
supervisor above it (``scripts/launch.py``, :mod:`dischargesum.training.supervisor`), which runs this module as its
launcher; run alone, accelerate's own handling applies.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from typing import Any


def child_exit_code(error: BaseException) -> int | None:
    """The exit code a failed launch should report, from accelerate's / torchrun's exception; None if not ours.

    A child killed by a signal (negative return code) reports 128 + the signal number, as a shell does.
    """
    code: int | None = None
    if isinstance(error, subprocess.CalledProcessError):
        code = error.returncode
    else:
        # torchrun (multi-process launches): the first rank that failed.
        get_first = getattr(error, "get_first_failure", None)
        if get_first is not None:
            _rank, failure = get_first()
            code = failure.exitcode
    if code is None:
        return None
    return 128 - code if code < 0 else code


def main(argv: Sequence[str] | None = None) -> int:
    try:
        from accelerate.commands.launch import launch_command, launch_command_parser

        args: Any = launch_command_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
        launch_command(args)
    except KeyboardInterrupt:
        return 130
    except Exception as error:
        code = child_exit_code(error)
        if code is None:
            raise
        return code or 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
