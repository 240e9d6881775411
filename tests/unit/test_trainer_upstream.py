"""The upstream behaviours our remaining private overrides (and their replacements) rely on, in the installed
transformers / TRL / huggingface_hub. Each test fails when the library changes what an override assumes, so the
override is revisited instead of silently breaking; the comment at each override names its test here."""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

pytestmark = pytest.mark.unit


def _self_calls(fn) -> list[str]:  # type: ignore[no-untyped-def]
    return re.findall(r"self\.(\w+)\(", inspect.getsource(fn))


def test_hf_save_checkpoint_calls_the_writers_our_copy_calls_in_the_same_order() -> None:
    # CheckpointingTrainerMixin._save_checkpoint is a copy of this body writing into a staging directory: a new or
    # reordered writer upstream must be copied too.
    from transformers import Trainer

    assert _self_calls(Trainer._save_checkpoint) == [
        "store_flos",
        "_get_output_dir",
        "save_model",
        "_save_optimizer_and_scheduler",
        "_save_scaler",
        "_save_rng_state",
        "_push_from_checkpoint",
    ]
    source = inspect.getsource(Trainer._save_checkpoint)
    for piece in ("ExportableState", "save_to_json(", "best_global_step", "rotate_checkpoints("):
        assert piece in source, piece
    from dischargesum.training.checkpoint_trainer import CheckpointingTrainerMixin

    upstream = [c for c in _self_calls(Trainer._save_checkpoint) if c != "_get_output_dir"]
    ours = [c for c in _self_calls(CheckpointingTrainerMixin._save_checkpoint) if c in upstream]
    assert ours == upstream


def test_hf_epoch_loop_is_still_run_epoch_called_after_on_epoch_begin() -> None:
    # CheckpointingTrainerMixin._run_epoch skips the loop at/past max_steps.
    from transformers import Trainer

    loop = inspect.getsource(Trainer._inner_training_loop)
    assert loop.index("on_epoch_begin") < loop.index("self._run_epoch(")
    assert "should_training_stop" not in inspect.getsource(Trainer._run_epoch).split("for update_step")[0]


def test_hf_resume_loads_fsdp_checkpoints_through_load_fsdp_model() -> None:
    # DischargeSFTTrainer._load_from_checkpoint puts the adapter back after this call (it drops nested-FSDP LoRA).
    from transformers import Trainer

    assert "load_fsdp_model(" in inspect.getsource(Trainer._load_from_checkpoint)


def test_trl_prepare_dataset_truncates_only_through_max_length_and_packs_in_the_same_call() -> None:
    # DischargeSFTTrainer._prepare_dataset calls TRL's with packing=False and relies on max_length=None = no cut.
    from trl import SFTTrainer

    params = list(inspect.signature(SFTTrainer._prepare_dataset).parameters)
    assert params == ["self", "dataset", "processing_class", "args", "packing", "formatting_func", "dataset_name"]
    source = inspect.getsource(SFTTrainer._prepare_dataset)
    assert "if args.max_length is not None and not packing:" in source
    assert "pack_dataset(dataset, args.max_length" in source


def test_trl_fixes_the_signature_columns_and_hf_drops_every_other_column() -> None:
    # DischargeSFTTrainer._set_signature_columns_if_needed adds example_index to TRL's fixed list.
    from transformers import Trainer
    from trl import SFTTrainer

    assert '["input_ids", "labels", "seq_lengths"]' in inspect.getsource(SFTTrainer._set_signature_columns_if_needed)
    assert "self._signature_columns" in inspect.getsource(Trainer._remove_unused_columns)


def test_trl_telemetry_goes_through_the_hub_switch_that_we_turn_off(monkeypatch: pytest.MonkeyPatch) -> None:
    # disable_hub_telemetry replaces an override of TRL's _send_telemetry: it only works while TRL pings through
    # huggingface_hub.send_telemetry, which honours huggingface_hub.constants.HF_HUB_DISABLE_TELEMETRY.
    from huggingface_hub import constants
    from huggingface_hub.utils import _telemetry, send_telemetry
    from trl.trainer import base_trainer

    assert "self._send_telemetry()" in inspect.getsource(base_trainer._BaseTrainer.__init__)
    assert "send_telemetry(" in inspect.getsource(base_trainer._BaseTrainer._send_telemetry)
    assert base_trainer.send_telemetry is send_telemetry
    sent: list[dict] = []
    monkeypatch.setattr(_telemetry, "_start_telemetry_thread", lambda: None)
    monkeypatch.setattr(_telemetry._TELEMETRY_QUEUE, "put", sent.append)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "0")
    send_telemetry("trl/other")
    assert len(sent) == 1  # the ping would go out
    from dischargesum.training.trainer import disable_hub_telemetry

    disable_hub_telemetry()
    send_telemetry("trl/other")
    assert len(sent) == 1 and constants.HF_HUB_DISABLE_TELEMETRY is True


def test_tensorboard_writer_gets_the_purge_step_and_hf_keeps_a_given_writer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # StableTensorBoardCallback makes the writer in on_train_begin (public) instead of HF's _init_summary_writer.
    import torch.utils.tensorboard
    from transformers import TrainerControl

    from dischargesum.training.trainer import StableTensorBoardCallback

    class Writer:
        def __init__(self, **kwargs: object) -> None:
            self.kwargs, self.scalars, self.closed = kwargs, [], False

        def add_text(self, *a: object, **k: object) -> None: ...

        def add_scalar(self, *a: object) -> None:
            self.scalars.append(a)

        def flush(self) -> None: ...

        def close(self) -> None:
            self.closed = True

    monkeypatch.setattr(torch.utils.tensorboard, "SummaryWriter", Writer)
    args = SimpleNamespace(to_json_string=lambda: "{}", output_dir=str(tmp_path))
    main = SimpleNamespace(is_world_process_zero=True, is_hyper_param_search=False, global_step=5)
    other = SimpleNamespace(is_world_process_zero=False, is_hyper_param_search=False)
    cb = StableTensorBoardCallback(tmp_path / "tb", purge_step=5)
    cb.on_train_begin(args, other, TrainerControl())
    assert cb.tb_writer is None  # only the main process writes
    cb.on_train_begin(args, main, TrainerControl())
    writer = cb.tb_writer
    assert isinstance(writer, Writer) and writer.kwargs == {"log_dir": str(tmp_path / "tb"), "purge_step": 5}
    cb.on_log(args, main, TrainerControl(), logs={"loss": 1.0})
    assert cb.tb_writer is writer and writer.scalars == [("train/loss", 1.0, 5)]  # HF logs through our writer
    cb.on_train_end(args, main, TrainerControl())
    assert writer.closed
