"""sft_qlora in-process on the tiny model: a non-finite loss stops training with exit code 3 and the last finite
state committed (issue #18; HF's Trainer filtered NaN losses from its logs and ended "complete" with a NaN
adapter), ``nonfinite_patience`` skips isolated bad steps, and the datasets cache is owner-only."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import torch

from dischargesum.config import SFTConfig
from dischargesum.manifest import read_manifest
from tests.fixtures_data import make_prepared_dataset
from tests.helpers import tiny_sft_config

# In-process (no launcher), but each test trains the tiny model end to end: ~30 s on a loaded 2-core CPU.
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    return make_prepared_dataset(tmp_path_factory.mktemp("nonfinite-data"), tiny_model_dir, n_rows=24)


def _cfg(dataset_dir: Path, model_dir: Path, out: Path, **kw) -> SFTConfig:
    steps = {"max_steps": 3, "save_steps": 2, "logging_steps": 1, "gradient_checkpointing": False, "eval_steps": 0}
    return tiny_sft_config(dataset_dir, model_dir, out, **{**steps, **kw})


def _nan_loss_at(monkeypatch: pytest.MonkeyPatch, bad_steps: set[int]) -> None:
    """Make the loss NaN while the trainer computes optimizer step ``s`` (1-based) for each ``s`` in bad_steps."""
    from dischargesum.training.trainer import DischargeSFTTrainer

    real = DischargeSFTTrainer.compute_loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[no-untyped-def]
        loss = real(self, model, inputs, return_outputs, num_items_in_batch)
        if model.training and self.state.global_step + 1 in bad_steps:
            return loss * float("nan")
        return loss

    monkeypatch.setattr(DischargeSFTTrainer, "compute_loss", compute_loss)


def _adapter(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


def test_nan_loss_stops_with_exit_3_and_commits_the_last_finite_state(
    dataset_dir: Path, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dischargesum.cli import EXIT_NONFINITE
    from dischargesum.training.checkpoint_store import validate_checkpoint
    from dischargesum.training.sft import DATASETS_CACHE_DIR, FINAL_DIR, train

    out = tmp_path / "run"
    _nan_loss_at(monkeypatch, {3})
    assert train(_cfg(dataset_dir, tiny_model_dir, out)) == EXIT_NONFINITE == 3
    manifest = read_manifest(out) or {}
    assert manifest.get("status") == "failed"
    assert "stopped at step 3" in manifest["failure"] and "`learning_rate`" in manifest["failure"]
    assert "`max_grad_norm`" in manifest["failure"] and "checkpoint-3" in manifest["failure"]
    assert not (out / FINAL_DIR).exists()
    # checkpoint-3 is the state after step 2's update (step 3's NaN update was skipped), and it is finite
    assert validate_checkpoint(out / "checkpoint-2").valid and validate_checkpoint(out / "checkpoint-3").valid
    two, three = _adapter(out / "checkpoint-2"), _adapter(out / "checkpoint-3")
    assert all(torch.isfinite(t).all() for t in three.values())
    assert all(torch.equal(two[k], three[k]) for k in two)
    # the datasets cache (copies of the notes) is owner-only
    cache = out / DATASETS_CACHE_DIR
    files = [p for p in cache.rglob("*") if p.is_file()]
    assert files and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files)
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o700 for p in [cache, *cache.rglob("*")] if p.is_dir())


def test_patience_skips_an_isolated_nan_step_and_finishes(
    dataset_dir: Path, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dischargesum.training.sft import FINAL_DIR, train

    out = tmp_path / "run"
    _nan_loss_at(monkeypatch, {2})
    assert train(_cfg(dataset_dir, tiny_model_dir, out, nonfinite_patience=1)) == 0
    assert (read_manifest(out) or {}).get("status") == "complete"
    assert all(torch.isfinite(t).all() for t in _adapter(out / FINAL_DIR).values())
    # step 2 (a save step) was bad: never saved
    assert not (out / "checkpoint-2").exists()
