"""sft_qlora: QLoRA fine-tuning on prepare_data's output with TRL's SFTTrainer, through ``accelerate launch``.

Follow one batch: ``train.parquet`` rows become TRL *conversational prompt-completion* examples (prompt =
:func:`~dischargesum.data.formatting.prompt_messages` of the note with the data card's instruction, completion =
the summary turn), TRL renders them with the model's chat template and builds ``labels`` with -100 on every prompt
token (so the loss is on the summary only, without relying on ``{% generation %}`` markers, which MedGemma's
template lacks). :class:`DischargeSFTTrainer` then checks every example — no example is longer than the token budget
(nothing is ever truncated: TRL would cut the *end*, i.e. the summary) and each keeps at least one trained token —
and packs when asked. TRL's fused LM head computes the loss in chunks without materialising 262k-wide logits.

Outputs in ``output_dir``: ``checkpoint-<step>/`` (committed atomically with a manifest by
:mod:`dischargesum.training.checkpoint_store`), ``tensorboard/`` (one directory for the whole run, resumed runs
continue the same curves), ``metrics.jsonl`` (one row per logging step; with ``log_note_ids`` one more row per
optimizer step with the note_ids it trained on), ``final/`` (adapter, tokenizer, resolved config, data fingerprint,
model card, manifest) and a completed ``manifest.json``.

``metrics.jsonl`` rows: ``{"step", "loss", "learning_rate", "grad_norm", "tokens", "trained_tokens",
"tokens_per_second", "trained_tokens_per_second", "total_tokens", "window_seconds", "epoch", ...}`` at each logging
step (``tokens`` = non-pad tokens processed since the last row, ``trained_tokens`` = tokens that carry loss), plus
``{"step", "eval_loss", ...}`` rows for evaluations, ``{"step", "note_ids": [...]}`` rows when ``log_note_ids``
(ranks' examples concatenated rank-major) and one final ``{"step", "train_runtime", ...}`` row. After a resume,
rows past the resumed step are dropped first, so every step appears once.

Why one module of ~700 lines: it is the stage's single path, read top to bottom — data card and token budget,
TRL arguments, trainer build, resume / train / finish, model card — and each part is used only by the next. What is
reusable lives beside it: the trainer (:mod:`~dischargesum.training.trainer`), the checkpoint store and its Trainer
integration (:mod:`~dischargesum.training.checkpoint_store`, :mod:`~dischargesum.training.checkpoint_trainer`),
preemption, the non-finite guard and metrics.jsonl.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dischargesum.artifacts import DATA_FINGERPRINT_FILE, FINAL_DIR, MODEL_CARD_FILE, TENSORBOARD_DIR
from dischargesum.cli import EXIT_NONFINITE, UserError
from dischargesum.config import ConfigError, SFTConfig
from dischargesum.data import schema
from dischargesum.logging_utils import get_logger, is_main_process, show_progress
from dischargesum.manifest import (
    MANIFEST_NAME,
    RESOLVED_CONFIG_NAME,
    ArtifactError,
    atomic_write_json,
    atomic_write_text,
    chmod_private_tree,
    config_hash,
    fingerprint_file,
    finish_run,
    mark_interrupted,
    private_dir,
    private_umask,
    read_manifest,
    require_artifact,
    start_run,
)
from dischargesum.training.metrics import METRICS_FILE, MetricsLog

if TYPE_CHECKING:
    from datasets import Dataset

    from dischargesum.modeling import Hardware, ModelInfo, TrainingPlan

logger = get_logger(__name__)

DATASETS_CACHE_DIR = ".datasets_cache"


# ---------------------------------------------------------------------------------------------------------------
# Inputs: data card, token budget
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DataInputs:
    """prepare_data's output as sft_qlora uses it."""

    dataset_dir: Path
    fingerprint: str
    card: dict[str, Any]
    instruction: str
    max_seq_length: int


