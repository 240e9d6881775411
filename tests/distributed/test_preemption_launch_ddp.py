"""SIGTERM to the launcher, to one training process (rank 1) or to every process, in each phase, two processes.

Through the real launcher: ``scripts/launch.py`` -> ``accelerate launch`` (torchrun's elastic agent, two gloo ranks
on the CPU) -> ``scripts/sft_qlora.py`` on the tiny Gemma-3. Each phase's three targets run side by side (see
:mod:`tests.preemption_scenarios`); every scenario must end with exit 143 from the outermost process within the
grace period and a committed checkpoint of the phase's step, or — during loading — none, "nothing to save yet" and
the run's manifest marked interrupted.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.preemption_scenarios import PHASES, run_and_check_phase

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("phase", PHASES)
def test_every_signal_target_in_this_phase_commits_and_exits_143(
    phase: str, tmp_path: Path, prepared_dataset_dir: Path, tiny_model_dir: Path
) -> None:
    run_and_check_phase(phase, 2, tmp_path, prepared_dataset_dir, tiny_model_dir)
