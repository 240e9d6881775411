"""The SFT trainer: TRL's ``SFTTrainer`` + our checkpoint protocol, example checks, token accounting, callbacks.

What we add to TRL and why (everything else is TRL / transformers as shipped):

* ``_prepare_dataset``: TRL tokenizes and builds completion-only labels; we run it *without* truncation or packing
  and check every example against ``max_seq_length`` (TRL truncates the end of a too-long example — the summary —
  silently), then pack to ``max_seq_length``. The budget reaches the trainer through that one argument: TRL's own
  ``max_length`` is always None (``sft._trl_args``).
* ``compute_loss``: counts non-pad and trained tokens on the device (no per-micro-batch host sync) and records
  each step's example indices when asked; ``log`` reduces the counts across ranks once per logging step and adds
  tokens/s and GPU memory to the logs, so TensorBoard and ``metrics.jsonl`` get them from the same place.
* ``save_model``: writes the resolved config into every checkpoint (generate can load any ``checkpoint-N``) and, under
  FSDP, the adapter itself.
* ``compute_loss`` also flags a non-finite loss on the device for
  :class:`~dischargesum.training.nonfinite.NonFiniteGuard` (read once per optimizer step).
* no telemetry (:func:`disable_hub_telemetry`), no TRL model card in ``output_dir`` (``final/README.md`` is ours).

The private methods still overridden (here and in :class:`~dischargesum.training.checkpoint_trainer.
CheckpointingTrainerMixin`) each say which upstream behaviour forces it and which test fails when upstream changes
(tests/unit/test_trainer_upstream.py pins the upstream side).
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.integrations import TensorBoardCallback
from trl import SFTTrainer
from trl.data_utils import pack_dataset

from dischargesum.cli import UserError
from dischargesum.logging_utils import get_logger
from dischargesum.manifest import RESOLVED_CONFIG_NAME, atomic_write_text
from dischargesum.training.checkpoint_trainer import (
    CheckpointingTrainerMixin,
    gather_fsdp_adapter,
    load_fsdp_adapter,
    save_fsdp_adapter,
)
from dischargesum.training.metrics import MetricsLog

logger = get_logger(__name__)

EXAMPLE_INDEX = "example_index"
# Padding-free batches: how many of the flattened row's tokens are examples' (the rest is static-shape padding).
REAL_TOKENS = "real_tokens"


def disable_hub_telemetry() -> None:
    """Turn off the Hugging Face usage pings for this process and its children: a clinical pipeline sends none.

    TRL's trainers ping from ``__init__`` (trl/trainer/base_trainer.py, ``_BaseTrainer._send_telemetry`` ->
    ``huggingface_hub.utils.send_telemetry``), which honours the documented ``HF_HUB_DISABLE_TELEMETRY``. The hub reads
    that variable once, into ``huggingface_hub.constants``, when it is first imported — long before a trainer is
    built — so the constant is set too. Pinned by tests/unit/test_trainer_upstream.py.
    """
    from huggingface_hub import constants

    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
    constants.HF_HUB_DISABLE_TELEMETRY = True


# ---------------------------------------------------------------------------------------------------------------
# Checks on tokenized examples
# ---------------------------------------------------------------------------------------------------------------


def example_token_stats(dataset: Any) -> tuple[list[int], list[int]]:
    """Per-example total tokens and trained tokens (labels != -100 at positions > 0, which are the ones predicted).

    Reads the arrow columns in batches (no Python loop over tokens), so it stays cheap on 270k examples.
    """
    import numpy as np
    import pyarrow.compute as pc

    lengths: list[int] = []
    trained: list[int] = []
    for batch in dataset.with_format("arrow").iter(batch_size=4096):
        ids, labels = batch.column("input_ids"), batch.column("labels")
        lengths.extend(pc.list_value_length(ids).to_numpy(zero_copy_only=False).tolist())
        label_lengths = pc.list_value_length(labels).to_numpy(zero_copy_only=False)
        flat = pc.list_flatten(labels).to_numpy(zero_copy_only=False)
        parents = pc.list_parent_indices(labels).to_numpy(zero_copy_only=False)
        starts = np.concatenate([[0], np.cumsum(label_lengths)[:-1]])
        counted = flat != -100
        counted[starts[label_lengths > 0]] = False  # position 0 has no preceding token to predict it from
        trained.extend(np.bincount(parents, weights=counted, minlength=batch.num_rows).astype(int).tolist())
    return lengths, trained


def check_examples(dataset: Any, *, max_length: int, name: str, note_ids: list[str] | None = None) -> None:
    """Refuse examples longer than the budget (they would be truncated) or without any trained token.

    Raises:
        UserError: names how many examples fail, the longest length or example note_ids, and the fix.
    """
    lengths, trained = example_token_stats(dataset)
    too_long = [i for i, n in enumerate(lengths) if n > max_length]
    if too_long:
        raise UserError(
            f"{len(too_long)} of {len(lengths)} {name} examples are longer than max_seq_length={max_length} tokens "
            f"(longest {max(lengths)}); they would be truncated, cutting the summary. prepare_data budgets lengths "
            "with the tokenizer it was given: rerun it with this model's tokenizer (`--tokenizer_name_or_path`), "
            "or raise `max_seq_length`."
        )
    untrained = [i for i, n in enumerate(trained) if n < 1]
    if untrained:
        ids = [note_ids[i] for i in untrained[:5]] if note_ids else untrained[:5]
        raise UserError(
            f"{len(untrained)} {name} examples have no trained (summary) token, e.g. {ids}: the loss mask would "
            "skip them entirely. Check that their summaries are not empty and that the chat template renders the "
            "assistant turn after the prompt."
        )
    logger.info(
        "%s: %d examples, %d tokens (%d trained on, %.0f%%), longest %d of %d",
        name,
        len(lengths),
        sum(lengths),
        sum(trained),
        100.0 * sum(trained) / max(sum(lengths), 1),
        max(lengths) if lengths else 0,
        max_length,
    )


def gemma3_vlm_needs_token_type_ids() -> bool:
    """Whether this transformers' ``Gemma3ForConditionalGeneration`` refuses to train without ``token_type_ids``.

    Some 4.5x/5.x releases built the mask through ``create_causal_mask_mapping(..., is_training=...)`` and raised
    "`token_type_ids` is required as a model input when training" for text-only batches; 5.17 and 5.24 (checked in
    their sources) accept None. Detected by signature, so such a version gets all-zero ids (= every token is text).
    """
    try:
        from transformers.models.gemma3 import modeling_gemma3
    except ImportError:  # pragma: no cover - gemma3 ships with every supported transformers
        return False
    fn = getattr(modeling_gemma3, "create_causal_mask_mapping", None)
    return fn is not None and "is_training" in inspect.signature(fn).parameters


@dataclasses.dataclass
class BatchExtrasCollator:
    """Wraps TRL's collator: carries ``example_index`` into the batch (the trainer pops it before the forward), counts
    a padding-free batch's real tokens (``real_tokens``: its row may end in ``static_packed_shape`` padding) and,
    for Gemma 3 VLMs on transformers versions that need it, adds all-zero ``token_type_ids``."""

    inner: Callable[[list[dict[str, Any]]], dict[str, Any]]
    add_token_type_ids: bool = False

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.inner(examples)
        if examples and EXAMPLE_INDEX in examples[0]:
            batch[EXAMPLE_INDEX] = torch.tensor([int(ex[EXAMPLE_INDEX]) for ex in examples], dtype=torch.long)
        if "attention_mask" not in batch:
            batch[REAL_TOKENS] = torch.tensor(sum(len(ex["input_ids"]) for ex in examples), dtype=torch.long)
        if self.add_token_type_ids:
            batch["token_type_ids"] = torch.zeros_like(batch["input_ids"])
        return batch


# ---------------------------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------------------------


class DischargeSFTTrainer(CheckpointingTrainerMixin, SFTTrainer):
    """TRL's SFTTrainer with our checkpoint protocol, example checks, token accounting and no telemetry.

    Extra keyword arguments: ``max_seq_length`` (the token budget examples are checked against and packed to; the
    one channel of the budget: ``args.max_length`` must be None, or TRL would truncate),
    ``resolved_config_yaml`` (written into every checkpoint and ``final/``), ``note_ids_for_check`` (``{"train":
    [...], "eval": [...]}`` to name failing examples).
    """

    def __init__(
        self,
        *args: Any,
        max_seq_length: int,
        resolved_config_yaml: str,
        note_ids_for_check: dict[str, list[str]] | None = None,
        **kwargs: Any,
    ) -> None:
        training_args = kwargs.get("args")
        if training_args is not None and getattr(training_args, "max_length", None) is not None:
            raise ValueError(
                f"DischargeSFTTrainer: args.max_length = {training_args.max_length}, but the token budget is "
                f"`max_seq_length` ({max_seq_length}) alone; TRL's max_length would truncate examples (cut "
                "summaries). Set it to None."
            )
        # Read by _prepare_dataset, which SFTTrainer.__init__ calls: set before super().__init__.
        self.max_seq_length = max_seq_length
        self._resolved_config_yaml = resolved_config_yaml
        self._note_ids_for_check = note_ids_for_check or {}
        self.record_example_indices = False
        self._step_indices: list[int] = []
        self._token_counts: torch.Tensor | None = None
        self._window_start = time.perf_counter()
        self.total_tokens = 0
        self.total_seconds = 0.0
        self.last_train_loss: float | None = None
        self._nonfinite_loss: torch.Tensor | None = None
        self.nonfinite_guard: Any = None  # the NonFiniteGuard callback (set by sft.build_trainer)
        disable_hub_telemetry()  # before SFTTrainer.__init__, which sends the ping
        super().__init__(*args, **kwargs)

    # Our final/README.md replaces TRL's card, which TRL writes into output_dir at every checkpoint.
    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        return None

    # Kept private override: TRL has no hook between tokenization and packing (trl/trainer/sft_trainer.py,
    # SFTTrainer._prepare_dataset tokenizes, truncates to args.max_length and packs in one call, from __init__), and
    # the length check must see each example before packing merges them. TRL runs without packing here (so without
    # truncation too: args.max_length is None); we check, then pack with TRL's own pack_dataset. Pinned by
    # tests/unit/test_sft.py::test_packing_packs_to_max_seq_length_and_truncates_nothing and the signature check in
    # tests/unit/test_trainer_upstream.py.
    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):  # type: ignore[no-untyped-def]
        dataset = super()._prepare_dataset(dataset, processing_class, args, False, formatting_func, dataset_name)
        check_examples(
            dataset,
            max_length=self.max_seq_length,
            name=dataset_name,
            note_ids=self._note_ids_for_check.get(dataset_name),
        )
        if packing:
            dataset = dataset.select_columns(["input_ids", "labels"])
            dataset = pack_dataset(dataset, self.max_seq_length, args.packing_strategy, {})
        return dataset

    # Kept private override: Trainer._remove_unused_columns (transformers/trainer.py) drops every column not in
    # self._signature_columns, which TRL's SFTTrainer._set_signature_columns_if_needed fixes to input_ids / labels /
    # seq_lengths (ignoring args.label_names), and there is no public way to add one; example_index must reach the
    # batch for `log_note_ids`. Pinned by tests/unit/test_sft.py::test_packing_packs_to_max_seq_length_and_truncates_
    # nothing (a batch carries example_index) and tests/unit/test_trainer_upstream.py (TRL's fixed list).
    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if self._signature_columns is not None and EXAMPLE_INDEX not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, EXAMPLE_INDEX]

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if not self.is_fsdp_enabled:
            super().save_model(output_dir, _internal_call)
            if self.args.should_save:  # Trainer.save_model writes on the should_save process (through _save)
                self._write_resolved_config(Path(output_dir or self.args.output_dir))
            return
        # FSDP: our own adapter gathering and writing instead of transformers' (which writes nothing under
        # SHARDED_STATE_DICT, transformers#30491, and goes through PEFT's save, which drops every tensor of a nested
        # FSDP model: see save_fsdp_adapter). Collective: every rank enters; the main process gets the full LoRA
        # tensors and writes them. The resumable sharded model/optimizer state is saved by the checkpoint code.
        peft_model = self.accelerator.unwrap_model(self.model_wrapped)
        adapter = gather_fsdp_adapter(self.model_wrapped, peft_model)
        if self.args.should_save:
            if not adapter:
                raise UserError("FSDP: gathering the adapter gave no LoRA tensors; the checkpoint would be unusable")
            out = Path(output_dir or self.args.output_dir)
            save_fsdp_adapter(peft_model, adapter, out)
            # What Trainer._save writes besides the model (its PEFT call would drop every tensor, see above).
            if self.processing_class is not None:
                self.processing_class.save_pretrained(str(out))
            torch.save(self.args, out / "training_args.bin")
            self._write_resolved_config(out)

    # Kept private override: Trainer._load_from_checkpoint (transformers/trainer.py) is where a resume loads the
    # model, and under FSDP it calls accelerate's load_fsdp_model, which drops our adapter (below); no callback runs
    # between it and the optimizer load. Pinned by tests/distributed/test_fsdp_adapter_reload.py (the reload) and
    # tests/unit/test_trainer_upstream.py (upstream still loads FSDP checkpoints through load_fsdp_model).
    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if self.is_fsdp_enabled:
            # transformers resumes through accelerate's load_fsdp_model(adapter_only=True), which for FSDP1 goes
            # through PEFT's adapter-key selection that drops every tensor of a nested FSDP model (see
            # save_fsdp_adapter): our FSDP-QLoRA runs on 2 H100s resumed with an untrained adapter. Put the
            # checkpoint's adapter file back ourselves.
            wrapped = model if model is not None else self.model_wrapped
            n = load_fsdp_adapter(wrapped, self.accelerator.unwrap_model(wrapped), Path(resume_from_checkpoint))
            logger.info("FSDP resume: %d adapter tensors loaded from %s", n, resume_from_checkpoint)

    def _write_resolved_config(self, output_dir: Path) -> None:
        # The resolved config (incl. the base model) goes into every checkpoint, before its manifest is written.
        atomic_write_text(output_dir / RESOLVED_CONFIG_NAME, self._resolved_config_yaml)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[no-untyped-def]
        example_index = inputs.pop(EXAMPLE_INDEX, None)
        real_tokens = inputs.pop(REAL_TOKENS, None)
        if self.model is not None and self.model.training:
            labels = inputs["labels"]
            if "attention_mask" in inputs:
                tokens = inputs["attention_mask"].sum()
            elif real_tokens is not None:  # padding-free: one row, possibly ending in static-shape padding
                tokens = real_tokens.to(labels.device)
            else:
                tokens = torch.tensor(inputs["input_ids"].numel(), device=labels.device)
            trained = (labels[..., 1:] != -100).sum()
            counts = torch.stack([tokens.to(torch.long), trained.to(torch.long)])
            self._token_counts = counts if self._token_counts is None else self._token_counts + counts
            if self.record_example_indices and example_index is not None:
                self._step_indices.extend(int(i) for i in example_index.tolist())
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self.model is not None and self.model.training:
            loss = result[0] if isinstance(result, tuple) else result
            bad = ~torch.isfinite(loss.detach()).all()
            self._nonfinite_loss = bad if self._nonfinite_loss is None else self._nonfinite_loss | bad
        return result

    def pop_nonfinite_loss(self) -> torch.Tensor | None:
        """Whether a micro-batch since the last call had a non-finite loss (a device bool tensor; None: none ran)."""
        flag, self._nonfinite_loss = self._nonfinite_loss, None
        return flag

    def start_throughput_window(self) -> None:
        self._window_start = time.perf_counter()

    def pop_step_example_indices(self) -> list[int]:
        out, self._step_indices = self._step_indices, []
        return out

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            self._add_throughput(logs)
        super().log(logs, start_time)

    def _add_throughput(self, logs: dict[str, float]) -> None:
        counts = self._token_counts
        if counts is None:
            counts = torch.zeros(2, dtype=torch.long, device=self.args.device)
        # Collective: every rank reaches `log` at the same logging step.
        counts = self.accelerator.reduce(counts.clone(), reduction="sum")
        tokens, trained = (int(x) for x in counts.tolist())
        self._token_counts = None
        now = time.perf_counter()
        seconds = max(now - self._window_start, 1e-9)
        self._window_start = now
        self.total_tokens += tokens
        self.total_seconds += seconds
        self.last_train_loss = float(logs["loss"])
        logs.update(
            tokens=tokens,
            trained_tokens=trained,
            tokens_per_second=round(tokens / seconds, 2),
            trained_tokens_per_second=round(trained / seconds, 2),
            total_tokens=self.total_tokens,
            window_seconds=round(seconds, 4),
        )
        if self.args.device.type == "cuda":
            gib = 2**30
            peak = torch.cuda.max_memory_allocated()
            logs.update(
                gpu_memory_allocated_gib=round(torch.cuda.memory_allocated() / gib, 3),
                gpu_memory_peak_gib=round(peak / gib, 3),
                gpu_memory_reserved_gib=round(torch.cuda.memory_reserved() / gib, 3),
            )
            if self.accelerator.num_processes > 1:
                # Every rank's peak (ZeRO/FSDP shards unevenly; rank 0 alone hides the fullest GPU). Collective, as
                # the reduce above: all ranks log at the same step.
                peaks = self.accelerator.gather(torch.tensor([peak], dtype=torch.long, device=self.args.device))
                logs.update({f"gpu_memory_peak_gib_rank{r}": round(int(p) / gib, 3) for r, p in enumerate(peaks)})


# ---------------------------------------------------------------------------------------------------------------
# Callbacks
# ---------------------------------------------------------------------------------------------------------------


class StableTensorBoardCallback(TensorBoardCallback):
    """transformers' TensorBoard callback writing to one fixed directory. A resumed run passes ``purge_step`` =
    resumed step + 1, so TensorBoard hides what the interrupted run logged after the checkpoint it resumes from and
    the curves continue without duplicates."""

    def __init__(self, log_dir: Path, purge_step: int | None) -> None:
        super().__init__()
        self.logging_dir = str(log_dir)
        self._purge_step = purge_step

    def on_train_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        # Where HF creates its writer (on the main process, at train begin), but with purge_step, which its
        # constructor cannot be given; HF then uses this writer (it only makes one when tb_writer is None).
        if state.is_world_process_zero and self.tb_writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.tb_writer = SummaryWriter(log_dir=self.logging_dir, purge_step=self._purge_step)
        return super().on_train_begin(args, state, control, **kwargs)


class MetricsCallback(TrainerCallback):
    """Every log event -> one ``metrics.jsonl`` row; with note_ids, one row per step with every rank's note_ids."""

    def __init__(self, trainer: DischargeSFTTrainer, log: MetricsLog, note_ids: list[str] | None) -> None:
        self.trainer = trainer
        self.log = log
        self.note_ids = note_ids

    def on_train_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        self.trainer.start_throughput_window()
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):  # type: ignore[no-untyped-def]
        if logs:
            self.log.write({"step": state.global_step, **logs})
        return control

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if self.note_ids is None:
            return control
        from accelerate.utils import gather_object

        local = self.trainer.pop_step_example_indices()
        # Collective (all ranks reach on_step_end together); rank-major order.
        gathered = gather_object([local]) if self.trainer.accelerator.num_processes > 1 else [local]
        self.log.write({"step": state.global_step, "note_ids": [self.note_ids[i] for ids in gathered for i in ids]})
        return control
