"""What a newcomer's shell sees: bootstrap skips an unchanged reinstall, the launcher keeps the stage's exit code,
Ctrl-C ends in one line, progress bars stay out of log files, third-party noise is filtered."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from dischargesum import cli, launch, logging_utils
from dischargesum.config import EvalConfig, SFTConfig

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]


def _fake_venv(tmp_path: Path) -> tuple[Path, Path]:
    """A venv whose python logs every call; pip and the import checks do nothing (fast), the rest runs for real."""
    venv, log = tmp_path / "venv", tmp_path / "calls.log"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(
        "#!/usr/bin/env bash\n"
        f'echo "$*" >> {log}\n'
        'if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then exit 0; fi\n'
        'case "$2" in "import torch" | *"import dischargesum"*) exit 0;; esac\n'
        f'exec {sys.executable} "$@"\n'
    )
    python.chmod(0o755)
    return venv, log


def _bootstrap(venv: Path, **env: str) -> str:
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "bootstrap.sh")],
        env={**os.environ, "VENV": str(venv), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_bootstrap_installs_once_then_skips_until_pyproject_changes(tmp_path: Path) -> None:
    venv, log = _fake_venv(tmp_path)

    def pip_installs() -> int:
        return sum(1 for line in log.read_text().splitlines() if line.startswith("-m pip install -q -e"))

    _bootstrap(venv)  # no stamp (a fresh venv, as in CI): installs
    assert pip_installs() == 1
    out = _bootstrap(venv)
    assert pip_installs() == 1 and "skipping pip install" in out
    stamp = venv / ".dischargesum-installed"
    stamp.write_text("0" * 64 + f" {ROOT}\n")  # what a different pyproject.toml left behind
    _bootstrap(venv)
    assert pip_installs() == 2
    _bootstrap(venv, BOOTSTRAP_FORCE="1")
    assert pip_installs() == 3


def test_launch_sh_without_a_venv_says_how_to_make_one(tmp_path: Path) -> None:
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "launch.sh"), "scripts/eval.py"],
        env={k: v for k, v in os.environ.items() if k not in ("PYTHON", "VENV")} | {"VENV": str(tmp_path / "none")},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert "bootstrap.sh" in proc.stderr


def test_launcher_reports_the_stage_exit_code() -> None:
    assert launch.child_exit_code(subprocess.CalledProcessError(2, ["x"])) == 2
    assert launch.child_exit_code(subprocess.CalledProcessError(143, ["x"])) == 143
    assert launch.child_exit_code(subprocess.CalledProcessError(-9, ["x"])) == 137  # killed: 128 + SIGKILL
    assert launch.child_exit_code(ValueError("a launcher bug")) is None

    class Failure:
        exitcode = 2

    class ChildFailed(Exception):  # torchrun's ChildFailedError has this method
        def get_first_failure(self) -> tuple[int, Failure]:
            return 0, Failure()

    assert launch.child_exit_code(ChildFailed()) == 2


def _write_checkpoint(run_dir: Path, step: int, *, complete: bool = True) -> None:
    from dischargesum.training.checkpoint_store import CHECKPOINT_MANIFEST_NAME, MANIFEST_FORMAT, TRAINER_STATE_NAME

    ckpt = run_dir / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    state = ckpt / TRAINER_STATE_NAME
    state.write_text("{}")
    if complete:
        manifest = {"format": MANIFEST_FORMAT, "step": step, "files": [{"path": state.name, "bytes": 2}]}
        (ckpt / CHECKPOINT_MANIFEST_NAME).write_text(json.dumps(manifest))


def test_ctrl_c_ends_in_one_line_naming_the_checkpoint_to_resume_from(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run_dir = tmp_path / "run"
    _write_checkpoint(run_dir, 4)
    _write_checkpoint(run_dir, 6, complete=False)  # the save Ctrl-C cut short: not resumable

    def interrupted(_cfg: SFTConfig) -> int:
        raise KeyboardInterrupt

    argv = ["--dataset_dir", str(tmp_path / "data"), "--output_dir", str(run_dir)]
    with caplog.at_level(logging.ERROR, logger="dischargesum"):
        logging.getLogger("dischargesum").addHandler(caplog.handler)
        try:
            assert cli.run_stage(SFTConfig, interrupted, argv, prog="sft_qlora.py") == cli.EXIT_INTERRUPTED
        finally:
            logging.getLogger("dischargesum").removeHandler(caplog.handler)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1
    assert messages[0].startswith("interrupted — rerun the same command to resume from checkpoint-4")


def test_interrupted_message_without_checkpoints(tmp_path: Path) -> None:
    sft = SFTConfig(dataset_dir="d", output_dir=str(tmp_path / "empty"))
    assert "before the first checkpoint" in cli.interrupted_message(sft)
    ev = EvalConfig(predictions="p.jsonl", dataset_dir="d", output_dir=str(tmp_path / "e"))
    assert cli.interrupted_message(ev) == "interrupted — rerun the same command to start again"


def test_user_error_line_ends_with_the_exit_code(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    def bad_input(_cfg: EvalConfig) -> int:
        raise cli.UserError("`predictions` = x.csv: no such file")

    argv = ["--predictions", "x.csv", "--dataset_dir", "d", "--output_dir", str(tmp_path)]
    logging.getLogger("dischargesum").addHandler(caplog.handler)
    try:
        assert cli.run_stage(EvalConfig, bad_input, argv, prog="eval.py") == cli.EXIT_USER_ERROR
    finally:
        logging.getLogger("dischargesum").removeHandler(caplog.handler)
    assert caplog.records[-1].getMessage().endswith("no such file (exit code 2)")


def test_no_progress_bars_when_stderr_is_not_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    class FakeStderr:
        def __init__(self, tty: bool) -> None:
            self.tty = tty

        def isatty(self) -> bool:
            return self.tty

    monkeypatch.setattr(sys, "stderr", FakeStderr(True))
    assert logging_utils.show_progress()
    monkeypatch.setattr(sys, "stderr", FakeStderr(False))
    assert not logging_utils.show_progress()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(sys, "stderr", FakeStderr(True))
    assert not logging_utils.show_progress()  # other ranks never draw


def test_gradient_checkpointing_alias_warning_is_filtered_and_others_are_not() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logging_utils.setup_logging("info")
        warnings.warn(
            "`is_gradient_checkpointing` is deprecated and will be removed in v6. Use `is_activation_checkpointing` "
            "instead.",
            FutureWarning,
            stacklevel=1,
        )
        warnings.warn("some other future change", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["some other future change"]


def test_demo_recipes_name_the_directories_the_demo_writes() -> None:
    import re

    import yaml

    recipes = sorted((ROOT / "recipes" / "demo").glob("*.yaml"))
    written = {Path(yaml.safe_load(p.read_text())["output_dir"]).name for p in recipes}
    demo = (ROOT / "scripts" / "demo.sh").read_text()
    written |= set(re.findall(r"outputs/demo/([\w-]+)", demo))
    named = {name for p in recipes for name in re.findall(r"outputs/demo/([\w-]+)", p.read_text())}
    assert named <= written, f"recipes name directories nothing writes: {sorted(named - written)}"
