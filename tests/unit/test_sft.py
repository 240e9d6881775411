"""sft_qlora in-process: token budget vs the data card, completion-only labels, example checks, batch extras,
metrics.jsonl resume trimming, completion detection, the model card."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dischargesum.artifacts import ArtifactError
from dischargesum.cli import UserError
from dischargesum.config import ConfigError, SFTConfig
from tests.fixtures_data import make_prepared_dataset
from tests.helpers import tiny_sft_config

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    return make_prepared_dataset(tmp_path_factory.mktemp("sft-data"), tiny_model_dir, n_rows=24)


def _cfg(dataset_dir: Path, model_dir: Path, out: Path, **kw) -> SFTConfig:
    return tiny_sft_config(dataset_dir, model_dir, out, **{"gradient_checkpointing": False, **kw})


def _trainer(cfg: SFTConfig):
    from dischargesum.modeling import Hardware, read_model_info
    from dischargesum.training.sft import build_trainer, load_data_inputs, plan_training, run_facts

    cpu = Hardware("cpu", False, "cpu", "NO", None, 1, "no")
    data = load_data_inputs(cfg)
    _, plan = plan_training(cfg, cpu)
    assert read_model_info(cfg.model_name_or_path).is_gemma3
    return build_trainer(cfg, data, plan, facts=run_facts(cfg, data, plan, 1)), data


# --- token budget ----------------------------------------------------------------------------------------------


def test_budget_comes_from_the_data_card_and_smaller_is_refused(dataset_dir: Path, tmp_path: Path) -> None:
    from dischargesum.training.sft import load_data_inputs

    card = json.loads((dataset_dir / "data_card.json").read_text())
    data = load_data_inputs(SFTConfig(output_dir=str(tmp_path), dataset_dir=str(dataset_dir)))
    assert data.max_seq_length == card["max_seq_length"] == 512
    assert data.instruction == card["instruction"] and len(data.fingerprint) == 64
    bigger = SFTConfig(output_dir=str(tmp_path), dataset_dir=str(dataset_dir), max_seq_length=1024)
    assert load_data_inputs(bigger).max_seq_length == 1024
    with pytest.raises(ConfigError, match=r"max_seq_length` = 256 is below the data's budget of 512.*summary"):
        load_data_inputs(SFTConfig(output_dir=str(tmp_path), dataset_dir=str(dataset_dir), max_seq_length=256))


def test_dataset_dir_must_be_a_completed_prepare_data_output(tmp_path: Path, tiny_model_dir: Path) -> None:
    from dischargesum.training.sft import load_data_inputs

    with pytest.raises(ArtifactError, match="dataset_dir"):
        load_data_inputs(SFTConfig(output_dir=str(tmp_path / "o"), dataset_dir=str(tiny_model_dir)))
    with pytest.raises(ArtifactError, match="no such directory"):
        load_data_inputs(SFTConfig(output_dir=str(tmp_path / "o"), dataset_dir=str(tmp_path / "missing")))


def test_config_cross_checks() -> None:
    with pytest.raises(ConfigError, match=r"log_note_ids.*packing: false"):
        SFTConfig(output_dir="o", dataset_dir="d", log_note_ids=True, packing=True)
    with pytest.raises(ConfigError, match="padding_free"):
        SFTConfig(output_dir="o", dataset_dir="d", packing=True, padding_free=True)
    with pytest.raises(ConfigError, match="max_seq_length"):
        SFTConfig(output_dir="o", dataset_dir="d", max_seq_length=4)


# --- completion-only labels --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["causal_lm", "vlm"])
def test_prompt_tokens_are_masked_and_every_example_trains_on_its_summary(
    kind: str, dataset_dir: Path, tiny_model_dir: Path, tiny_vlm_dir: Path, tmp_path: Path
) -> None:
    import pyarrow.parquet as pq

    from dischargesum.data.formatting import prompt_messages

    model_dir = tiny_model_dir if kind == "causal_lm" else tiny_vlm_dir
    trainer, data = _trainer(_cfg(dataset_dir, model_dir, tmp_path / "out"))
    tok = trainer.processing_class
    rows = pq.read_table(dataset_dir / "train.parquet").to_pylist()
    ds = trainer.train_dataset
    assert len(ds) == len(rows) > 0
    for ex in ds:
        row = rows[ex["example_index"]]
        ids, labels = ex["input_ids"], ex["labels"]
        prompt_ids = tok.apply_chat_template(
            prompt_messages(row["note"], data.instruction), add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
        n = len(prompt_ids)
        assert ids[:n] == prompt_ids
        assert all(label == -100 for label in labels[:n]), "a prompt token carries loss"
        trained = [t for t, label in zip(ids, labels, strict=True) if label != -100]
        assert labels[n:] == ids[n:] and len(trained) >= 1
        assert tok.decode(trained).strip() == row["summary"].strip() + "<end_of_turn>"


def test_packing_packs_to_max_seq_length_and_truncates_nothing(
    dataset_dir: Path, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One budget channel: DischargeSFTTrainer(max_seq_length=...) checks and packs; TRL's max_length stays None (it
    # would truncate: cut summaries), packed or not.
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", False)  # restored after the test
    plain, data = _trainer(_cfg(dataset_dir, tiny_model_dir, tmp_path / "plain", log_note_ids=True))
    # a budget above the data's (accepted) so that examples of 250-430 tokens can share a packed row
    packed, _ = _trainer(_cfg(dataset_dir, tiny_model_dir, tmp_path / "packed", packing=True, max_seq_length=1024))
    assert constants.HF_HUB_DISABLE_TELEMETRY is True  # building the trainer turned TRL's usage ping off
    assert plain.max_seq_length == data.max_seq_length == 512 and packed.max_seq_length == 1024
    assert plain.args.max_length is None and packed.args.max_length is None
    lengths = [len(row["input_ids"]) for row in plain.train_dataset]
    packed_lengths = [len(row["input_ids"]) for row in packed.train_dataset]
    assert sum(packed_lengths) == sum(lengths), "packing dropped or cut tokens"
    assert max(packed_lengths) <= 1024 < max(packed_lengths) + min(lengths) and len(packed_lengths) < len(lengths)
    # example_index survives the Trainer's unused-column removal into the batch (the signature-columns override)
    batch = next(iter(plain.get_train_dataloader()))
    assert batch["example_index"].numel() == 2
    with pytest.raises(ValueError, match=r"args.max_length = 512.*max_seq_length"):
        from dischargesum.training.trainer import DischargeSFTTrainer

        plain.args.max_length = 512
        DischargeSFTTrainer(model=plain.model, args=plain.args, max_seq_length=512, resolved_config_yaml="")


def test_static_packed_shape_gives_one_batch_shape_the_same_loss_and_real_token_counts(
    dataset_dir: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    import dataclasses
    import itertools

    import torch

    cfg = _cfg(dataset_dir, tiny_model_dir, tmp_path / "static", packing=True, max_seq_length=1024)
    trainer, _ = _trainer(dataclasses.replace(cfg, static_packed_shape=True))
    rows = trainer.args.per_device_train_batch_size * 1024
    batches = list(itertools.islice(iter(trainer.get_train_dataloader()), 4))
    assert {tuple(b["input_ids"].shape) for b in batches} == {(1, rows)}  # one shape, every step
    assert any(int(b["real_tokens"]) < rows for b in batches), "the check needs a batch that was padded"
    trainer.model.train()
    for batch in batches:
        real = int(batch["real_tokens"])
        assert (batch["labels"][0, real:] == -100).all() and (batch["position_ids"][0, real:] == 0).all()
        unpadded = {k: batch[k][:, :real] for k in ("input_ids", "labels", "position_ids")}
        trainer._token_counts = None
        with torch.no_grad():
            padded_loss = trainer.compute_loss(trainer.model, dict(batch))
            tokens_counted = int(trainer._token_counts[0])
            unpadded_loss = trainer.compute_loss(trainer.model, unpadded)
        assert tokens_counted == real  # the padding is not counted as input tokens
        assert float(padded_loss) == pytest.approx(float(unpadded_loss), rel=1e-5)
    with pytest.raises(ConfigError, match=r"static_packed_shape: true.*set `packing: true`"):
        _cfg(dataset_dir, tiny_model_dir, tmp_path / "x", static_packed_shape=True)


def test_checks_refuse_too_long_and_untrained_examples() -> None:
    from datasets import Dataset

    from dischargesum.training.trainer import check_examples, example_token_stats

    ds = Dataset.from_list(
        [
            {"input_ids": [1, 2, 3, 4], "labels": [-100, -100, 3, 4]},
            {"input_ids": [1, 2, 3], "labels": [1, -100, -100]},  # only position 0 "trained": nothing predicts it
        ]
    )
    assert example_token_stats(ds) == ([4, 3], [2, 0])
    with pytest.raises(UserError, match=r"1 of 2 train examples are longer than max_seq_length=3.*longest 4"):
        check_examples(ds, max_length=3, name="train")
    with pytest.raises(UserError, match=r"1 train examples have no trained.*note-b"):
        check_examples(ds, max_length=8, name="train", note_ids=["note-a", "note-b"])


def test_batch_extras_carry_indices_and_token_type_ids() -> None:
    import torch
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from dischargesum.training.trainer import BatchExtrasCollator, gemma3_vlm_needs_token_type_ids

    inner = DataCollatorForLanguageModeling(pad_token_id=0)
    examples = [
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "example_index": 4},
        {"input_ids": [8], "labels": [8], "example_index": 1},
    ]
    batch = BatchExtrasCollator(inner, add_token_type_ids=True)(examples)
    assert batch["example_index"].tolist() == [4, 1]
    assert torch.equal(batch["token_type_ids"], torch.zeros_like(batch["input_ids"]))
    assert "token_type_ids" not in BatchExtrasCollator(inner)(examples)
    # transformers 5.17 and 5.24 train Gemma3ForConditionalGeneration without token_type_ids
    assert gemma3_vlm_needs_token_type_ids() is False


def test_zero_token_type_ids_do_not_change_the_vlm_loss(tiny_vlm_dir: Path) -> None:
    import torch

    from dischargesum.modeling import load_base_model

    model = load_base_model(str(tiny_vlm_dir), dtype="float32").train()
    ids = torch.tensor([[2, 40, 41, 42, 43, 44], [2, 50, 51, 52, 0, 0]])
    mask = (ids != 0).long()
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
        typed = model(
            input_ids=ids, attention_mask=mask, labels=labels, token_type_ids=torch.zeros_like(ids), use_cache=False
        ).loss
    torch.testing.assert_close(plain, typed)


# --- metrics.jsonl and completion ---------------------------------------------------------------------------------


def test_metrics_log_drops_rows_past_the_resume_step(tmp_path: Path) -> None:
    from dischargesum.training.metrics import MetricsLog, read_metrics, train_loss_by_step

    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": float(s), "tokens": 10, "window_seconds": 1.0} for s in range(1, 6)]
    rows.append({"step": 5, "train_runtime": 3.0})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 6, "lo')  # torn last line
    log = MetricsLog(path, resume_step=3)
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]
    assert log.prior_tokens == 30 and log.prior_seconds == 3.0
    log.write({"step": 4, "loss": 0.5})
    assert train_loss_by_step(tmp_path) == {1: 1.0, 2: 2.0, 3: 3.0, 4: 0.5}


def test_completed_run_detection(dataset_dir: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    from dischargesum.manifest import finish_run, start_run
    from dischargesum.training.sft import FINAL_DIR, run_is_complete

    cfg = _cfg(dataset_dir, tiny_model_dir, tmp_path / "run")
    out = tmp_path / "run"
    assert not run_is_complete(cfg, "fp")
    start_run(out, cfg)
    start_run(out / FINAL_DIR, cfg)
    (out / FINAL_DIR / "adapter_model.safetensors").write_bytes(b"x")
    finish_run(out / FINAL_DIR)
    assert not run_is_complete(cfg, "fp"), "the run's own manifest is still running"
    finish_run(out, data_fingerprint="fp")
    assert run_is_complete(cfg, "fp")
    assert not run_is_complete(cfg, "other-data")
    assert not run_is_complete(_cfg(dataset_dir, tiny_model_dir, out, max_steps=2), "fp")


def test_model_card_summarises_without_text(dataset_dir: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    from dischargesum.training.sft import load_data_inputs, model_card

    cfg = _cfg(dataset_dir, tiny_model_dir, tmp_path / "run")
    data = load_data_inputs(cfg)
    summary = {
        "global_step": 7,
        "final_train_loss": 1.2345,
        "total_tokens": 4321,
        "train_seconds": 12.5,
        "world_size": 2,
        "device": "cpu",
        "distributed_type": "MULTI_CPU",
        "compute_dtype": "float32",
        "load_in_4bit": False,
        "trainable_parameters": 999,
    }
    card = model_card(cfg, data, str(tiny_model_dir), summary)
    for expected in ("| optimizer steps | 7 |", "1.2345", "4,321", "12.5 s", "2 x cpu, DDP over gloo", "train "):
        assert expected in card
    first_note = pq.read_table(dataset_dir / "train.parquet").column("note")[0].as_py()
    assert first_note[:40] not in card


def test_output_dir_guards(dataset_dir: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    from dischargesum.training.sft import _check_output_dir

    out = tmp_path / "run"
    _check_output_dir(_cfg(dataset_dir, tiny_model_dir, out))  # empty / missing is fine
    (out / "checkpoint-2").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"resume_from_checkpoint` = none.*checkpoint-2"):
        _check_output_dir(_cfg(dataset_dir, tiny_model_dir, out, resume_from_checkpoint="none"))
    _check_output_dir(_cfg(dataset_dir, tiny_model_dir, out))  # auto resumes instead
    with pytest.raises(ConfigError, match="holds a `prepare_data` artifact"):
        _check_output_dir(_cfg(dataset_dir, tiny_model_dir, dataset_dir))
