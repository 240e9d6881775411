"""sft_qlora speed/memory options: whole-sequence vs completion-only labels, selective checkpointing and
activation offloading reach TRL, and the GPU-only / inconsistent settings are refused before any model loads."""

from __future__ import annotations

from pathlib import Path

import pytest

from dischargesum.config import ConfigError, SFTConfig
from tests.fixtures_data import make_prepared_dataset
from tests.helpers import tiny_sft_config

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    return make_prepared_dataset(tmp_path_factory.mktemp("speed-data"), tiny_model_dir, n_rows=12)


def _cfg(dataset_dir: Path, model_dir: Path, out: Path, **kw) -> SFTConfig:
    return tiny_sft_config(dataset_dir, model_dir, out, **kw)


def _cpu():
    from dischargesum.modeling import Hardware

    return Hardware("cpu", False, "cpu", "NO", None, 1, "no")


def _trl_args(cfg: SFTConfig):
    from dischargesum.training.sft import _trl_args, load_data_inputs, plan_training

    data = load_data_inputs(cfg)
    _, plan = plan_training(cfg, _cpu())
    return _trl_args(cfg, plan, data)


def test_checkpointing_options_reach_trl(dataset_dir: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    plain = _trl_args(_cfg(dataset_dir, tiny_model_dir, tmp_path / "a", gradient_checkpointing=True))
    assert plain.gradient_checkpointing and plain.gradient_checkpointing_kwargs == {"use_reentrant": False}
    assert not plain.activation_offloading and plain.completion_only_loss is True
    sac = _trl_args(
        _cfg(dataset_dir, tiny_model_dir, tmp_path / "b", gradient_checkpointing=True, selective_checkpointing=True)
    )
    assert sac.gradient_checkpointing_kwargs == {"use_reentrant": False, "selective": True}
    off = _trl_args(_cfg(dataset_dir, tiny_model_dir, tmp_path / "c", gradient_checkpointing=False))
    assert not off.gradient_checkpointing and not off.gradient_checkpointing_kwargs
    whole = _trl_args(_cfg(dataset_dir, tiny_model_dir, tmp_path / "d", completion_only_loss=False))
    assert whole.completion_only_loss is False


def test_inconsistent_or_gpu_only_settings_are_refused(dataset_dir: Path, tiny_model_dir: Path, tmp_path: Path):
    from dischargesum.modeling import preflight, read_model_info

    with pytest.raises(ConfigError, match=r"selective_checkpointing.*gradient_checkpointing: true"):
        _cfg(dataset_dir, tiny_model_dir, tmp_path, gradient_checkpointing=False, selective_checkpointing=True)
    cfg = _cfg(dataset_dir, tiny_model_dir, tmp_path, activation_offloading=True)
    with pytest.raises(ConfigError, match="activation_offloading: false"):
        preflight(cfg, read_model_info(str(tiny_model_dir)), _cpu())


@pytest.mark.parametrize("completion_only", [True, False])
def test_whole_sequence_loss_labels_every_token(
    dataset_dir: Path, tiny_model_dir: Path, tmp_path: Path, completion_only: bool
) -> None:
    from dischargesum.training.sft import build_trainer, load_data_inputs, plan_training, run_facts

    cfg = _cfg(dataset_dir, tiny_model_dir, tmp_path / "run", completion_only_loss=completion_only)
    data = load_data_inputs(cfg)
    _, plan = plan_training(cfg, _cpu())
    trainer = build_trainer(cfg, data, plan, facts=run_facts(cfg, data, plan, 1))
    masked = prompt = 0
    for row in trainer.train_dataset:
        masked += sum(1 for x in row["labels"] if x == -100)
        prompt += len(row["input_ids"])
    if completion_only:
        assert 0 < masked < prompt  # the prompt is masked, the summary is not
    else:
        assert masked == 0  # every token carries loss, as in the seed prototype


def test_compile_layers_is_gpu_only_and_compiles_every_decoder_layer(
    dataset_dir: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    from dischargesum.modeling import compile_decoder_layers, load_base_model, preflight, read_model_info

    cfg = _cfg(dataset_dir, tiny_model_dir, tmp_path, compile_layers=True)
    with pytest.raises(ConfigError, match="compile_layers: false"):
        preflight(cfg, read_model_info(str(tiny_model_dir)), _cpu())
    model = load_base_model(str(tiny_model_dir), dtype="float32")
    assert compile_decoder_layers(model) == 2  # the tiny model's sliding and full layer; nothing else
    layers = [m for m in model.modules() if type(m).__name__ == "Gemma3DecoderLayer"]
    assert len(layers) == 2 and all(layer._compiled_call_impl is not None for layer in layers)
