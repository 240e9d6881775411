"""Export a fine-tuned adapter as a standalone model: merged weights (bf16 safetensors), tokenizer with chat
template, model card (base, adapter sha256, data fingerprint, eval metrics when given). Loads with plain
`transformers` and serving engines, without dischargesum and without trust_remote_code.

    python scripts/export.py --adapter runs/medgemma-4b/final --output_dir exports/medgemma-4b-bhc \
        [--eval_dir '[outputs/medgemma-4b/eval, outputs/medgemma-4b/eval_stage2]'] [--dtype bfloat16]

Runs on the CPU (needs RAM for the bf16 base: ~8.6 GB for MedGemma-4B); no accelerate launch needed. Demo:

    python scripts/export.py --adapter outputs/demo/sft/final --output_dir outputs/demo/merged \
        --eval_dir '[outputs/demo/eval]'
"""

from __future__ import annotations

import sys

from dischargesum.cli import run_stage
from dischargesum.config import ExportConfig


def export(cfg: ExportConfig) -> int:
    from dischargesum.export import run_export

    run_export(cfg)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_stage(ExportConfig, export, argv, prog="export.py")


if __name__ == "__main__":
    sys.exit(main())
