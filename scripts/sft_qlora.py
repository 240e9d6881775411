"""QLoRA fine-tuning of MedGemma (or any chat causal LM) on prepare_data's output, loss on the summary only.

    accelerate launch [--config_file accelerate_configs/<topology>.yaml] scripts/sft_qlora.py \\
        --config recipes/medgemma-4b/sft_qlora.yaml [--field value ...]

Demo (tiny Gemma-3, CPU, about a minute):

    accelerate launch --config_file accelerate_configs/cpu.yaml scripts/sft_qlora.py \\
        --config recipes/demo/sft_qlora.yaml

Rerunning the same command resumes from the newest valid checkpoint (`resume_from_checkpoint: auto`) or, when the
run already completed, does nothing. Exit codes: 0 done, 2 a problem with the inputs (the message says what to
fix), 3 stopped on a non-finite loss or gradient norm (the last finite state is committed; lower `learning_rate` or
set `max_grad_norm`), 143 preempted after committing a checkpoint, or before the first step with nothing to save yet
(rerun to resume). accelerate's launcher reports a child's 143 as 1: as a container's entry point, or wherever
SIGTERM may reach the launcher, run it under `python scripts/launch.py` (same arguments as `accelerate launch`),
which exits 143 itself.
"""

from __future__ import annotations

import sys

from dischargesum.cli import run_stage
from dischargesum.config import SFTConfig
from dischargesum.training.preemption import (
    PREEMPTED_EXIT_CODE,
    exit_preempted,
    install_preemption_handlers,
    record_exit,
)


def body(cfg: SFTConfig) -> int:
    from dischargesum.training.sft import train

    return train(cfg)


def main(argv: list[str] | None = None) -> int:
    # First, before torch and the model are loaded: a SIGTERM from here on is a request to stop cleanly.
    install_preemption_handlers()
    code = 1  # an exception escaping run_stage is a crash: the supervisor must not read it as a preemption
    try:
        code = run_stage(SFTConfig, body, argv, prog="sft_qlora.py")
    finally:
        record_exit(code)
    if code == PREEMPTED_EXIT_CODE:
        exit_preempted()  # within the grace period: skip the slow interpreter teardown
    return code


if __name__ == "__main__":
    sys.exit(main())
