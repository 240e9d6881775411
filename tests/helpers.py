"""Helpers shared by the test tiers: run our scripts as a user would (subprocess, accelerate launch)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE_CONFIGS = ROOT / "accelerate_configs"


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for child processes: this checkout's package first, offline, few threads, fixed hashing."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(
        {
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONHASHSEED": "0",
            "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "1"),
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra)
    return env


def run_script(
    script: str, args: Sequence[str], *, timeout: float = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``python scripts/<script> args...`` from the repository root."""
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=env or subprocess_env(),
    )


def accelerate_launch(
    script: str,
    args: Sequence[str],
    *,
    config_file: str = "cpu.yaml",
    num_processes: int | None = None,
    extra_launch_args: Sequence[str] = (),
    timeout: float = 900,
    env: dict[str, str] | None = None,
    launcher: str = "accelerate.commands.launch",
) -> subprocess.CompletedProcess[str]:
    """``accelerate launch --config_file accelerate_configs/<config_file> scripts/<script> args...``; ``launcher``
    ``dischargesum.launch`` is scripts/launch.sh's (the stage's exit code, no launcher traceback)."""
    launch = [
        sys.executable,
        "-m",
        launcher,
        "--config_file",
        str(ACCELERATE_CONFIGS / config_file),
    ]
    if num_processes is not None:
        launch += ["--num_processes", str(num_processes)]
    launch += list(extra_launch_args)
    return subprocess.run(
        [*launch, str(ROOT / "scripts" / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=env or subprocess_env(),
    )


def tiny_sft_config(dataset_dir: Path, model_dir: Path, out: Path, **overrides: object):
    """An in-process SFTConfig for the tiny model: unquantised base, LoRA r4/alpha 8, micro-batch 2, no accumulation,
    one step; ``overrides`` win."""
    from dischargesum.config import SFTConfig

    fields: dict[str, object] = dict(
        output_dir=str(out),
        dataset_dir=str(dataset_dir),
        model_name_or_path=str(model_dir),
        load_in_4bit=False,
        max_steps=1,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=1,
        lora_r=4,
        lora_alpha=8,
    )
    fields.update(overrides)
    return SFTConfig(**fields)  # type: ignore[arg-type]


TIERS = frozenset({"unit", "integration", "distributed", "gpu"})


def tier_problems(tests: Sequence[tuple[Path, set[str]]]) -> tuple[list[str], list[str]]:
    """(files with no tier marker, files in tests/<tier>/ whose markers lack that tier) among ``(path, marker
    names)`` of collected tests. The collection hook in tests/conftest.py refuses a run with either."""
    untiered = sorted({str(path) for path, marks in tests if not TIERS & marks})
    misplaced = sorted(
        {
            str(path)
            for path, marks in tests
            if TIERS & marks and path.parent.name in TIERS and path.parent.name not in marks
        }
    )
    return untiered, misplaced
