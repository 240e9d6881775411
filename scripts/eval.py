"""Score summaries: clinical entity fidelity, BERTScore, ROUGE, numeric fidelity and compression statistics.

    accelerate launch --config_file accelerate_configs/cpu.yaml scripts/eval.py --config recipes/demo/eval.yaml
    accelerate launch --config_file accelerate_configs/single_gpu.yaml scripts/eval.py \\
        --config recipes/medgemma-4b/eval.yaml [--predictions outputs/medgemma-4b/compress/stage2.jsonl --mode stage2]

Stage 1 scores generate's summaries against the reference BHC and the source note; stage 2 scores compress's
summaries against their stage-1 summary and the source note. Any CSV / TSV / JSONL / Parquet of another system's
outputs is scored the same way through `column_mapping` (`note_id: __row__` when it has no id column) and
`references` or `dataset_dir`. Writes metrics.json, per_sample.csv, report.md (contains patient text on MIMIC), PNG
plots and TensorBoard into `output_dir` (a finished eval there is replaced, with a warning). Runs in one process
(CPU or one GPU); entity extraction and ROUGE use `num_workers` CPU processes.
"""

from __future__ import annotations

import os
import sys

from dischargesum.cli import UserError, run_stage
from dischargesum.config import EvalConfig
from dischargesum.manifest import finish_run, start_run, warn_if_replacing


def run(cfg: EvalConfig) -> int:
    from dischargesum.evaluation.evaluate import evaluate
    from dischargesum.evaluation.inputs import load_eval_inputs
    from dischargesum.evaluation.report import write_report

    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        raise UserError(
            "eval runs in one process (2,000 pairs take well under a minute on one GPU); launch it with "
            "`--num_processes 1` or accelerate_configs/single_gpu.yaml / cpu.yaml."
        )
    inputs = load_eval_inputs(cfg)  # every input check happens here, before any model is loaded
    warn_if_replacing(cfg.output_dir, cfg.STAGE)
    start_run(cfg.output_dir, cfg, inputs=inputs.inputs)
    result = evaluate(inputs, cfg)
    outputs = write_report(result, cfg)
    finish_run(
        cfg.output_dir,
        outputs=outputs,
        mode=result.mode,
        scored=result.metrics["counts"]["scored"],
        skipped=result.metrics["counts"]["skipped"],
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_stage(EvalConfig, run, argv, prog="eval.py")


if __name__ == "__main__":
    sys.exit(main())
