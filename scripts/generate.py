"""Stage 1: discharge summaries for a prepared split from the fine-tuned model (base + LoRA adapter).

    accelerate launch [--config_file accelerate_configs/<topology>.yaml] scripts/generate.py \
        --config recipes/<model>/generate.yaml [--field value ...]

Writes ``<output_dir>/stage1.jsonl`` (one line per note, in input order: note_id, summary, prompt_tokens,
new_tokens, finish_reason, seconds, batch_size) and ``manifest.json``. With N processes the notes are shared
across ranks; a rerun resumes where a killed run stopped. Demo (CPU, tiny model):

    accelerate launch --config_file accelerate_configs/cpu.yaml scripts/generate.py --config recipes/demo/generate.yaml
"""

from __future__ import annotations

import sys

from dischargesum.cli import run_stage
from dischargesum.config import GenerateConfig


def generate(cfg: GenerateConfig) -> int:
    from dischargesum.inference.generate import run_generate

    run_generate(cfg)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_stage(GenerateConfig, generate, argv, prog="generate.py")


if __name__ == "__main__":
    sys.exit(main())