def load_data_inputs(cfg: SFTConfig) -> DataInputs:
    """Check ``dataset_dir`` is a completed prepare_data output and resolve the token budget.

    ``max_seq_length`` relates to the data's budget as follows: prepare_data shortened every note so that prompt +
    summary fits its ``max_seq_length`` (summaries are never cut). Training with a *smaller* budget would have to
    cut summaries, so it is refused; ``none`` takes the data's budget; a *larger* one is accepted (it only sets the
    row length when packing).

    Raises:
        ArtifactError: not a completed prepare_data output, or a file is missing.
        ConfigError: ``max_seq_length`` below the data card's, or a data card without the fields training needs.
    """
    files = [schema.SPLIT_FILES["train"], schema.SPLIT_FILES["validation"], schema.DATA_CARD_FILE]
    manifest = require_artifact(cfg.dataset_dir, stage="prepare_data", field="dataset_dir", files=files)
    d = Path(cfg.dataset_dir)
    try:
        card = json.loads((d / schema.DATA_CARD_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"`dataset_dir` = {d}: {schema.DATA_CARD_FILE} is unreadable ({exc}).") from None
    for key in ("instruction", "max_seq_length"):
        if key not in card:
            raise ArtifactError(
                f"`dataset_dir` = {d}: {schema.DATA_CARD_FILE} lacks `{key}`; rerun prepare_data with this version."
            )
    data_budget = int(card["max_seq_length"])
    if cfg.max_seq_length is None:
        budget = data_budget
    elif cfg.max_seq_length < data_budget:
        raise ConfigError(
            f"sft_qlora: `max_seq_length` = {cfg.max_seq_length} is below the data's budget of {data_budget} tokens "
            f"({d / schema.DATA_CARD_FILE}): examples that fill the budget would lose the end of their summary. Use "
            f"`--max_seq_length none` (= {data_budget}), or rerun prepare_data with `--max_seq_length "
            f"{cfg.max_seq_length}`."
        )
    else:
        budget = cfg.max_seq_length
    fingerprint = manifest.get("data_fingerprint")
    if not fingerprint:
        raise ArtifactError(f"`dataset_dir` = {d}: its manifest has no data_fingerprint; rerun prepare_data.")
    return DataInputs(d, str(fingerprint), card, str(card["instruction"]), budget)


def _to_prompt_completion(row: dict[str, Any], index: int, instruction: str) -> dict[str, Any]:
    from dischargesum.data.formatting import completion_messages, prompt_messages

    return {
        "prompt": prompt_messages(row["note"], instruction),
        "completion": completion_messages(row["summary"]),
        "example_index": index,
    }


def load_split(
    data: DataInputs, split: str, *, cache_dir: Path | None = None, limit: int = 0
) -> tuple[Dataset, list[str]]:
    """A split as TRL conversational prompt-completion examples plus its note_ids (row ``i`` <-> ``note_ids[i]``).

    Each example keeps ``example_index`` (its row in the split) so a step's note_ids can be recorded without
    carrying strings through the collator. ``cache_dir`` holds the datasets cache (arrow copies of the notes and
    their tokenization): sft_qlora keeps it inside the run's output directory rather than in ~/.cache, so copies
    of credentialed text stay where the user put the run.
    """
    import pyarrow.parquet as pq
    from accelerate import PartialState
    from datasets import Dataset

    path = data.dataset_dir / schema.SPLIT_FILES[split]
    note_ids = [str(x) for x in pq.read_table(path, columns=["note_id"]).column("note_id").to_pylist()]
    with PartialState().main_process_first():  # the main process builds the datasets cache, the others reuse it
        ds = Dataset.from_parquet(str(path), cache_dir=str(cache_dir) if cache_dir else None)
        if limit and limit < len(ds):
            ds = ds.select(range(limit))
            note_ids = note_ids[:limit]
        ds = ds.map(
            _to_prompt_completion,
            with_indices=True,
            fn_kwargs={"instruction": data.instruction},
            remove_columns=ds.column_names,
            desc=f"formatting {split}",
        )
    if len(ds) == 0:
        raise UserError(f"`dataset_dir` = {data.dataset_dir}: the {split} split is empty; rerun prepare_data.")
    return ds, note_ids


# ---------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------


def run_is_complete(cfg: SFTConfig, data_fingerprint: str) -> bool:
    """True when ``output_dir`` holds a completed run of exactly this config (same hash) on the same data, with its
    ``final/``: rerunning the command then does nothing (changing e.g. ``max_steps`` resumes instead)."""
    out = Path(cfg.output_dir)
    manifest = read_manifest(out)
    final = read_manifest(out / FINAL_DIR)
    return bool(
        manifest
        and final
        and manifest.get("stage") == SFTConfig.STAGE
        and manifest.get("status") == "complete"
        and final.get("status") == "complete"
        and manifest.get("config_hash") == config_hash(cfg)
        and manifest.get("data_fingerprint") == data_fingerprint
        and (out / FINAL_DIR / "adapter_model.safetensors").is_file()
    )


def _check_output_dir(cfg: SFTConfig) -> None:
    """Refuse an output_dir that holds another stage's artifact, or old checkpoints with ``resume: none``.

    Raises:
        ConfigError: naming the directory and the fix.
    """
    from dischargesum.training.checkpoint_store import list_checkpoint_dirs

    out = Path(cfg.output_dir)
    manifest = read_manifest(out)
    if manifest and manifest.get("stage") != SFTConfig.STAGE:
        raise ConfigError(
            f"sft_qlora: `output_dir` = {out} holds a `{manifest.get('stage')}` artifact; training would overwrite "
            "its manifest. Choose another `output_dir`."
        )
    if cfg.resume_from_checkpoint.strip().lower() in ("none", "false", "no") and list_checkpoint_dirs(out):
        raise ConfigError(
            f"sft_qlora: `resume_from_checkpoint` = none, but `output_dir` = {out} already holds checkpoints "
            f"({', '.join(p.name for _s, p in list_checkpoint_dirs(out))}). A fresh run there would mix with them "
            "(rotation and `auto` resume go by step). Use a new `output_dir`, delete them, or resume (`auto`)."
        )


def plan_training(cfg: SFTConfig, hw: Hardware | None = None) -> tuple[ModelInfo, TrainingPlan]:
    """Read the model's config.json and run the preflight (no weights loaded, nothing allocated)."""
    from dischargesum.modeling import detect_hardware, preflight, read_model_info

    info = read_model_info(cfg.model_name_or_path)
    return info, preflight(cfg, info, hw or detect_hardware())


def _trl_args(cfg: SFTConfig, plan: TrainingPlan, data: DataInputs):
    from trl import SFTConfig as TRLSFTConfig

    kwargs: dict[str, Any] = dict(
        output_dir=cfg.output_dir,
        seed=cfg.seed,
        max_steps=cfg.max_steps,
        num_train_epochs=cfg.num_train_epochs,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        optim=cfg.optim,
        bf16=plan.bf16,
        fp16=False,
        use_cpu=plan.device == "cpu",
        logging_steps=cfg.logging_steps,
        # A NaN/inf loss must show in the logs, not be replaced by the running mean (HF's default).
        logging_nan_inf_filter=False,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        # Rotation is ours (checkpoint_store.rotate_checkpoints): HF's can delete the last good checkpoint.
        save_total_limit=None,
        eval_strategy="steps" if cfg.eval_steps else "no",
        eval_steps=cfg.eval_steps or None,
        per_device_eval_batch_size=cfg.per_device_eval_batch_size,
        # TensorBoard only, through our callback (one stable directory, purge on resume); nothing remote.
        report_to="none",
        # Text-only LoRA: every trainable parameter gets a gradient every step (the vision tower is frozen).
        ddp_find_unused_parameters=False,
        dataloader_num_workers=0,
        remove_unused_columns=True,
        # TRL: conversational prompt-completion, loss on the completion only (unless the recipe asks for the whole
        # sequence); lengths are checked, not truncated.
        completion_only_loss=cfg.completion_only_loss,
        assistant_only_loss=False,
        # TRL's max_length truncates (it would cut the summary): off. The budget reaches the trainer only as
        # DischargeSFTTrainer(max_seq_length=...), which checks every example against it and packs to it.
        max_length=None,
        packing=cfg.packing,
        packing_strategy="bfd",
        padding_free=cfg.padding_free,
        # One flattened row per micro-batch, padded to its largest possible length: a fixed shape every step.
        pad_to_multiple_of=(
            cfg.per_device_train_batch_size * data.max_seq_length if cfg.static_packed_shape else None
        ),
        dataset_num_proc=cfg.dataset_num_proc if cfg.dataset_num_proc > 1 else None,
        use_liger_kernel=cfg.use_liger_kernel,
        activation_offloading=cfg.activation_offloading,
        # No bars in a log file (not a terminal): the Trainer then prints its {'loss': ...} lines plainly.
        disable_tqdm=not show_progress(),
        log_level="warning",
    )
    # transformers 5.24 renamed gradient_checkpointing to activation_checkpointing (the old name warns); 5.17 only
    # has the old one. Both keep the two attributes in sync, which TRL reads.
    names = {f.name for f in dataclasses.fields(TRLSFTConfig)}
    prefix = "activation" if "activation_checkpointing" in names else "gradient"
    kwargs[f"{prefix}_checkpointing"] = cfg.gradient_checkpointing
    checkpointing_kwargs: dict[str, Any] | None = None
    if cfg.gradient_checkpointing:
        checkpointing_kwargs = {"use_reentrant": False}
        if cfg.selective_checkpointing:
            # TRL-only key: SFTTrainer wraps the model with a policy that saves the attention ops' outputs.
            checkpointing_kwargs["selective"] = True
    kwargs[f"{prefix}_checkpointing_kwargs"] = checkpointing_kwargs
    return TRLSFTConfig(**kwargs)


def run_facts(cfg: SFTConfig, data: DataInputs, plan: TrainingPlan, world_size: int):
    """What every checkpoint records about this run (the resume guards compare it)."""
    from dischargesum.modeling import lora_facts, resolve_model_path
    from dischargesum.training.checkpoint_store import RunFacts

    return RunFacts.create(
        config_hash=config_hash(cfg),
        data_fingerprint=data.fingerprint,
        base_model=resolve_model_path(cfg.model_name_or_path),
        quantization=plan.quantization_facts(),
        lora=lora_facts(cfg),
        max_seq_length=data.max_seq_length,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        world_size=world_size,
    )


def build_trainer(
    cfg: SFTConfig,
    data: DataInputs,
    plan: TrainingPlan,
    *,
    facts: Any,
    resume_step: int = 0,
    model: Any = None,
) -> Any:
    """Load tokenizer, datasets and model, and build the :class:`~dischargesum.training.trainer.DischargeSFTTrainer`
    with its callbacks (checkpoint protocol, TensorBoard in ``<output_dir>/tensorboard``, metrics.jsonl).

    Raises:
        UserError: an example is longer than the budget or has no trained token.
    """
    from dischargesum.data.budget import chat_template_fingerprint
    from dischargesum.modeling import (
        cast_trainable_parameters,
        is_vlm_model,
        load_model_for_training,
        load_tokenizer,
        lora_config,
    )
    from dischargesum.training.checkpoint_trainer import make_checkpoint_callbacks
    from dischargesum.training.fault_injection import fault_pause
    from dischargesum.training.nonfinite import NonFiniteGuard
    from dischargesum.training.preemption import stop_if_preempted
    from dischargesum.training.trainer import (
        BatchExtrasCollator,
        DischargeSFTTrainer,
        MetricsCallback,
        StableTensorBoardCallback,
        gemma3_vlm_needs_token_type_ids,
    )

    out = Path(cfg.output_dir)
    if plan.compute_dtype == "float32" and os.environ.get("ACCELERATE_MIXED_PRECISION", "no") != "no":
        # The launcher asked for bf16 autocast where preflight chose fp32 (CPU / no-bf16 GPU): fp32 wins.
        os.environ["ACCELERATE_MIXED_PRECISION"] = "no"
    tb_dir = out / TENSORBOARD_DIR
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(tb_dir)  # transformers 5 ignores `logging_dir`
    had_events = tb_dir.is_dir() and any(tb_dir.glob("events.out.tfevents.*"))

    tokenizer = load_tokenizer(cfg.model_name_or_path)
    recorded = data.card.get("chat_template_sha256")
    if recorded and recorded != chat_template_fingerprint(tokenizer):
        logger.warning(
            "the data was length-budgeted with another chat template (%s, data card) than %s's: token counts may "
            "differ; every example is re-checked against max_seq_length=%d after tokenization",
            data.card.get("tokenizer_name_or_path"),
            cfg.model_name_or_path,
            data.max_seq_length,
        )
    # The datasets cache holds copies of the notes (arrow files of the splits, their formatting and TRL's
    # tokenization, written by `datasets` in load_split and SFTTrainer.__init__): owner-only, like the split files.
    # A umask around those writes (the library takes no mode; the model is loaded outside it, so a Hub download
    # keeps the cache's usual modes), then a chmod pass for files written by `dataset_num_proc` workers or by an
    # older run. Reading the cache back on resume is unaffected.
    cache_dir = out / DATASETS_CACHE_DIR
    if is_main_process():
        private_dir(cache_dir)
    with private_umask():
        train_ds, train_note_ids = load_split(data, "train", cache_dir=cache_dir)
        eval_ds: Dataset | None = None
        eval_note_ids: list[str] = []
        if cfg.eval_steps:
            eval_ds, eval_note_ids = load_split(data, "validation", cache_dir=cache_dir, limit=cfg.max_eval_samples)
    args = _trl_args(cfg, plan, data)
    fault_pause("load")
    # Between loading stages (collective): a preemption signal received so far stops every rank here.
    stop_if_preempted("tokenizer and datasets loaded")
    if model is None:
        model = load_model_for_training(cfg, plan)
        stop_if_preempted("model loaded")
    log = MetricsLog(out / METRICS_FILE, resume_step=resume_step)
    with private_umask():
        trainer = DischargeSFTTrainer(
            model=model,
            args=args,
            train_dataset=train_ds,
            eval_dataset=eval_ds,
            processing_class=tokenizer,
            peft_config=lora_config(cfg, is_vlm=is_vlm_model(model)),
            callbacks=make_checkpoint_callbacks(facts, out, cfg.save_total_limit),
            max_seq_length=data.max_seq_length,
            resolved_config_yaml=cfg.to_yaml(),
            note_ids_for_check={"train": train_note_ids, "eval": eval_note_ids},
        )
    if is_main_process():
        chmod_private_tree(cache_dir)
    cast = cast_trainable_parameters(trainer.model, plan.lora_dtype)
    if cast:
        logger.info("LoRA weights kept in %s (%d tensors re-cast after TRL)", plan.lora_dtype, cast)
    if plan.fused_lora:
        from dischargesum.training.fast_lora import enable_fused_lora

        logger.info("fused LoRA: %d projections use one fused autograd node", enable_fused_lora(trainer.model))
    trainer.data_collator = BatchExtrasCollator(
        trainer.data_collator, add_token_type_ids=plan.is_vlm and gemma3_vlm_needs_token_type_ids()
    )
    trainer.record_example_indices = cfg.log_note_ids
    trainer.total_tokens = log.prior_tokens
    trainer.total_seconds = log.prior_seconds
    trainer.add_callback(StableTensorBoardCallback(tb_dir, purge_step=resume_step + 1 if had_events else None))
    trainer.add_callback(MetricsCallback(trainer, log, train_note_ids if cfg.log_note_ids else None))
    # After DefaultFlowCallback: it may veto the save that callback asked for at a non-finite step.
    trainer.nonfinite_guard = NonFiniteGuard(trainer, cfg.nonfinite_patience)
    trainer.add_callback(trainer.nonfinite_guard)
    return trainer


def train(cfg: SFTConfig) -> int:
    """The body of ``scripts/sft_qlora.py``: returns 0 (done or already done), 143 (preempted, checkpoint committed),
    3 (stopped on a non-finite loss / gradient norm, last finite state committed; see
    :mod:`dischargesum.training.nonfinite`).

    Raises:
        ConfigError, ArtifactError, UserError: problems the user can fix (exit code 2), all found before the model
            is loaded except the per-example checks, which need the tokenizer.
    """
    data = load_data_inputs(cfg)
    out = Path(cfg.output_dir)
    if run_is_complete(cfg, data.fingerprint):
        logger.info(
            "%s already holds a completed run of this exact config (final/ is there): nothing to do. Use a new "
            "`output_dir` (or change the config, e.g. raise `max_steps`) to train again.",
            out,
        )
        return 0
    _check_output_dir(cfg)
    _info, plan = plan_training(cfg)
    for note in plan.notes:
        logger.info("%s", note)

    from accelerate import PartialState

    from dischargesum.training.preemption import (
        PREEMPTED_EXIT_CODE,
        PreemptedBeforeTraining,
        preemption_signal_name,
        set_preemption_outcome,
        stop_if_preempted,
    )

    # cpu=True on a CPU run: otherwise accelerate ignores the launcher's ranks on a machine without a GPU (torchrun
    # on CPU, e.g. multi_node.yaml's two machines) and the run facts would record world size 1.
    state = PartialState(cpu=plan.device == "cpu")
    # Every rank has read the output directory's state before the main process starts rewriting it.
    state.wait_for_everyone()
    started = False
    try:
        # A signal during the imports and the preflight stops here, before output_dir is touched.
        stop_if_preempted("startup")
        started = True
        trainer, resume, base_path = _start_and_build(cfg, data, plan, state.num_processes)
        stop_if_preempted("trainer built")
    except PreemptedBeforeTraining as exc:
        if started and state.is_main_process:
            mark_interrupted(out, interrupted_by=preemption_signal_name(), interrupted_in=exc.stage, checkpoint=None)
        set_preemption_outcome("nothing to save yet")
        logger.warning(
            "preempted (%s) before the first step, %s: nothing to save yet; exiting with %d so the scheduler requeues",
            preemption_signal_name() or "signal on another rank",
            exc.stage,
            PREEMPTED_EXIT_CODE,
        )
        return PREEMPTED_EXIT_CODE
    return _run(cfg, data, plan, state, trainer, resume, base_path)


def _start_and_build(cfg: SFTConfig, data: DataInputs, plan: TrainingPlan, world_size: int) -> tuple[Any, Any, str]:
    """Resolve the resume checkpoint, start the run's manifest, build the trainer (the loading half of train)."""
    from dischargesum.modeling import resolve_model_path
    from dischargesum.training.checkpoint_store import checkpoint_global_step, resolve_resume_checkpoint

    out = Path(cfg.output_dir)
    facts = run_facts(cfg, data, plan, world_size)
    resume = resolve_resume_checkpoint(cfg.resume_from_checkpoint, out, facts, cfg.allow_resume_mismatch)
    resume_step = (checkpoint_global_step(resume) or 0) if resume is not None else 0
    base_path = resolve_model_path(cfg.model_name_or_path)
    start_run(
        out,
        cfg,
        inputs={
            "dataset_dir": str(data.dataset_dir.resolve()),
            "data_fingerprint": data.fingerprint,
            "base_model": base_path,
            "resume_from": str(resume) if resume else None,
        },
    )
    trainer = build_trainer(cfg, data, plan, facts=facts, resume_step=resume_step)
    return trainer, resume, base_path


def _run(
    cfg: SFTConfig, data: DataInputs, plan: TrainingPlan, state: Any, trainer: Any, resume: Any, base_path: str
) -> int:
    """Train, then write final/ (or, when preempted, mark the manifest interrupted and return 143)."""
    from dischargesum.modeling import base_weights_digest
    from dischargesum.training.checkpoint_store import find_latest_valid_checkpoint
    from dischargesum.training.preemption import (
        PREEMPTED_EXIT_CODE,
        preemption_requested,
        preemption_signal_name,
        set_preemption_outcome,
    )

    out = Path(cfg.output_dir)
    digest_before = base_weights_digest(trainer.model) if cfg.check_base_unchanged and state.is_main_process else None
    n_trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    logger.info(
        "training %s (%s, %s compute, 4-bit=%s, attention=%s) on %d process(es): %d trainable parameters, "
        "%d training examples, resume from %s",
        cfg.model_name_or_path,
        type(trainer.model.get_base_model()).__name__,
        plan.compute_dtype,
        plan.load_in_4bit,
        plan.attn_implementation,
        state.num_processes,
        n_trainable,
        len(trainer.train_dataset),
        resume or "scratch",
    )

    t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    invocation_seconds = time.perf_counter() - t0
    # A signal after the last step's checks (the loop has finished): the run is complete, so write final/ and exit 0
    # rather than drop the steps since the last periodic checkpoint.
    finished = trainer.state.max_steps > 0 and trainer.state.global_step >= trainer.state.max_steps
    if preemption_requested() and not (finished and _stopped_at_step(trainer) is None):
        committed = find_latest_valid_checkpoint(out, verify_checksums=False)
        set_preemption_outcome(f"committed {committed}" if committed else "nothing to save yet")
        if state.is_main_process:
            mark_interrupted(
                out,
                interrupted_by=preemption_signal_name(),
                interrupted_in="training",
                checkpoint=str(committed) if committed else None,
            )
        logger.warning(
            "preempted: checkpoint committed, exiting with %d so the scheduler requeues", PREEMPTED_EXIT_CODE
        )
        return PREEMPTED_EXIT_CODE
    stopped = trainer.nonfinite_guard.stopped
    if stopped is not None:
        message = stopped.message(
            learning_rate=cfg.learning_rate,
            max_grad_norm=cfg.max_grad_norm,
            patience=cfg.nonfinite_patience,
            output_dir=str(out),
        )
        logger.error("%s", message)
        if state.is_main_process:
            failed = {**(read_manifest(out) or {}), "status": "failed", "failure": message}
            atomic_write_json(out / MANIFEST_NAME, failed)
        return EXIT_NONFINITE

    digest_after = base_weights_digest(trainer.model) if digest_before is not None else None
    if digest_before is not None and digest_before != digest_after:
        raise RuntimeError(f"the frozen base weights changed during training ({digest_before} -> {digest_after})")
    summary = {
        "global_step": trainer.state.global_step,
        "final_train_loss": trainer.last_train_loss,
        "total_tokens": trainer.total_tokens,
        "train_seconds": round(trainer.total_seconds, 2),
        "this_invocation_seconds": round(invocation_seconds, 2),
        "world_size": state.num_processes,
        "distributed_type": plan.distributed_type,
        "device": _device_description(plan),
        "compute_dtype": plan.compute_dtype,
        "load_in_4bit": plan.load_in_4bit,
        "attn_implementation": plan.attn_implementation,
        "trainable_parameters": n_trainable,
        "base_weights_digest_before": digest_before,
        "base_weights_digest_after": digest_after,
    }
    write_final(trainer, cfg, data, base_path, summary)
    return 0


def _stopped_at_step(trainer: Any) -> int | None:
    """The step at which the preemption callback stopped the run (None: it did not)."""
    from dischargesum.training.checkpoint_trainer import PreemptionCallback

    for cb in trainer.callback_handler.callbacks:
        if isinstance(cb, PreemptionCallback):
            return cb.stopped_at_step
    return None


def _device_description(plan: TrainingPlan) -> str:
    if plan.device != "cuda":
        return "cpu"
    import torch

    return f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"


def write_final(trainer: Any, cfg: SFTConfig, data: DataInputs, base_path: str, summary: dict[str, Any]) -> Path:
    """Write ``final/`` (adapter, tokenizer, resolved config, data fingerprint, model card, manifest) and complete
    the run's manifest. All ranks call it (saving is collective under DeepSpeed/FSDP); the main process writes."""
    out = Path(cfg.output_dir)
    final = out / FINAL_DIR
    if is_main_process():
        # Mark final/ incomplete before rewriting it (a longer run over a finished one): a crash mid-write then
        # leaves a directory that generate refuses, never a complete-looking mix of old and new files.
        final.mkdir(parents=True, exist_ok=True)
        atomic_write_json(final / MANIFEST_NAME, {**(read_manifest(out) or {}), "status": "running"})
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(final))
    trainer.accelerator.wait_for_everyone()
    if not is_main_process():
        return final
    atomic_write_json(
        final / DATA_FINGERPRINT_FILE,
        {
            "dataset_dir": str(data.dataset_dir.resolve()),
            "data_fingerprint": data.fingerprint,
            "max_seq_length": data.max_seq_length,
            "data_card": data.card,
        },
    )
    atomic_write_text(final / MODEL_CARD_FILE, model_card(cfg, data, base_path, summary))
    outputs = {
        p.name: fingerprint_file(p, final) for p in sorted(final.iterdir()) if p.is_file() and p.name != MANIFEST_NAME
    }
    finish_run(final, outputs, base_model=base_path, data_fingerprint=data.fingerprint, training=summary)
    run_outputs = {
        f"{FINAL_DIR}/{name}": {**info, "path": f"{FINAL_DIR}/{info['path']}"} for name, info in outputs.items()
    }
    finish_run(out, run_outputs, base_model=base_path, data_fingerprint=data.fingerprint, training=summary)
    logger.info(
        "done: %d steps, final loss %s, %d tokens -> %s",
        summary["global_step"],
        summary["final_train_loss"],
        summary["total_tokens"],
        final,
    )
    return final


