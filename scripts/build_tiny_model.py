"""Write the tiny Gemma-3 model (and tiny BERT encoder) the offline demo and the tests run on.

    python scripts/build_tiny_model.py --config recipes/demo/build_tiny_model.yaml

The output is an ordinary Hugging Face model directory: every stage loads it by path exactly as it loads
``google/medgemma-4b-it``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from dischargesum.cli import run_stage
from dischargesum.config import TinyModelConfig
from dischargesum.manifest import finish_run, start_run


def build(cfg: TinyModelConfig) -> int:
    from dischargesum.tiny_models import build_tiny_bert, build_tiny_gemma3

    start_run(cfg.output_dir, cfg)
    build_tiny_gemma3(cfg.output_dir, seed=cfg.seed, kind=cfg.kind)
    if cfg.with_encoder:
        build_tiny_bert(Path(cfg.output_dir) / "encoder", seed=cfg.seed)
    finish_run(cfg.output_dir)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_stage(TinyModelConfig, build, argv, prog="build_tiny_model.py")


if __name__ == "__main__":
    sys.exit(main())
