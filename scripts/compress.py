"""Stage 2: shorten each stage-1 summary with a second model, re-prompting when clinical entities are lost.

    accelerate launch [--config_file accelerate_configs/<topology>.yaml] scripts/compress.py \
        --config recipes/<model>/compress.yaml [--input <generate output_dir>/stage1.jsonl] [--field value ...]

Checks that ``input`` is a completed generate output before loading any model, then writes
``<output_dir>/stage2.jsonl`` (per note: the compressed summary or the stage-1 fallback, entity retention,
retained/missing entities, length ratios in characters and tokens, attempts, ``fallback``) and ``manifest.json``.
Demo (CPU, tiny model):

    accelerate launch --config_file accelerate_configs/cpu.yaml scripts/compress.py --config recipes/demo/compress.yaml
"""

from __future__ import annotations

import sys

from dischargesum.cli import run_stage
from dischargesum.config import CompressConfig


def compress(cfg: CompressConfig) -> int:
    from dischargesum.inference.compress import run_compress

    run_compress(cfg)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_stage(CompressConfig, compress, argv, prog="compress.py")


if __name__ == "__main__":
    sys.exit(main())
