"""Typed, strict configuration for every stage, and the one parser all scripts share.

Precedence: dataclass defaults < ``--config recipe.yaml`` < ``--field value`` on the command line. Every field
carries ``metadata={"help": ...}``; ``--help`` lists them all. Unknown keys — in the YAML or on the command line —
are errors that name the key and the closest valid one (a misspelt ``save_step`` must never be silently ignored,
unlike TRL's ``fail_with_unknown_args=False``). Cross-field checks live in each dataclass's ``__post_init__`` and
run before any model or data is touched.

Values on the command line are parsed by the field's type: ``--lora_r 16``, ``--packing`` / ``--packing false``,
``--lora_target_modules q_proj,v_proj`` (or a YAML/JSON list), ``--column_mapping '{"input": "text"}'``,
``--adapter none`` for an optional field.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
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


@dataclass
class PrepareDataConfig(BaseConfig):
    """prepare_data: raw BHC rows -> train/validation/test parquet, rejects.jsonl, data_card.json."""

    STAGE: typing.ClassVar[str] = "prepare_data"

    source: str = _help(
        "Input: a CSV / JSONL / Parquet file (Kaggle `BHC_MIMIC-IV.csv`, PhysioNet MIMIC-IV-Ext-BHC, or any file "
        "with `column_mapping`), or `synthetic` to generate rows.",
        default="synthetic",
    )
    schema: Literal["auto", "kaggle", "physionet", "custom"] = _help(
        "Input schema; `auto` detects Kaggle or PhysioNet from the columns, `custom` needs `column_mapping`.",
        default="auto",
    )
    column_mapping: dict[str, str] = _help(
        "Map our column names (note_id, subject_id, input, target) to the file's, e.g. {input: text, target: bhc}.",
        default_factory=dict,
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
    debug: int = _help("Print this many rendered training examples with the loss mask visible, then exit.", default=0)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_fraction(self, "validation_fraction", self.validation_fraction)
        _check_fraction(self, "test_fraction", self.test_fraction)
        _check_fraction(self, "max_reject_fraction", self.max_reject_fraction)
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
        unknown = set(self.column_mapping) - {"note_id", "subject_id", "input", "target"}
        if unknown:
            raise ConfigError(
                f"prepare_data: `column_mapping` has unknown key(s) {sorted(unknown)}; "
                "valid keys are note_id, subject_id, input, target."
            )
        if self.source == "synthetic" and self.synthetic_rows < 1:
            raise ConfigError(f"prepare_data: `synthetic_rows` is {self.synthetic_rows}; it must be >= 1.")
        if self.debug < 0:
            raise ConfigError(f"prepare_data: `debug` is {self.debug}; use 0 (off) or a positive count.")


@dataclass
class SFTConfig(BaseConfig):
    """sft_qlora: QLoRA supervised fine-tuning with TRL's SFTTrainer."""

    STAGE: typing.ClassVar[str] = "sft_qlora"

    dataset_dir: str = _help("prepare_data's output directory (train.parquet, validation.parquet, ...).", default="")
    model_name_or_path: str = _help("Base model: Hub id or local directory.", default="google/medgemma-4b-it")
    max_steps: int = _help("Optimizer steps to train; -1 trains `num_train_epochs` instead.", default=-1)
    num_train_epochs: float = _help("Epochs over the train split when `max_steps` is -1.", default=1.0)
    per_device_train_batch_size: int = _help("Micro-batch size per process.", default=1)
    gradient_accumulation_steps: int = _help("Micro-batches per optimizer step.", default=8)
    learning_rate: float = _help("Peak learning rate of the LoRA parameters.", default=2e-4)
    save_steps: int = _help("Save a resumable checkpoint every N optimizer steps.", default=200)
    resume_from_checkpoint: str = _help(
        "`auto` resumes from the newest valid checkpoint in output_dir (or starts fresh when there is none), "
        "`none` always starts fresh, or a checkpoint directory to resume from (an error if it is invalid).",
        default="auto",
    )
    max_seq_length: int = _help("Maximum tokens per training example (must match prepare_data's).", default=2048)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.dataset_dir:
            raise ConfigError("sft_qlora: `dataset_dir` is empty; point it at prepare_data's output_dir.")
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "save_steps", "max_seq_length"):
            if getattr(self, name) < 1:
                raise ConfigError(f"sft_qlora: `{name}` is {getattr(self, name)}; it must be >= 1.")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ConfigError(f"sft_qlora: `max_steps` is {self.max_steps}; use a positive count or -1 for epochs.")
        if self.learning_rate <= 0:
            raise ConfigError(f"sft_qlora: `learning_rate` is {self.learning_rate}; it must be > 0.")


