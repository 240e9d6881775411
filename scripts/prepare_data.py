"""Raw BHC rows -> patient-level train / validation / test parquet, rejects.jsonl and a data card.

    accelerate launch --config_file accelerate_configs/cpu.yaml scripts/prepare_data.py \
        --config recipes/medgemma-4b/prepare_data.yaml --source /data/mimic-iv-bhc.csv

    # the demo (synthetic notes, tiny Gemma-3 tokenizer):
    accelerate launch --config_file accelerate_configs/cpu.yaml scripts/prepare_data.py \
        --config recipes/demo/prepare_data.yaml

    # show 3 rendered training examples with the loss mask, write nothing:
    accelerate launch --config_file accelerate_configs/cpu.yaml scripts/prepare_data.py \
        --config recipes/demo/prepare_data.yaml --debug 3

The stage runs on the main process only (it is CPU work: worker processes and the tokenizer's threads use the
cores); other ranks of a multi-process launch exit at once. Exit code 2: a user error (missing column, bad
source, too many rejects — the message says what to set).
"""

from __future__ import annotations

import sys

from dischargesum.cli import run_stage
from dischargesum.config import PrepareDataConfig
from dischargesum.logging_utils import get_logger, is_main_process

logger = get_logger("prepare_data")


def prepare(cfg: PrepareDataConfig) -> int:
    from dischargesum.data.prepare import check_output_dir, debug_examples, run_prepare_data

    if not is_main_process():
        logger.warning("prepare_data runs on the main process only; this rank has nothing to do")
        return 0
    if cfg.debug:
        sys.stdout.write(debug_examples(cfg))
        return 0
    check_output_dir(cfg)
    run_prepare_data(cfg)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_stage(PrepareDataConfig, prepare, argv, prog="prepare_data.py")


if __name__ == "__main__":
    sys.exit(main())