def model_card(cfg: SFTConfig, data: DataInputs, base_path: str, summary: dict[str, Any]) -> str:
    """The ``final/README.md`` model card: what was trained on what, and how it went (no note text)."""
    splits = data.card.get("splits", {})
    split_rows = ", ".join(f"{k} {v.get('rows')}" for k, v in splits.items() if isinstance(v, dict))
    loss = summary.get("final_train_loss")
    loss_text = "n/a" if loss is None or (isinstance(loss, float) and math.isnan(loss)) else f"{loss:.4f}"
    hours = summary.get("train_seconds", 0.0) / 3600
    topology = {"NO": "single process", "MULTI_CPU": "DDP over gloo", "MULTI_GPU": "DDP"}.get(
        str(summary.get("distributed_type")), str(summary.get("distributed_type"))
    )
    lines = [
        "---",
        f"base_model: {base_path}",
        "library_name: peft",
        "pipeline_tag: text-generation",
        "tags: [dischargesum, lora, qlora, sft, clinical-summarization]"
        if cfg.load_in_4bit
        else "tags: [dischargesum, lora, sft, clinical-summarization]",
        "---",
        "",
        f"# LoRA adapter: brief hospital course from a discharge note ({Path(cfg.output_dir).name})",
        "",
        f"Fine-tuned from `{cfg.model_name_or_path}` by `dischargesum` sft_qlora on prepare_data's output "
        f"(`{data.dataset_dir}`, fingerprint `{data.fingerprint[:16]}`). The loss covers the summary only; prompts "
        "use the data card's instruction and the model's chat template.",
        "",
        "## Training summary",
        "",
        "| | |",
        "|---|---|",
        f"| optimizer steps | {summary.get('global_step')} |",
        f"| final training loss | {loss_text} |",
        f"| tokens processed (non-pad) | {summary.get('total_tokens'):,} |",
        f"| training time | {summary.get('train_seconds', 0.0):.1f} s ({hours:.2f} h) |",
        f"| hardware | {summary.get('world_size')} x {summary.get('device')}, {topology} |",
        f"| precision | {summary.get('compute_dtype')} compute, 4-bit base: {summary.get('load_in_4bit')} |",
        f"| trainable parameters | {summary.get('trainable_parameters'):,} |",
        "",
        "## Data",
        "",
        f"- rows per split: {split_rows or 'see data_fingerprint.json'}",
        f"- token budget (prompt + summary): {data.max_seq_length}; summaries are never truncated",
        f"- normalization: {data.card.get('normalization', 'unknown')}",
        "",
        "## Configuration",
        "",
        f"- LoRA r={cfg.lora_r}, alpha={cfg.lora_alpha}, dropout={cfg.lora_dropout}, targets "
        f"{', '.join(cfg.lora_target_modules)}",
        f"- 4-bit base: {cfg.load_in_4bit} ({cfg.bnb_4bit_quant_type}, double quant {cfg.bnb_4bit_use_double_quant})",
        f"- learning rate {cfg.learning_rate} ({cfg.lr_scheduler_type}), per-device batch "
        f"{cfg.per_device_train_batch_size} x accumulation {cfg.gradient_accumulation_steps} x "
        f"{summary.get('world_size')} process(es), packing {cfg.packing}",
        f"- full resolved config: `{RESOLVED_CONFIG_NAME}`; data card: `{DATA_FINGERPRINT_FILE}`",
        "",
        "## Use",
        "",
        "```bash",
        "accelerate launch scripts/generate.py --config recipes/<model>/generate.yaml --adapter <this directory>",
        "```",
        "",
        "The base model is recorded in `adapter_config.json` (`base_model_name_or_path`). To export a standalone "
        "merged bf16 model: `python scripts/export.py --adapter <this directory> --output_dir <output>`.",
        "",
        "## Limitations",
        "",
        "Trained on de-identified clinical notes (MIMIC-IV derived, or synthetic for the demo); outputs must be "
        "reviewed by a clinician. No note or summary text is stored in this directory.",
        "",
    ]
    return "\n".join(lines)
