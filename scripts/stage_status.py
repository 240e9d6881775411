"""Is a stage's output directory a completed run of exactly this command? Exit 0 yes, 1 no (the reason on stdout).

    python scripts/stage_status.py <stage> --config recipes/<model>/<stage>.yaml [--output_dir DIR] [--field value ...]

``<stage>`` is prepare_data, sft_qlora, generate, compress, pipeline, eval, export or build_tiny_model; the remaining
arguments are the ones that stage's script would get. "Completed" means the manifest in ``--output_dir`` (or the
recipe's output_dir) is the stage's, has status ``complete``, its recorded outputs are intact and its config hash
equals this command's (dischargesum.manifest.completed_run_status). Nothing is loaded or written.
``scripts/run_medgemma.sh`` calls it to find the first stage a rerun must run. Exit 2: unknown stage or bad fields.
"""

from __future__ import annotations

import sys

from dischargesum.config import STAGE_CONFIGS, ConfigError, parse_config
from dischargesum.manifest import completed_run_status


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in {"-h", "--help"}:
        sys.stdout.write(__doc__ or "")
        return 0
    stage, rest = args[0], args[1:]
    if stage not in STAGE_CONFIGS:
        sys.stderr.write(f"stage_status.py: unknown stage {stage!r}; choose from {', '.join(STAGE_CONFIGS)}.\n")
        return 2
    try:
        cfg = parse_config(STAGE_CONFIGS[stage], rest, prog=f"stage_status.py {stage}")
    except ConfigError as exc:
        sys.stderr.write(f"stage_status.py: error: {exc}\n")
        return 2
    complete, reason = completed_run_status(cfg)
    sys.stdout.write(reason + "\n")
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main())
