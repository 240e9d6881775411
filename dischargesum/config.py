"""Typed, strict configuration for every stage, and the one parser all scripts share.

Precedence: dataclass defaults < ``--config recipe.yaml`` < ``--field value`` on the command line. Every field
carries ``metadata={"help": ...}``; ``--help`` lists them all. Unknown keys — in the YAML or on the command line —
are errors that name the key and the closest valid one (a misspelt ``save_step`` must never be silently ignored,
unlike TRL's ``fail_with_unknown_args=False``). Cross-field checks live in each dataclass's ``__post_init__`` and
run before any model or data is touched.

Values on the command line are parsed by the field's type: ``--lora_r 16``, ``--packing`` / ``--packing false``,
``--lora_target_modules q_proj,v_proj`` (or a YAML/JSON list), ``--column_mapping '{"input": "text"}'``,
``--adapter none`` for an optional field.

Why one module (~1.3k lines): the stage dataclasses are the project's public configuration surface and share one
parser, one validation style and one help convention; a newcomer looks up any recipe key here, and
``scripts/stage_status.py`` / the tests enumerate every stage's fields from one place. Each dataclass is short;
the length is the sum of documented fields (every field carries its help text), not of tangled logic.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import sys
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

T = TypeVar("T", bound="BaseConfig")


class ConfigError(ValueError):
    """A configuration problem the user must fix; the message names the key, the value and the fix."""


def _help(text: str, **kwargs: Any) -> Any:
    """A dataclass field with help text (the only way fields are declared in this module)."""
    if "default_factory" in kwargs:
        return field(default_factory=kwargs.pop("default_factory"), metadata={"help": text, **kwargs})
    return field(default=kwargs.pop("default"), metadata={"help": text, **kwargs})


@dataclass
class BaseConfig:
    """Fields every stage has."""

    output_dir: str = _help("Directory this stage writes into (created if missing).", default="")
    seed: int = _help("Random seed for everything this stage does (data order, sampling, initialisation).", default=42)
    log_level: Literal["debug", "info", "warning", "error"] = _help(
        "Log level on the main process; other ranks log warnings only.", default="info"
    )

    # Stage name used in manifests and error messages; subclasses override.
    STAGE: typing.ClassVar[str] = "base"

    def __post_init__(self) -> None:
        _check_types(self)
        if not self.output_dir:
            raise ConfigError(f"{self.STAGE}: `output_dir` is empty. Set it in the recipe or pass `--output_dir DIR`.")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


# ---------------------------------------------------------------------------------------------------------------
# Stage configs
# ---------------------------------------------------------------------------------------------------------------


# The instruction that leads every prompt (training and inference). Defined here, in the base layer, because it is
# PrepareDataConfig's default; dischargesum.data.formatting re-exports it next to the prompt builders.
DEFAULT_INSTRUCTION = (
    "Write the brief hospital course for this discharge note. Keep every medication with its dose, route and "
    "frequency, every vital sign and lab value, every date, diagnosis and procedure, and every negation."
)

# Defect rows the synthetic generator can inject (dischargesum.data.synthetic.DEFECTS is this tuple); here so that
# PrepareDataConfig checks `synthetic_defects` without importing the data package.
SYNTHETIC_DEFECTS: tuple[str, ...] = (
    "empty_note",
    "whitespace_target",
    "empty_target",
    "invalid_utf8",
    "missing_subject_id",
    "missing_subject_id_underivable",
    "duplicate_note_id",
    "giant_row",
    "non_string",
)


@dataclass
class PrepareDataConfig(BaseConfig):
    """prepare_data: raw BHC rows -> train/validation/test parquet, rejects.jsonl, data_card.json."""

    STAGE: typing.ClassVar[str] = "prepare_data"

    source: str = _help(
        "Input: a CSV / JSONL / Parquet file (.csv.gz / .jsonl.gz too): PhysioNet MIMIC-IV-Ext-BHC (the licensed "
        "source), the Kaggle mirror `BHC_MIMIC-IV.csv`, or any file with `column_mapping`; `synthetic` to generate "
        "rows; or `kagglehub:<owner>/<dataset>` (needs kagglehub and Kaggle credentials).",
        default="synthetic",
    )
    schema: Literal["auto", "kaggle", "physionet", "custom"] = _help(
        "Input schema; `auto` detects Kaggle or PhysioNet from the columns, `custom` needs `column_mapping`.",
        default="auto",
    )
    column_mapping: dict[str, str] = _help(
        "Map our column names (note_id, subject_id, input, target, gt_entities) to the file's, e.g. "
        "{input: text, target: bhc}. subject_id may be absent: it is derived from MIMIC note ids (10000032-DS-21).",
        default_factory=dict,
    )
    sample_fraction: float = _help(
        "Keep this fraction of the input rows (0 < f <= 1), chosen by a keyed hash of (seed, row number): the same "
        "file, seed and fraction give the same rows, spread over the whole file. 1 keeps every row. For a quick "
        "end-to-end run on real data, e.g. 0.01.",
        default=1.0,
    )
    synthetic_rows: int = _help("Rows to generate when `source: synthetic`.", default=2000)
    synthetic_profile: Literal["kaggle", "physionet", "tiny"] = _help(
        "Length profile of synthetic rows (kaggle ≈ 2.6k/1.2k chars, physionet ≈ 9k/2.3k, tiny ≈ 500/150).",
        default="kaggle",
    )
    synthetic_schema: Literal["kaggle", "physionet"] = _help("Schema of synthetic rows.", default="kaggle")
    normalization: Literal["clinical", "seed"] = _help(
        "`clinical` keeps case, digits, units, negations and ___ blanks; `seed` reproduces the seed prototype's "
        "lossy NLTK cleaning for comparison only.",
        default="clinical",
    )
    tokenizer_name_or_path: str = _help(
        "Tokenizer (with chat template) used to count tokens for the length budget; the model you will train.",
        default="google/medgemma-4b-it",
    )
    max_seq_length: int = _help(
        "Token budget for prompt + summary; longer notes are shortened, summaries are never cut.", default=2048
    )
    validation_fraction: float = _help("Fraction of patients (not rows) in the validation split.", default=0.05)
    test_fraction: float = _help("Fraction of patients (not rows) in the test split.", default=0.05)
    max_reject_fraction: float = _help(
        "Fail the run when more than this fraction of rows is rejected (schema drift must be loud).", default=0.01
    )
    utf8_errors: Literal["strict", "replace"] = _help(
        "Invalid UTF-8 in a row: `strict` rejects the row, `replace` substitutes U+FFFD and keeps it.",
        default="strict",
    )
    debug: int = _help(
        "Print this many rendered training examples (from the start of the input, after validation, normalisation "
        "and the length budget) with the loss mask visible — trained tokens inside ⟦ ⟧ — then exit without writing.",
        default=0,
    )
    instruction: str = _help(
        "Instruction that leads the user turn of every prompt (training and inference read it from the data card).",
        default=DEFAULT_INSTRUCTION,
    )
    synthetic_defects: list[str] = _help(
        "Defect rows to inject when `source: synthetic` (any of " + ", ".join(SYNTHETIC_DEFECTS) + "; e.g. "
        "empty_note,duplicate_note_id); shows the reject path in demos.",
        default_factory=list,
    )
    input_split_column: str | None = _help(
        "Column of a pre-split input (values train / validation|val|dev / test): keep that split after checking "
        "that no patient is in two splits. `none` (default): split by a hash of subject_id and `seed`.",
        default=None,
    )
    min_note_tokens: int = _help(
        "Reject a row (summary_too_long) when the prompt frame plus the whole summary leave fewer than this many "
        "of max_seq_length tokens for the note.",
        default=64,
    )
    note_shortening: Literal["sections", "middle"] = _help(
        "How an over-long note is shortened: `sections` drops the sections least useful for a hospital course "
        "first (instructions, follow-up, family/social history, exam, ...), then cuts the middle; `middle` only "
        "cuts the middle. Summaries are never shortened.",
        default="sections",
    )
    shortening_rank_by_target: bool = _help(
        "`sections` shortening of train and validation notes drops first the sections that support the fewest of "
        "the summary's entities (none before one; DROP_ORDER breaks ties), so training inputs keep what their "
        "target cites. Test notes always keep the fixed DROP_ORDER: generate and eval use them as at inference, "
        "where there is no target. false: the fixed order everywhere. Ignored with `note_shortening: middle`. Costs "
        "entity extraction of each over-budget note and its summary.",
        default=True,
    )
    entity_support_stats: Literal["shortened", "all", "off"] = _help(
        "Data card: per split, the fraction of summary entities supported by the model input before (whole note) "
        "and after shortening, for the shortened notes (`shortened`), also over every note (`all`: extracts "
        "entities of every note and summary, the costliest step of the stage at 270k rows), or `off`.",
        default="shortened",
    )
    max_note_chars: int = _help(
        "Reject notes longer than this many characters (note_too_long): far beyond any real discharge note "
        "(MIMIC max ≈ 15-30k), such rows are concatenation errors. 0 disables the check.",
        default=100_000,
    )
    seed_min_word_count: int = _help(
        "`normalization: seed` only: drop words seen fewer than this many times in the corpus (the seed's "
        "rare-word filter); 1 keeps every word.",
        default=2,
    )
    chunk_rows: int = _help("Rows read, validated and written per chunk (bounds memory).", default=8192)
    num_workers: int = _help(
        "Worker processes that validate and normalise chunks while the main process tokenizes; 0 runs everything "
        "in the main process.",
        default=2,
    )
    tokenize_batch_size: int = _help(
        "Examples per apply_chat_template batch (a fast tokenizer encodes a batch on all cores).", default=512
    )
    token_counting: Literal["auto", "exact"] = _help(
        "`exact` tokenizes every example as TRL's SFTTrainer does (prompt, then prompt + completion). `auto` gives "
        "the same counts tokenizing each note once, by splitting the rendered chat before the special token that "
        "opens the generation prompt — used only when verified against `exact` on probe texts, and re-checked on "
        "every 64th row (a mismatch stops the run).",
        default="auto",
    )
    plots: bool = _help("Write length histograms (lengths_tokens.png, lengths_chars.png).", default=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_fraction(self, "validation_fraction", self.validation_fraction)
        _check_fraction(self, "test_fraction", self.test_fraction)
        _check_fraction(self, "max_reject_fraction", self.max_reject_fraction)
        if not 0.0 < self.sample_fraction <= 1.0:
            raise ConfigError(
                f"prepare_data: `sample_fraction` is {self.sample_fraction}; it must be in (0, 1] (1 keeps every row)."
            )
        if self.validation_fraction + self.test_fraction >= 1.0:
            raise ConfigError(
                f"prepare_data: validation_fraction + test_fraction = "
                f"{self.validation_fraction + self.test_fraction:g} leaves no training patients; keep the sum < 1."
            )
        if self.max_seq_length < 64:
            raise ConfigError(f"prepare_data: `max_seq_length` is {self.max_seq_length}; it must be at least 64.")
        if self.schema == "custom" and not self.column_mapping:
            raise ConfigError(
                "prepare_data: `schema: custom` needs `column_mapping` (e.g. {input: text, target: bhc})."
            )
        unknown = set(self.column_mapping) - {"note_id", "subject_id", "input", "target", "gt_entities"}
        if unknown:
            raise ConfigError(
                f"prepare_data: `column_mapping` has unknown key(s) {sorted(unknown)}; "
                "valid keys are note_id, subject_id, input, target, gt_entities."
            )
        if self.source == "synthetic" and self.synthetic_rows < 1:
            raise ConfigError(f"prepare_data: `synthetic_rows` is {self.synthetic_rows}; it must be >= 1.")
        if self.debug < 0:
            raise ConfigError(f"prepare_data: `debug` is {self.debug}; use 0 (off) or a positive count.")
        for name in ("chunk_rows", "tokenize_batch_size", "seed_min_word_count"):
            if getattr(self, name) < 1:
                raise ConfigError(f"prepare_data: `{name}` is {getattr(self, name)}; it must be >= 1.")
        for name in ("num_workers", "max_note_chars", "min_note_tokens"):
            if getattr(self, name) < 0:
                raise ConfigError(f"prepare_data: `{name}` is {getattr(self, name)}; it must be >= 0.")
        if self.min_note_tokens >= self.max_seq_length:
            raise ConfigError(
                f"prepare_data: `min_note_tokens` ({self.min_note_tokens}) must be below `max_seq_length` "
                f"({self.max_seq_length})."
            )
        if not self.instruction.strip():
            raise ConfigError("prepare_data: `instruction` is empty; the prompt needs an instruction.")
        bad = [d for d in self.synthetic_defects if d not in SYNTHETIC_DEFECTS]
        if bad:
            raise ConfigError(
                f"prepare_data: `synthetic_defects` has unknown name(s) {bad}; choose from "
                f"{', '.join(SYNTHETIC_DEFECTS)}."
            )
        if self.input_split_column is not None and not self.input_split_column.strip():
            raise ConfigError("prepare_data: `input_split_column` is empty; name a column or pass `none`.")


@dataclass
class SFTConfig(BaseConfig):
    """sft_qlora: QLoRA supervised fine-tuning with TRL's SFTTrainer (loss on the summary only)."""

    STAGE: typing.ClassVar[str] = "sft_qlora"

    # --- data -------------------------------------------------------------------------------------------------
    dataset_dir: str = _help("prepare_data's output directory (train.parquet, validation.parquet, ...).", default="")
    max_seq_length: int | None = _help(
        "Maximum tokens per training example (prompt + summary). `none` uses the data card's budget "
        "(prepare_data's max_seq_length). A value smaller than the data card's is refused (it would cut summaries); "
        "a larger one only changes the packing length when `packing` is on.",
        default=None,
    )
    dataset_num_proc: int = _help("Processes that tokenize the dataset (1 = in the training process).", default=1)
    # --- model and quantisation -------------------------------------------------------------------------------
    model_name_or_path: str = _help("Base model: Hub id or local directory.", default="google/medgemma-4b-it")
    load_in_4bit: bool = _help(
        "QLoRA: load the frozen base in 4-bit with bitsandbytes (NF4). `false` trains LoRA on a bf16/fp32 base.",
        default=True,
    )
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = _help("bitsandbytes 4-bit data type.", default="nf4")
    bnb_4bit_use_double_quant: bool = _help(
        "Quantise the 4-bit quantisation constants too (saves ~0.4 bit/parameter).", default=True
    )
    precision: Literal["auto", "bf16", "fp32", "fp16"] = _help(
        "Compute precision. `auto`: bf16 on GPUs that support it, fp32 elsewhere (CPU, pre-Ampere GPUs) with a "
        "message. `fp16` is refused for Gemma 3 (its activations overflow fp16 and the loss turns NaN).",
        default="auto",
    )
    attn_implementation: str = _help(
        "Attention kernel: auto, eager, sdpa, flash_attention_2, flash_attention_3, flex_attention, or a Hub kernel "
        "`org/repo`. `auto`: flex_attention when `packing`/`padding_free` trains on a CUDA GPU (its block mask "
        "skips the blocks that the document boundaries and Gemma 3's sliding window leave empty; sdpa computes one "
        "dense mask over the whole packed row), sdpa otherwise. With `packing`/`padding_free` only kernels known "
        "to keep packed examples apart are accepted (sdpa/eager/flex get a block-diagonal mask from position_ids, "
        "flash uses varlen sequence lengths).",
        default="auto",
    )
    # --- LoRA ---------------------------------------------------------------------------------------------------
    lora_r: int = _help("LoRA rank.", default=32)
    lora_alpha: int = _help("LoRA scaling numerator (scale = lora_alpha / lora_r).", default=64)
    lora_dropout: float = _help(
        "Dropout on the LoRA input. 0 keeps the fused/fast LoRA paths available and measured no worse here.",
        default=0.0,
    )
    lora_target_modules: list[str] = _help(
        "Linear layers of the language model that get LoRA adapters (the vision tower of MedGemma never does).",
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    lora_dtype: Literal["auto", "float32", "bfloat16"] = _help(
        "Storage dtype of the trainable LoRA weights. `auto`: float32 master weights (compute still runs in bf16 "
        "under autocast), except under FSDP, which needs one dtype per flat parameter (bfloat16).",
        default="auto",
    )
    # --- optimisation -------------------------------------------------------------------------------------------
    max_steps: int = _help("Optimizer steps to train; -1 trains `num_train_epochs` instead.", default=-1)
    num_train_epochs: float = _help("Epochs over the train split when `max_steps` is -1.", default=1.0)
    per_device_train_batch_size: int = _help("Micro-batch size per process.", default=1)
    gradient_accumulation_steps: int = _help("Micro-batches per optimizer step.", default=8)
    learning_rate: float = _help("Peak learning rate of the LoRA parameters.", default=2e-4)
    lr_scheduler_type: Literal["cosine", "linear", "constant", "constant_with_warmup"] = _help(
        "Learning-rate schedule after warm-up.", default="cosine"
    )
    warmup_steps: float = _help("Warm-up steps; a value below 1 is a fraction of the total steps.", default=0.03)
    weight_decay: float = _help("AdamW weight decay of the LoRA weights.", default=0.0)
    max_grad_norm: float = _help("Gradient clipping norm (0 disables clipping).", default=1.0)
    optim: Literal[
        "adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "adafactor", "sgd"
    ] = _help(
        "Optimizer (transformers' names). The 8-bit/paged bitsandbytes optimizers need a GPU.", default="adamw_torch"
    )
    gradient_checkpointing: bool = _help(
        "Recompute activations in the backward pass: much less memory, ~20-30% more compute.", default=True
    )
    selective_checkpointing: bool = _help(
        "With `gradient_checkpointing`: keep each layer's attention output instead of recomputing it (TRL's "
        "selective activation checkpointing): less recompute for one hidden-state-sized tensor per layer.",
        default=False,
    )
    activation_offloading: bool = _help(
        "Move the activations the backward needs (with `gradient_checkpointing`: each layer's input) to pinned CPU "
        "memory during the forward, overlapped on a side stream (TRL's activation offloading). Lowers GPU memory "
        "for small cards at some speed. GPU only.",
        default=False,
    )
    compile_layers: bool = _help(
        "torch.compile each decoder layer of the language model (GPU only). The first steps include the "
        "compilation (a minute or more); shapes that vary between batches are recompiled once as dynamic.",
        default=False,
    )
    fused_lora: bool = _help(
        "Compute each LoRA projection as one fused autograd node (base GEMM + LoRA GEMMs accumulating into one "
        "output, hand-written backward; dischargesum/training/fast_lora.py) instead of PEFT's forward, which "
        "copies, scales and adds the full output once more per projection. Same math (tested against PEFT). Off "
        "automatically under FSDP and DeepSpeed ZeRO-3, and per layer wherever the fast path does not apply "
        "(LoRA dropout > 0, DoRA, biases). Off by default: on one H200 at the medgemma recipe's micro-batch it "
        "measured no faster than PEFT's forward (13,367 vs 14,008 tokens/s, within step-to-step noise; "
        "benchmarks/results/train_throughput_h200_2026-12-06.json).",
        default=False,
    )
    packing: bool = _help(
        "Pack several examples into each `max_seq_length` row (best-fit decreasing, padding-free); attention never "
        "crosses example boundaries.",
        default=False,
    )
    padding_free: bool = _help(
        "Concatenate each micro-batch into one row without padding (no packing across micro-batches).", default=False
    )
    static_packed_shape: bool = _help(
        "With `packing` or `padding_free`: pad each micro-batch's one flattened row to exactly "
        "per_device_train_batch_size x max_seq_length tokens, so every step has the same shape and flex_attention "
        "(and `compile_layers`) compile once instead of once per packed length. The padding is masked out of "
        "attention and loss and not counted as trained or input tokens; it costs its compute (best-fit packing "
        "fills rows ~95% on the kaggle profile). Off by default: its speed is not yet measured.",
        default=False,
    )
    completion_only_loss: bool = _help(
        "Loss on the summary tokens only (prompt tokens get label -100). `false` trains on the whole sequence, the "
        "seed prototype's setting (kept for comparison: it spends the loss on re-predicting the note).",
        default=True,
    )
    use_liger_kernel: bool = _help(
        "Liger Triton kernels (RMSNorm, GeGLU, RoPE). GPU only; needs the `gpu` extra (liger-kernel).", default=False
    )
    # --- evaluation ---------------------------------------------------------------------------------------------
    eval_steps: int = _help("Validation loss every N optimizer steps (0 = no evaluation during training).", default=0)
    max_eval_samples: int = _help("Validation examples used for that loss (0 = the whole split).", default=256)
    per_device_eval_batch_size: int = _help("Micro-batch size per process for evaluation.", default=4)
    # --- checkpoints and resume ---------------------------------------------------------------------------------
    save_steps: int = _help("Save a resumable checkpoint every N optimizer steps.", default=200)
    save_total_limit: int = _help(
        "Keep the newest N valid checkpoints (older ones are removed only after a newer one is committed).", default=3
    )
    resume_from_checkpoint: str = _help(
        "`auto` resumes from the newest valid checkpoint in output_dir (or starts fresh when there is none), "
        "`none` always starts fresh, or a checkpoint directory to resume from (an error if it is invalid).",
        default="auto",
    )
    allow_resume_mismatch: bool = _help(
        "Resume even when the checkpoint was written with a different effective batch, data, base model, "
        "quantisation, LoRA alpha/dropout or max_seq_length (logged as a warning). Off: such a resume is refused. "
        "A different LoRA rank or target modules is always refused (the adapter tensors would not load).",
        default=False,
    )
    nonfinite_patience: int = _help(
        "Optimizer steps in a row with a non-finite loss or gradient norm that are skipped (no update) before "
        "training stops. 0: stop at the first one. On a stop the state after the last finite update is committed "
        "as a checkpoint and sft_qlora exits with code 3, naming learning_rate and max_grad_norm.",
        default=0,
    )
    # --- logging --------------------------------------------------------------------------------------------------
    logging_steps: int = _help(
        "Log loss, learning rate, grad norm, tokens/s and GPU memory every N steps (TensorBoard + metrics.jsonl).",
        default=10,
    )
    log_note_ids: bool = _help(
        "Also record the note_ids of every optimizer step's examples in metrics.jsonl (ids only, never text; "
        "for exact-resume audits). Needs `packing: false`.",
        default=False,
    )
    check_base_unchanged: bool = _help(
        "Hash the frozen base weights before and after training and fail if they differ (records both digests in "
        "the manifest). Costs one pass over the weights; not available under ZeRO-3/FSDP (sharded weights).",
        default=False,
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.dataset_dir:
            raise ConfigError("sft_qlora: `dataset_dir` is empty; point it at prepare_data's output_dir.")
        for name in (
            "per_device_train_batch_size",
            "gradient_accumulation_steps",
            "save_steps",
            "save_total_limit",
            "logging_steps",
            "lora_r",
            "lora_alpha",
            "dataset_num_proc",
            "per_device_eval_batch_size",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"sft_qlora: `{name}` is {getattr(self, name)}; it must be >= 1.")
        for name in ("eval_steps", "max_eval_samples"):
            if getattr(self, name) < 0:
                raise ConfigError(
                    f"sft_qlora: `{name}` is {getattr(self, name)}; use 0 (off/all) or a positive count."
                )
        if self.max_seq_length is not None and self.max_seq_length < 16:
            raise ConfigError(
                f"sft_qlora: `max_seq_length` is {self.max_seq_length}; use `none` (the data card's) or >= 16."
            )
        if self.max_steps == 0 or self.max_steps < -1:
            raise ConfigError(f"sft_qlora: `max_steps` is {self.max_steps}; use a positive count or -1 for epochs.")
        if self.max_steps == -1 and self.num_train_epochs <= 0:
            raise ConfigError(f"sft_qlora: `num_train_epochs` is {self.num_train_epochs}; it must be > 0.")
        if self.learning_rate <= 0:
            raise ConfigError(f"sft_qlora: `learning_rate` is {self.learning_rate}; it must be > 0.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"sft_qlora: `lora_dropout` is {self.lora_dropout}; it must be in [0, 1).")
        if self.warmup_steps < 0:
            raise ConfigError(f"sft_qlora: `warmup_steps` is {self.warmup_steps}; it must be >= 0.")
        if self.max_grad_norm < 0 or self.weight_decay < 0:
            raise ConfigError("sft_qlora: `max_grad_norm` and `weight_decay` must be >= 0.")
        if self.nonfinite_patience < 0:
            raise ConfigError(f"sft_qlora: `nonfinite_patience` is {self.nonfinite_patience}; it must be >= 0.")
        if not self.lora_target_modules:
            raise ConfigError("sft_qlora: `lora_target_modules` is empty; list the projections to adapt, e.g. q_proj.")
        if self.resume_from_checkpoint.strip() == "":
            raise ConfigError(
                "sft_qlora: `resume_from_checkpoint` is empty; use auto, none or a checkpoint directory."
            )
        if self.log_note_ids and self.packing:
            raise ConfigError(
                "sft_qlora: `log_note_ids: true` needs `packing: false` (a packed row mixes several notes and "
                "packing drops the note index). Turn one of them off."
            )
        known_attention = ("auto", "eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")
        if self.attn_implementation not in known_attention and "/" not in self.attn_implementation:
            raise ConfigError(
                f"sft_qlora: `attn_implementation` = {self.attn_implementation!r} is not one of "
                f"{', '.join(known_attention)} (or a Hub kernel `org/repo`)."
                + _closest_choice(self.attn_implementation, known_attention)
            )
        if self.packing and self.padding_free:
            raise ConfigError(
                "sft_qlora: `packing` already trains padding-free; set `padding_free: false` (or `packing: false` "
                "to flatten each micro-batch without packing)."
            )
        if self.static_packed_shape and not (self.packing or self.padding_free):
            raise ConfigError(
                "sft_qlora: `static_packed_shape: true` pads the flattened row of `packing` / `padding_free`, which "
                "are both off; set `packing: true` or `static_packed_shape: false`."
            )
        if self.selective_checkpointing and not self.gradient_checkpointing:
            raise ConfigError(
                "sft_qlora: `selective_checkpointing: true` refines gradient checkpointing, which is off; set "
                "`gradient_checkpointing: true` or `selective_checkpointing: false`."
            )


@dataclass
class InferenceConfig(BaseConfig):
    """Engine fields shared by generate and compress (dischargesum.inference); not a stage by itself."""

    STAGE: typing.ClassVar[str] = "inference"

    # --- decoding -----------------------------------------------------------------------------------------------
    max_new_tokens: int = _help("Maximum tokens generated per summary (per attempt in compress).", default=512)
    do_sample: bool = _help(
        "Sample instead of greedy decoding. Each note gets its own seed (`seed_policy`), so its sample does not "
        "depend on the batch, rank or resume it landed in.",
        default=False,
    )
    temperature: float = _help("Sampling temperature (only with `do_sample: true`).", default=1.0)
    top_p: float = _help("Nucleus sampling: keep the smallest set of tokens with this probability mass.", default=1.0)
    top_k: int = _help("Keep only the k most likely tokens when sampling (0 = off).", default=0)
    seed_policy: Literal["note_id", "input_order"] = _help(
        "Per-note sampling seed: `note_id` = hash(seed, note_id) (stable when the input is filtered, reordered or "
        "resumed); `input_order` = hash(seed, row number in the input).",
        default="note_id",
    )
    # --- batching -----------------------------------------------------------------------------------------------
    batch_token_budget: int = _help(
        "Per process: notes are sorted by prompt length (longest first) and batched so that batch size x (longest "
        "prompt + max_new_tokens) stays within this many tokens (the KV cache grows with it). ~200k suits a 4B "
        "model in bf16 on an 80 GB GPU; a batch that runs out of GPU memory is split in halves and retried.",
        default=131_072,
    )
    max_batch_size: int = _help("Per process: at most this many notes in one batch.", default=64)
    # --- model --------------------------------------------------------------------------------------------------
    precision: Literal["auto", "bf16", "fp32", "fp16"] = _help(
        "Weights/compute dtype. `auto`: bf16 on GPUs that support it, fp32 elsewhere. `fp16` is refused for "
        "Gemma 3 (its activations overflow fp16).",
        default="auto",
    )
    load_in_4bit: bool = _help(
        "Load the base in 4-bit NF4 (bitsandbytes) for small GPUs; slower than bf16 and keeps the adapter unmerged.",
        default=False,
    )
    merge_adapter: bool | None = _help(
        "Merge the LoRA adapter into the base weights before generating (faster decoding). `none` = merge unless "
        "`load_in_4bit` (merging into 4-bit weights re-quantises them and changes the model).",
        default=None,
    )
    attn_implementation: Literal["auto", "eager", "sdpa", "flash_attention_2", "flash_attention_3"] = _help(
        "Attention kernel. `auto` = sdpa, with decoding steps of grouped-query models through "
        "`sdpa_gqa_fold` (same results, no copy of the KV cache per step: dischargesum/inference/attention.py); "
        "`sdpa` = transformers' own.",
        default="auto",
    )
    cache_implementation: Literal["dynamic", "static"] = _help(
        "KV cache. `static`: one preallocated cache reused by every batch (fixed shapes: batches are padded to one "
        "size), which `compile` needs for CUDA graphs.",
        default="dynamic",
    )
    compile: bool = _help(
        "torch.compile the decoding step (mode reduce-overhead: CUDA graphs); needs `cache_implementation: "
        "static`. Pays off on GPU for long runs; the first batch includes minutes of compilation.",
        default=False,
    )
    sliding_window_cache: Literal["ring", "full"] = _help(
        "Static cache only: sliding-window layers (Gemma 3: 5 of every 6) as ring buffers of `sliding_window` "
        "slots (`ring`: their KV memory and the attention's reads stop growing with the prompt; needs "
        "`attn_implementation: auto` on a grouped-query model, else `full` is used) or full-length layers (`full`).",
        default="ring",
    )
    prefill_chunk_rows: int = _help(
        "Static cache only: prefill a batch this many notes at a time (0 = all at once). Bounds the prefill's "
        "activation peak, which is what runs out of memory first at large batches.",
        default=32,
    )
    compile_cache_dir: str | None = _help(
        "Where torch.compile keeps its compiled artifacts between runs (inductor/FX/AOT caches), so a rerun or a "
        "resumed run does not pay the compilation again. `none` = $TORCHINDUCTOR_CACHE_DIR if set, else "
        "~/.cache/dischargesum/torch_compile.",
        default=None,
    )
    # --- run ----------------------------------------------------------------------------------------------------
    limit: int = _help("Process only the first N notes of the input (0 = all).", default=0)
    overwrite: bool = _help(
        "Delete earlier outputs in output_dir and start over. Off: a rerun resumes (skips notes already written) "
        "and refuses an output_dir written with different generation settings.",
        default=False,
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        stage = self.STAGE
        for name in ("max_new_tokens", "batch_token_budget", "max_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{stage}: `{name}` is {getattr(self, name)}; it must be >= 1.")
        if self.batch_token_budget <= self.max_new_tokens:
            raise ConfigError(
                f"{stage}: `batch_token_budget` = {self.batch_token_budget} leaves no room for a prompt with "
                f"`max_new_tokens` = {self.max_new_tokens}; raise the budget (e.g. 131072) or lower max_new_tokens."
            )
        if self.prefill_chunk_rows < 0:
            raise ConfigError(
                f"{stage}: `prefill_chunk_rows` is {self.prefill_chunk_rows}; use 0 (whole batch) or a positive count."
            )
        if self.limit < 0:
            raise ConfigError(f"{stage}: `limit` is {self.limit}; use 0 (all notes) or a positive count.")
        if self.top_k < 0:
            raise ConfigError(f"{stage}: `top_k` is {self.top_k}; use 0 (off) or a positive count.")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"{stage}: `top_p` is {self.top_p}; it must be in (0, 1].")
        if self.do_sample and self.temperature <= 0:
            raise ConfigError(
                f"{stage}: `temperature` is {self.temperature} with `do_sample: true`; use a positive temperature, "
                "or `do_sample: false` for greedy decoding."
            )
        if not self.do_sample:
            changed = [
                f"{name}={getattr(self, name)}"
                for name, default in (("temperature", 1.0), ("top_p", 1.0), ("top_k", 0))
                if getattr(self, name) != default
            ]
            if changed:
                raise ConfigError(
                    f"{stage}: {', '.join(changed)} only act when sampling, but `do_sample` is false; "
                    "set `do_sample: true` or remove them."
                )
        if self.compile and self.cache_implementation != "static":
            raise ConfigError(
                f"{stage}: `compile: true` needs `cache_implementation: static` (CUDA graphs need fixed shapes); "
                f"it is `{self.cache_implementation}`."
            )
        if self.compile and self.load_in_4bit:
            raise ConfigError(
                f"{stage}: `compile: true` with `load_in_4bit: true`: transformers does not compile 4-bit "
                "(bitsandbytes) models and would silently decode uncompiled; set `compile: false` (and "
                "`cache_implementation: dynamic`), or load in bf16 (`load_in_4bit: false`)."
            )
        if self.load_in_4bit and self.merge_adapter:
            raise ConfigError(
                f"{stage}: `merge_adapter: true` with `load_in_4bit: true` would re-quantise the merged weights and "
                "change the model; set `merge_adapter: false` (or none), or load in bf16 (`load_in_4bit: false`)."
            )
        if self.load_in_4bit and self.precision == "fp32":
            raise ConfigError(
                f"{stage}: `load_in_4bit: true` computes in bf16/fp16, not `precision: fp32`; use `precision: auto`."
            )

    @property
    def merge_adapter_effective(self) -> bool:
        """Whether the adapter is merged: `merge_adapter`, or by default whenever the base is not 4-bit."""
        return (not self.load_in_4bit) if self.merge_adapter is None else self.merge_adapter


@dataclass
class GenerateConfig(InferenceConfig):
    """generate (stage 1): discharge summaries for a split from the fine-tuned model."""

    STAGE: typing.ClassVar[str] = "generate"

    dataset_dir: str = _help("prepare_data's output directory.", default="")
    split: Literal["train", "validation", "test"] = _help("Which split to summarise.", default="test")
    adapter: str | None = _help(
        "LoRA adapter directory (sft_qlora's `final/` or a checkpoint); `none` generates with the base model.",
        default=None,
    )
    model_name_or_path: str | None = _help(
        "Base model; default: the one recorded in the adapter's training config.", default=None
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.dataset_dir:
            raise ConfigError("generate: `dataset_dir` is empty; point it at prepare_data's output_dir.")
        if self.adapter is None and self.model_name_or_path is None:
            raise ConfigError("generate: set `adapter` (a final/ or checkpoint directory) or `model_name_or_path`.")


@dataclass
class CompressConfig(InferenceConfig):
    """compress (stage 2): shorten stage-1 summaries with a second model, keeping every clinical entity."""

    STAGE: typing.ClassVar[str] = "compress"

    input: str = _help("Stage-1 output (generate's stage1.jsonl).", default="")
    model_name_or_path: str = _help(
        "The compression model: Hub id or local directory.", default="meta-llama/Meta-Llama-3-8B-Instruct"
    )
    adapter: str | None = _help(
        "Optional LoRA adapter for the compression model (`none` = the model as is).", default=None
    )
    target_ratio: float = _help("Target length of the compressed summary relative to stage 1 (0-1].", default=0.5)
    retention_threshold: float = _help(
        "Accept a compression only when at least this fraction of the stage-1 summary's entities (shared extractor, "
        "same value/dose/date and negation) survive; otherwise re-prompt naming the missing ones.",
        default=0.9,
    )
    max_attempts: int = _help(
        "Generations per note (the first plus re-prompts). When none is accepted, the stage-1 summary is kept "
        "and the note is flagged `fallback: true`.",
        default=3,
    )
    max_length_ratio: float = _help(
        "Also reject an attempt longer than this fraction of the stage-1 summary (characters): a rewrite that is "
        "not shorter is not a compression. Generation per attempt is capped near this length too.",
        default=1.0,
    )
    chunk_notes: int = _help(
        "Per process: notes taken through all their attempts together before their records are written (larger = "
        "fuller retry batches; a crash redoes at most one chunk).",
        default=512,
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.input:
            raise ConfigError("compress: `input` is empty; point it at generate's stage1.jsonl.")
        if not 0.0 < self.target_ratio <= 1.0:
            raise ConfigError(f"compress: `target_ratio` is {self.target_ratio}; it must be in (0, 1], e.g. 0.5.")
        if not 0.0 <= self.retention_threshold <= 1.0:
            raise ConfigError(
                f"compress: `retention_threshold` is {self.retention_threshold}; it must be in [0, 1], e.g. 0.9."
            )
        if self.max_attempts < 1:
            raise ConfigError(f"compress: `max_attempts` is {self.max_attempts}; it must be >= 1.")
        if self.chunk_notes < 1:
            raise ConfigError(f"compress: `chunk_notes` is {self.chunk_notes}; it must be >= 1.")
        if self.max_length_ratio < self.target_ratio:
            raise ConfigError(
                f"compress: `max_length_ratio` = {self.max_length_ratio} is below `target_ratio` = "
                f"{self.target_ratio}: on-target rewrites would be rejected; use e.g. 1.0."
            )


@dataclass
class PipelineConfig(BaseConfig):
    """pipeline: generate then compress in one process; the stage-1 model is unloaded before stage 2 loads."""

    STAGE: typing.ClassVar[str] = "pipeline"

    generate_config: str = _help(
        "generate recipe (YAML); its output_dir is replaced by <output_dir>/generate.", default=""
    )
    compress_config: str = _help(
        "compress recipe (YAML); its output_dir is replaced by <output_dir>/compress and its input by stage 1's "
        "stage1.jsonl.",
        default="",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("generate_config", "compress_config"):
            if not getattr(self, name):
                raise ConfigError(f"pipeline: `{name}` is empty; pass `--{name} recipes/<model>/<stage>.yaml`.")


@dataclass
class EvalConfig(BaseConfig):
    """eval: entity fidelity, BERTScore, ROUGE and compression statistics, with a report.

    Modes: `stage1` scores generated summaries against the reference BHC and the source note; `stage2` scores
    compressed summaries against their stage-1 summary and the source note. Texts come from the predictions file
    (`column_mapping`) and, for what it lacks, from `dataset_dir` + `split` or a `references` file
    (`reference_column_mapping`), joined on note_id.
    """

    STAGE: typing.ClassVar[str] = "eval"
    TABLE_SUFFIXES: typing.ClassVar[tuple[str, ...]] = (".jsonl", ".csv", ".tsv", ".parquet")
    METRIC_FAMILIES: typing.ClassVar[tuple[str, ...]] = ("bertscore", "rouge", "entities", "numbers", "compression")
    PREDICTION_COLUMNS: typing.ClassVar[tuple[str, ...]] = ("note_id", "prediction", "reference", "source")
    REFERENCE_COLUMNS: typing.ClassVar[tuple[str, ...]] = ("note_id", "reference", "source")

    predictions: str = _help(
        "Predictions: our stage1.jsonl / stage2.jsonl, or any CSV / TSV / JSONL / Parquet with the column fields.",
        default="",
    )
    mode: Literal["auto", "stage1", "stage2"] = _help(
        "`stage1`: output vs reference BHC and source note; `stage2`: compressed summary vs its stage-1 summary and "
        "the source note; `auto`: from the manifest next to `predictions` (compress -> stage2, generate -> stage1), "
        "for another system's file from its mapped columns (a `stage1_summary` column, a prediction column named "
        "compressed / stage2, a reference column named generated / stage1 / output -> stage2), then its file name; "
        "the decision and its reason are logged.",
        default="auto",
    )
    column_mapping: dict[str, str] = _help(
        "Columns of the predictions file for our names note_id, prediction, reference, source, e.g. "
        "{prediction: generated_text, reference: gold}. Unset names take the mode's defaults (stage1: note_id, "
        "summary; stage2: the fields compress writes); reference / source unset here come from the dataset. "
        "`note_id: __row__` keys a file without an id column by its 1-based row number.",
        default_factory=dict,
    )
    dataset_dir: str = _help(
        "prepare_data's output directory: references (`summary`) and source notes (`note`) by note_id.", default=""
    )
    split: Literal["train", "validation", "test"] = _help(
        "Which split of `dataset_dir` holds the references.", default="test"
    )
    references: str = _help(
        "Instead of `dataset_dir`: a CSV / TSV / JSONL / Parquet file with note_id, reference and/or source "
        "columns (names via `reference_column_mapping`).",
        default="",
    )
    reference_column_mapping: dict[str, str] = _help(
        "Columns of the dataset split / references file for our names note_id, reference, source; defaults are "
        "prepare_data's: {note_id: note_id, reference: summary, source: note}. `note_id: __row__`: the row number.",
        default_factory=dict,
    )
    empty_prediction: Literal["score", "skip"] = _help(
        "An empty (or whitespace-only) prediction: `score` counts it as a failed output (zero BERTScore, ROUGE and "
        "recall); `skip` leaves it out (recorded in metrics.json). Empty references or sources are always skipped.",
        default="score",
    )
    max_skip_fraction: float = _help(
        "Fail (exit 2) when more than this fraction of predictions is skipped (unmatched note_id, empty reference, "
        "duplicate id, ...): a wrong split or file must be loud.",
        default=0.05,
    )
    metrics: list[str] = _help(
        "Which metric families to compute: any of bertscore, rouge, entities, numbers, compression.",
        default_factory=lambda: ["bertscore", "rouge", "entities", "numbers", "compression"],
    )
    bertscore_model: str = _help(
        "BERTScore encoder: Hub id or local directory (any BERT-family encoder transformers' AutoModel loads).",
        default="emilyalsentzer/Bio_ClinicalBERT",
    )
    bertscore_num_layers: int = _help(
        "Use the hidden states of this layer (1-based; bert_score's `num_layers`). 9 of 12 is bert_score's tuned "
        "layer for BERT-base; no tuned layer exists for Bio_ClinicalBERT. Compare scores only at the same layer.",
        default=9,
    )
    bertscore_batch_size: int = _help("Encoder windows per forward pass.", default=64)
    bertscore_long_text: Literal["chunk", "truncate"] = _help(
        "Texts longer than the encoder window (512 tokens for BERT): `chunk` embeds overlapping windows and "
        "matches every token of both texts; `truncate` keeps the first window (per-sample count recorded).",
        default="chunk",
    )
    bertscore_chunk_overlap: int = _help(
        "Tokens shared by consecutive windows with `bertscore_long_text: chunk`; each token takes its embedding "
        "from the window where it sits farthest from an edge.",
        default=128,
    )
    bertscore_dtype: Literal["float32", "bfloat16", "float16"] = _help(
        "Encoder compute dtype; float32 reproduces bert_score's numbers, half precision is faster on GPU and moves "
        "scores by about 1e-3. Similarities are always computed in float32.",
        default="float32",
    )
    bertscore_allow_bin_weights: bool = _help(
        "Load a BERTScore encoder that has only pickled `pytorch_model.bin` weights (unpickled with "
        "weights_only=True). Off: such an encoder is refused; safetensors weights are always preferred. Remote code "
        "(`auto_map`) is never run.",
        default=False,
    )
    device: str = _help(
        "Where the encoder runs: `auto` (the device accelerate gives this process), `cpu`, `cuda`, `cuda:N`.",
        default="auto",
    )
    rouge_tokenizer: Literal["clinical", "default"] = _help(
        "`clinical` keeps case, decimals and ratios (`1.4`, `132/78`, `40mg` stay tokens); `default` is "
        "rouge_score's (lowercase, non-alphanumerics become spaces: `1.4` -> `1`, `4`), to compare with published "
        "numbers.",
        default="clinical",
    )
    rouge_use_stemmer: bool = _help("Porter-stem words (only with `rouge_tokenizer: default`).", default=False)
    tokenizer_name_or_path: str | None = _help(
        "Tokenizer for the token-based compression statistics (e.g. the generating model's); `none`: the "
        "BERTScore encoder's tokenizer, or whitespace words when bertscore is off.",
        default=None,
    )
    length_buckets: list[int] = _help(
        "Upper bounds (characters of the source note, or of the reference when there is no source) of the "
        "input-length buckets every metric is broken down by; strictly increasing.",
        default_factory=lambda: [1500, 3000, 6000, 12000],
    )
    num_workers: int | None = _help(
        "Processes for entity extraction and ROUGE (CPU-bound); `none`: one per CPU this process may use, minus "
        "one for the main process (max 32); 0: in this process. Fewer than 64 samples always run in this process.",
        default=None,
    )
    entity_batch_size: int = _help("Texts per spaCy `nlp.pipe` batch in entity extraction.", default=64)
    generic_entities: bool = _help(
        "Also score scispaCy `en_core_sci_sm` generic entities (the seed's metric, for comparison); needs that model "
        "installed.",
        default=False,
    )
    report_examples: int = _help(
        "Worst and best examples (by entity F1) shown in report.md with entity diffs.", default=3
    )
    report_include_text: bool = _help(
        "Put note / summary excerpts and entity strings in report.md (patient text on MIMIC: do not share it). "
        "false: report.md has ids and numbers only.",
        default=True,
    )
    report_max_chars: int = _help("Characters of each text shown per example in report.md.", default=1500)
    plots: bool = _help(
        "Write PNG plots (metric distributions, compression vs retention, length buckets).", default=True
    )
    tensorboard: bool = _help(
        "Write TensorBoard scalars and histograms (numbers only) to <output_dir>/tensorboard.", default=True
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.predictions:
            raise ConfigError("eval: `predictions` is empty; point it at stage1.jsonl / stage2.jsonl or a CSV.")
        for name in ("predictions", "references"):
            value = getattr(self, name)
            if value and Path(value).suffix.lower() not in self.TABLE_SUFFIXES:
                raise ConfigError(
                    f"eval: `{name}` = {value!r} has an unsupported extension; use one of "
                    f"{', '.join(self.TABLE_SUFFIXES)}."
                )
        if self.dataset_dir and self.references:
            raise ConfigError(
                f"eval: both `dataset_dir` ({self.dataset_dir!r}) and `references` ({self.references!r}) are set; "
                "keep only one (pass `--references ''` or `--dataset_dir ''` to clear the other)."
            )
        for name, valid in (
            ("column_mapping", self.PREDICTION_COLUMNS),
            ("reference_column_mapping", self.REFERENCE_COLUMNS),
        ):
            mapping = getattr(self, name)
            unknown_keys = sorted(set(mapping) - set(valid))
            if unknown_keys:
                raise ConfigError(
                    f"eval: `{name}` has unknown key(s) {unknown_keys}; valid keys are {', '.join(valid)}."
                )
            empty = sorted(key for key, column in mapping.items() if not column)
            if empty:
                raise ConfigError(
                    f"eval: `{name}` maps {empty} to an empty column name; remove them or name a column."
                )
        if self.reference_column_mapping and not (self.dataset_dir or self.references):
            raise ConfigError(
                "eval: `reference_column_mapping` is set but there is no `dataset_dir` or `references` to apply it to."
            )
        unknown = [m for m in self.metrics if m not in self.METRIC_FAMILIES]
        if unknown or not self.metrics:
            raise ConfigError(
                f"eval: `metrics` = {self.metrics!r}: {'unknown ' + repr(unknown) if unknown else 'empty'}; "
                f"choose from {', '.join(self.METRIC_FAMILIES)}."
            )
        if not 0.0 <= self.max_skip_fraction <= 1.0:
            raise ConfigError(f"eval: `max_skip_fraction` is {self.max_skip_fraction}; it must be in [0, 1].")
        if "bertscore" in self.metrics:
            if not self.bertscore_model:
                raise ConfigError("eval: `bertscore_model` is empty; set an encoder or drop bertscore from `metrics`.")
            if self.bertscore_model.startswith("scibert"):
                raise ConfigError(
                    f"eval: `bertscore_model` = {self.bertscore_model!r}: bert_score downloads `scibert*` names with "
                    "wget; use the Hub id (allenai/scibert_scivocab_uncased) or a local directory."
                )
        for name in ("bertscore_num_layers", "bertscore_batch_size", "entity_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"eval: `{name}` is {getattr(self, name)}; it must be >= 1.")
        if self.bertscore_chunk_overlap < 0:
            raise ConfigError(f"eval: `bertscore_chunk_overlap` is {self.bertscore_chunk_overlap}; it must be >= 0.")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"eval: `device` = {self.device!r}; use auto, cpu, cuda or cuda:N.")
        if self.rouge_use_stemmer and self.rouge_tokenizer != "default":
            raise ConfigError(
                "eval: `rouge_use_stemmer: true` needs `rouge_tokenizer: default` (the clinical tokenizer keeps "
                "words as written)."
            )
        buckets = self.length_buckets
        if any(b <= 0 for b in buckets) or sorted(set(buckets)) != buckets:
            raise ConfigError(
                f"eval: `length_buckets` = {buckets}; use strictly increasing positive character counts, e.g. "
                "[1500, 3000, 6000, 12000] (or [] for a single bucket)."
            )
        if self.num_workers is not None and self.num_workers < 0:
            raise ConfigError(f"eval: `num_workers` is {self.num_workers}; use none (all CPUs), 0 or a count.")
        for name in ("report_examples", "report_max_chars"):
            if getattr(self, name) < 0:
                raise ConfigError(f"eval: `{name}` is {getattr(self, name)}; it must be >= 0.")
        # eval writes its own manifest: sharing a directory with its inputs would overwrite theirs.
        out = Path(self.output_dir).absolute()
        for name, directory in (
            ("predictions", Path(self.predictions).parent),
            ("dataset_dir", Path(self.dataset_dir)),
        ):
            if (name == "predictions" or self.dataset_dir) and out == directory.absolute():
                raise ConfigError(
                    f"eval: `output_dir` = {self.output_dir!r} is the directory of `{name}`; eval would overwrite its "
                    "manifest. Use a separate directory, e.g. <run>/eval."
                )


@dataclass
class TinyModelConfig(BaseConfig):
    """build_tiny_model: write a tiny Gemma-3 (and optionally a tiny BERT encoder) for the offline demo and tests."""

    STAGE: typing.ClassVar[str] = "build_tiny_model"

    kind: Literal["causal_lm", "vlm"] = _help(
        "`causal_lm` (Gemma3ForCausalLM) or `vlm` (Gemma3ForConditionalGeneration, MedGemma's class).",
        default="causal_lm",
    )
    with_encoder: bool = _help("Also write a tiny BERT encoder to <output_dir>/encoder for BERTScore.", default=True)


@dataclass
class ExportConfig(BaseConfig):
    """export: merge a LoRA adapter into its base and write a standalone safetensors model with a model card."""

    STAGE: typing.ClassVar[str] = "export"

    adapter: str = _help(
        "sft_qlora's <output_dir>/final (or a validated checkpoint-N directory) to merge.", default=""
    )
    base_model: str | None = _help(
        "Base model to merge into; none: the base recorded in the adapter (adapter_config.json).", default=None
    )
    dtype: Literal["bfloat16", "float32"] = _help(
        "dtype of the written weights. bfloat16 (Gemma 3's training dtype; half the size) for serving; float32 keeps "
        "the merge exact for checking.",
        default="bfloat16",
    )
    eval_dir: list[str] = _help(
        "eval output directories (each with metrics.json) whose headline metrics go into the model card, e.g. "
        "[outputs/run/eval, outputs/run/eval_stage2]; empty: no metrics section.",
        default_factory=list,
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.adapter:
            raise ConfigError("export: `adapter` is empty. Pass `--adapter runs/<name>/final`.")
        if Path(self.output_dir).resolve() == Path(self.adapter).resolve():
            raise ConfigError(
                f"export: `output_dir` = {self.output_dir!r} is the adapter directory; choose a new directory."
            )


STAGE_CONFIGS: dict[str, type[BaseConfig]] = {
    cls.STAGE: cls
    for cls in (
        PrepareDataConfig,
        SFTConfig,
        GenerateConfig,
        CompressConfig,
        PipelineConfig,
        EvalConfig,
        TinyModelConfig,
        ExportConfig,
    )
}


# ---------------------------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------------------------

_TRUE = {"true", "1", "yes", "y", "on"}
_FALSE = {"false", "0", "no", "n", "off"}


def field_names(cls: type[BaseConfig]) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


S = TypeVar("S")


def settings_from_config(cls: type[S], cfg: BaseConfig) -> S:
    """An instance of the settings dataclass ``cls`` with every field copied from ``cfg``'s field of the same name.

    Raises:
        AttributeError: ``cfg`` lacks one of ``cls``'s fields (a renamed config key fails here, not silently).
    """
    return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})  # type: ignore[arg-type]


def _closest(key: str, cls: type[BaseConfig]) -> str:
    match = difflib.get_close_matches(key, field_names(cls), n=1, cutoff=0.5)
    return f" Did you mean `{match[0]}`?" if match else f" Run with --help to list the {cls.STAGE} fields."


def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "{" + ",".join(str(a) for a in get_args(tp)) + "}"
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin is not None:
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", str(tp))


def _coerce(name: str, tp: Any, value: Any, *, from_cli: bool, stage: str) -> Any:
    """Convert ``value`` (a CLI string or a YAML scalar/list/dict) to ``tp`` or raise ConfigError naming ``name``."""

    def fail(expected: str) -> ConfigError:
        return ConfigError(f"{stage}: `{name}` = {value!r} is not {expected}.")

    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None or (from_cli and isinstance(value, str) and value.lower() in {"none", "null", ""}):
            return None
        return _coerce(name, args[0], value, from_cli=from_cli, stage=stage)
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(
                f"{stage}: `{name}` = {value!r} is not one of {', '.join(map(str, choices))}."
                + _closest_choice(value, choices)
            )
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise fail("a boolean (true/false)")
    if tp is int:
        if isinstance(value, bool):
            raise fail("an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                raise fail("an integer") from None
        raise fail("an integer")
    if tp is float:
        if isinstance(value, bool):
            raise fail("a number")
        if isinstance(value, int | float):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                raise fail("a number") from None
        else:
            raise fail("a number")
        # inf trained NaN for a whole run and ended "complete"; nan failed deep inside a library. No field means
        # "unlimited" by inf: refuse both here, with the key.
        if not math.isfinite(number):
            raise fail("a finite number (inf and nan are not accepted)")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool) and not from_cli:
            return str(value)
        raise fail("a string")
    if origin is list:
        (item_tp,) = get_args(tp)
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                try:
                    value = json.loads(text)
                except json.JSONDecodeError:
                    value = yaml.safe_load(text)
            else:
                value = [v.strip() for v in text.split(",") if v.strip()]
        if not isinstance(value, list):
            raise fail("a list")
        return [_coerce(name, item_tp, v, from_cli=from_cli, stage=stage) for v in value]
    if origin is dict:
        key_tp, val_tp = get_args(tp)
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value) if value.strip() else {}
            except yaml.YAMLError:
                raise fail('a mapping (JSON or YAML, e.g. \'{"input": "text"}\')') from None
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise fail("a mapping")
        return {
            _coerce(name, key_tp, k, from_cli=from_cli, stage=stage): _coerce(
                name, val_tp, v, from_cli=from_cli, stage=stage
            )
            for k, v in value.items()
        }
    raise ConfigError(f"{stage}: field `{name}` has an unsupported type {tp!r} (a bug in dischargesum).")


def _closest_choice(value: Any, choices: Sequence[Any]) -> str:
    match = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.5)
    return f" Did you mean `{match[0]}`?" if match else ""


def _check_types(cfg: BaseConfig) -> None:
    """Validate every field's value against its annotation (catches wrong types passed in Python, not only YAML)."""
    hints = _type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        setattr(cfg, f.name, _coerce(f.name, hints[f.name], value, from_cli=False, stage=cfg.STAGE))


def _check_fraction(cfg: BaseConfig, name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ConfigError(f"{cfg.STAGE}: `{name}` is {value}; it must be in [0, 1).")


def format_help(cls: type[BaseConfig], prog: str | None = None) -> str:
    hints = _type_hints(cls)
    lines = [
        f"usage: {prog or cls.STAGE} [--config RECIPE.yaml] [--FIELD VALUE ...]",
        "",
        (cls.__doc__ or "").strip(),
        "",
        "Precedence: defaults < --config YAML < --FIELD VALUE. Unknown fields are errors.",
        "",
        "fields:",
        "  --config PATH  YAML recipe whose keys are the fields below.",
    ]
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc,operator]
        lines.append(f"  --{f.name} {_type_name(hints[f.name])}  (default: {default!r})")
        lines.append(f"      {f.metadata.get('help', '')}")
    return "\n".join(lines) + "\n"


def load_yaml_recipe(path: str | Path, cls: type[BaseConfig]) -> dict[str, Any]:
    """Read a recipe; raise ConfigError for a missing file, bad YAML, a non-mapping or an unknown key."""
    p = Path(path)
    if p.is_dir():
        # `--config recipes/demo` names the recipe folder; point at the stage's file in it.
        same_stage = p / f"{cls.STAGE}.yaml"
        if same_stage.is_file():
            fix = f"use `--config {same_stage}`"
        else:
            found = sorted(str(f) for f in p.glob("*.yaml"))
            fix = f"name one recipe file: {', '.join(found)}" if found else "it holds no .yaml recipe"
        raise ConfigError(f"{cls.STAGE}: recipe `--config {path}` is a directory, not a recipe file; {fix}.")
    if not p.is_file():
        raise ConfigError(f"{cls.STAGE}: recipe `--config {path}` does not exist.")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{cls.STAGE}: recipe {path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{cls.STAGE}: recipe {path} must be a mapping of field: value, got {type(data).__name__}.")
    names = set(field_names(cls))
    for key in data:
        if key not in names:
            raise ConfigError(f"{cls.STAGE}: unknown key `{key}` in recipe {path}." + _closest(str(key), cls))
    return data


def parse_cli_pairs(argv: Sequence[str], cls: type[BaseConfig]) -> tuple[str | None, dict[str, str | bool]]:
    """Split ``argv`` into the ``--config`` path and ``{field: raw value}``; a bare ``--flag`` means true."""
    names = set(field_names(cls))
    config_path: str | None = None
    overrides: dict[str, str | bool] = {}
    i = 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--"):
            raise ConfigError(f"{cls.STAGE}: unexpected argument {token!r}; fields are given as --field value.")
        key, eq, inline = token[2:].partition("=")
        key = key.replace("-", "_")
        value: str | bool
        if eq:
            value = inline
            i += 1
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            value = argv[i + 1]
            i += 2
        else:
            value = True
            i += 1
        if key == "config":
            if not isinstance(value, str):
                raise ConfigError(f"{cls.STAGE}: --config needs a path.")
            config_path = value
            continue
        if key not in names:
            raise ConfigError(f"{cls.STAGE}: unknown option `--{key}`." + _closest(key, cls))
        if key in overrides:
            raise ConfigError(f"{cls.STAGE}: `--{key}` is given twice.")
        overrides[key] = value
    return config_path, overrides


def parse_config(cls: type[T], argv: Sequence[str] | None = None, prog: str | None = None) -> T:
    """Build ``cls`` from defaults < ``--config`` YAML < CLI flags.

    Raises:
        ConfigError: unknown key, value of the wrong type, or a failed cross-field check.
        SystemExit(0): after writing the help text when ``--help`` / ``-h`` is given.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if "--help" in args or "-h" in args:
        sys.stdout.write(format_help(cls, prog))
        raise SystemExit(0)
    config_path, overrides = parse_cli_pairs(args, cls)
    hints = _type_hints(cls)
    values: dict[str, Any] = {}
    if config_path is not None:
        for key, raw in load_yaml_recipe(config_path, cls).items():
            values[key] = _coerce(key, hints[key], raw, from_cli=False, stage=cls.STAGE)
    for key, raw in overrides.items():
        tp = hints[key]
        if raw is True and tp is not bool and not _is_optional_bool(tp):
            raise ConfigError(f"{cls.STAGE}: `--{key}` needs a value.")
        values[key] = _coerce(key, tp, raw, from_cli=True, stage=cls.STAGE)
    return cls(**values)


def _is_optional_bool(tp: Any) -> bool:
    return get_origin(tp) in (typing.Union, types.UnionType) and bool in get_args(tp)


def config_from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Rebuild a config from a saved ``run_config.yaml`` mapping (strict: unknown keys are errors)."""
    names = set(field_names(cls))
    for key in data:
        if key not in names:
            raise ConfigError(f"{cls.STAGE}: unknown key `{key}` in saved config." + _closest(str(key), cls))
    return cls(**data)
