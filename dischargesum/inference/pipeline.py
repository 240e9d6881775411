"""generate then compress in one process (``scripts/pipeline.py``): the stage-1 model is released, and checked to
be gone, before the stage-2 model loads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dischargesum.artifacts import STAGE1_FILE
from dischargesum.config import CompressConfig, GenerateConfig, PipelineConfig, parse_config
from dischargesum.logging_utils import get_logger
from dischargesum.manifest import finish_run, start_run

logger = get_logger(__name__)


def _cuda_allocated() -> int | None:
    import torch

    return int(torch.cuda.memory_allocated()) if torch.cuda.is_available() else None


def _memory_note(before: int | None, after: int | None) -> str:
    """How the stage-1 release is reported: CUDA bytes, or why there are none (CPU runs have no CUDA allocator)."""
    if before is None or after is None:
        return "no CUDA device: memory not measured"
    return f"CUDA allocated: {before:,} bytes before stage 1, {after:,} after"


def stage_configs(cfg: PipelineConfig) -> tuple[GenerateConfig, CompressConfig]:
    """The two stage configs of a pipeline run: the recipes with output_dirs under the pipeline's output_dir and
    the compress input wired to stage 1's output.

    Raises:
        ConfigError: either recipe is invalid.
    """
    root = Path(cfg.output_dir)
    gen = parse_config(GenerateConfig, ["--config", cfg.generate_config, "--output_dir", str(root / "generate")])
    comp = parse_config(
        CompressConfig,
        [
            "--config",
            cfg.compress_config,
            "--output_dir",
            str(root / "compress"),
            "--input",
            str(root / "generate" / STAGE1_FILE),
        ],
    )
    return gen, comp


def run_pipeline(cfg: PipelineConfig) -> dict[str, Any]:
    """generate then compress in one process; the stage-1 model is fully released before stage 2 loads.

    After stage 1 the pipeline checks that no model loaded by the engine is still alive (weak references) and
    records CUDA memory before stage 1, after it and after stage 2 in its manifest.

    Raises:
        ConfigError / ArtifactError: as the stages (both recipes and the compression model are checked before
            stage 1 starts). RuntimeError: the stage-1 model is still referenced after it was released.
    """
    from dischargesum.inference.compress import run_compress
    from dischargesum.inference.engine import release_memory
    from dischargesum.inference.generate import run_generate
    from dischargesum.inference.loading import live_model_count, resolve_model_source

    gen_cfg, comp_cfg = stage_configs(cfg)
    resolve_model_source(comp_cfg.model_name_or_path, comp_cfg.adapter)
    start_run(
        cfg.output_dir, cfg, inputs={"generate_config": cfg.generate_config, "compress_config": cfg.compress_config}
    )
    memory: dict[str, int | None] = {"before_stage1": _cuda_allocated()}
    stage1 = run_generate(gen_cfg)
    release_memory()
    memory["after_stage1"] = _cuda_allocated()
    alive = live_model_count()
    if alive:
        raise RuntimeError(f"{alive} stage-1 model(s) are still referenced after release; stage 2 would not fit")
    logger.info("stage-1 model released (%s)", _memory_note(memory["before_stage1"], memory["after_stage1"]))
    stage2 = run_compress(comp_cfg)
    release_memory()
    memory["after_stage2"] = _cuda_allocated()
    summary = {"generate": stage1, "compress": stage2, "cuda_memory_allocated": memory, "stage1_model_released": True}
    finish_run(cfg.output_dir, {}, summary=summary)
    return summary
