"""sft_qlora under DeepSpeed ZeRO-2 with two CPU processes (accelerate_configs/deepspeed_zero2.yaml), QLoRA.

DeepSpeed needs a launcher (plain `python` fails looking for MPI) and compiles its small shared-memory comm op on
first use (~40 s on an idle 2-core machine, cached in ~/.cache/torch_extensions afterwards). Trained to step 4,
rerun unchanged (no retraining), rerun with ``--max_steps 6`` (resumes from checkpoint-4 through DeepSpeed's own
checkpoint loading).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.distributed.test_sft_ddp import PINNED_LOSSES_DDP, WORLD, two_process_run
from tests.integration.test_sft_train import (
    check_completed_run,
    check_resumed,
)

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def zero2_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict:
    return two_process_run(tmp_path_factory, tiny_model_dir, config_file="deepspeed_zero2.yaml", tag="sft-zero2")


def test_zero2_trains_qlora_on_two_ranks(zero2_run: dict) -> None:
    first = zero2_run["first"]
    assert "on 2 process(es)" in first["proc"].stderr
    assert first["training"]["distributed_type"] == "DEEPSPEED" and first["training"]["load_in_4bit"] is True
    ids = [i for step in sorted(first["note_ids"]) for i in first["note_ids"][step]]
    assert len(set(ids)) == len(ids)


def test_zero2_losses_match_ddp(zero2_run: dict) -> None:
    # Same data, seed and math as the DDP run: ZeRO-2 only shards the optimizer state and reduces the gradients in
    # partitions, which changes the fp32 summation order (hence 1e-3 relative, not exact).
    assert zero2_run["first"]["losses"] == pytest.approx(PINNED_LOSSES_DDP, rel=1e-3), zero2_run["first"]["losses"]


def test_zero2_resume(zero2_run: dict) -> None:
    out = zero2_run["out"]
    check_resumed(zero2_run["resumed"], out, first_losses=zero2_run["first"]["losses"], steps=6, resumed_from=4)
    check_completed_run(out, steps=6, world_size=WORLD, base_digest=None)