@dataclass
class GenerateConfig(BaseConfig):
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
    max_new_tokens: int = _help("Maximum tokens generated per summary.", default=512)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.dataset_dir:
            raise ConfigError("generate: `dataset_dir` is empty; point it at prepare_data's output_dir.")
        if self.adapter is None and self.model_name_or_path is None:
            raise ConfigError("generate: set `adapter` (a final/ or checkpoint directory) or `model_name_or_path`.")
        if self.max_new_tokens < 1:
            raise ConfigError(f"generate: `max_new_tokens` is {self.max_new_tokens}; it must be >= 1.")


@dataclass
class CompressConfig(BaseConfig):
    """compress (stage 2): shorten stage-1 summaries with a second model, keeping every clinical entity."""

    STAGE: typing.ClassVar[str] = "compress"

    input: str = _help("Stage-1 output (generate's stage1.jsonl).", default="")
    model_name_or_path: str = _help(
        "The compression model: Hub id or local directory.", default="meta-llama/Meta-Llama-3-8B-Instruct"
    )
    target_ratio: float = _help("Target length of the compressed summary relative to stage 1 (0-1].", default=0.5)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.input:
            raise ConfigError("compress: `input` is empty; point it at generate's stage1.jsonl.")
        if not 0.0 < self.target_ratio <= 1.0:
            raise ConfigError(f"compress: `target_ratio` is {self.target_ratio}; it must be in (0, 1], e.g. 0.5.")


@dataclass
class EvalConfig(BaseConfig):
    """eval: entity fidelity, BERTScore, ROUGE and compression statistics, with a report."""

    STAGE: typing.ClassVar[str] = "eval"

    predictions: str = _help(
        "Predictions: our stage1/stage2 JSONL, or any CSV/JSONL with the column fields.", default=""
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.predictions:
            raise ConfigError("eval: `predictions` is empty; point it at stage1.jsonl / stage2.jsonl or a CSV.")


@dataclass
class TinyModelConfig(BaseConfig):
    """build_tiny_model: write a tiny Gemma-3 (and optionally a tiny BERT encoder) for the offline demo and tests."""

    STAGE: typing.ClassVar[str] = "build_tiny_model"

    kind: Literal["causal_lm", "vlm"] = _help(
        "`causal_lm` (Gemma3ForCausalLM) or `vlm` (Gemma3ForConditionalGeneration, MedGemma's class).",
        default="causal_lm",
    )
    with_encoder: bool = _help("Also write a tiny BERT encoder to <output_dir>/encoder for BERTScore.", default=True)


STAGE_CONFIGS: dict[str, type[BaseConfig]] = {
    cls.STAGE: cls
    for cls in (PrepareDataConfig, SFTConfig, GenerateConfig, CompressConfig, EvalConfig, TinyModelConfig)
}


# ---------------------------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------------------------

_TRUE = {"true", "1", "yes", "y", "on"}
_FALSE = {"false", "0", "no", "n", "off"}


def field_names(cls: type[BaseConfig]) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


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
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise fail("a number") from None
        raise fail("a number")
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
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        lines.append(f"  --{f.name} {_type_name(hints[f.name])}  (default: {default!r})")
        lines.append(f"      {f.metadata.get('help', '')}")
    return "\n".join(lines) + "\n"


def load_yaml_recipe(path: str | Path, cls: type[BaseConfig]) -> dict[str, Any]:
    """Read a recipe; raise ConfigError for a missing file, bad YAML, a non-mapping or an unknown key."""
    p = Path(path)
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
