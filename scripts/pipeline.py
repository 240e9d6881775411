"""generate then compress in one process: the stage-1 model is released (and checked gone) before stage 2 loads.

    accelerate launch [--config_file accelerate_configs/<topology>.yaml] scripts/pipeline.py \
        --generate_config recipes/<model>/generate.yaml --compress_config recipes/<model>/compress.yaml \
        --output_dir outputs/<name>/pipeline

Stage 1 writes ``<output_dir>/generate/stage1.jsonl``, stage 2 ``<output_dir>/compress/stage2.jsonl`` (each with
its own manifest); the recipes' own output_dir and the compress ``input`` are replaced accordingly. The pipeline's
manifest records CUDA memory before stage 1, after its release and after stage 2. Demo (CPU, tiny models):

    accelerate launch --config_file accelerate_configs/cpu.yaml scripts/pipeline.py \
        --generate_config recipes/demo/generate.yaml --compress_config recipes/demo/compress.yaml \
        --output_dir outputs/demo/pipeline
"""

from __future__ import annotations

import sys

from dischargesum.cli import run_stage
from dischargesum.config import PipelineConfig


def pipeline(cfg: PipelineConfig) -> int:
    from dischargesum.inference.pipeline import run_pipeline

    run_pipeline(cfg)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_stage(PipelineConfig, pipeline, argv, prog="pipeline.py")


if __name__ == "__main__":
    sys.exit(main())
