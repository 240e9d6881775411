"""Loading a model for inference: which base, adapter and tokenizer (checked before any weight is read), the load
itself (:func:`load_engine`, precision by :func:`dischargesum.modeling.resolve_precision`) and torch.compile's
on-disk cache."""

from __future__ import annotations

import gc
import os
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dischargesum.artifacts import ArtifactError
from dischargesum.config import ConfigError, InferenceConfig
from dischargesum.inference.engine import EngineSettings, InferenceEngine
from dischargesum.logging_utils import get_logger
from dischargesum.manifest import read_manifest, require_artifact

logger = get_logger(__name__)


@dataclass(frozen=True)
class ModelSource:
    """What to load: a base model and an optional LoRA adapter, checked before loading."""

    base: str
    adapter: str | None
    tokenizer_path: str
    adapter_sha256: str | None = None
    adapter_stage: str | None = None

    @property
    def tokenizer_field(self) -> str:
        """The config key that names :attr:`tokenizer_path` (for error messages)."""
        return (
            "adapter"
            if self.adapter is not None and self.tokenizer_path == str(self.adapter)
            else "model_name_or_path"
        )


def check_adapter_dir(adapter: str, *, field: str = "adapter") -> tuple[str | None, str]:
    """Check that ``adapter`` is a usable LoRA adapter directory before any model is loaded.

    A ``checkpoint-N`` directory must pass :func:`dischargesum.training.checkpoint_store.validate_checkpoint` (size
    check); a directory with a dischargesum manifest (sft_qlora's ``final/``) must be a completed sft_qlora output; a
    plain peft directory (no manifest) is accepted with a warning. Returns ``(producing stage, weights sha256)``.

    Raises:
        ArtifactError: missing directory, incomplete or foreign output, invalid checkpoint, no adapter weights.
    """
    from dischargesum.manifest import sha256_file
    from dischargesum.training.checkpoint_store import parse_checkpoint_step, validate_checkpoint

    d = Path(adapter)
    if not d.is_dir():
        raise ArtifactError(
            f"`{field}` = {adapter}: no such directory. Point it at sft_qlora's <output_dir>/final (or a "
            "checkpoint-N directory), or run sft_qlora first."
        )
    stage: str | None = None
    if parse_checkpoint_step(d.name) is not None:
        status = validate_checkpoint(d, verify_checksums=False)
        if not status.valid:
            raise ArtifactError(
                f"`{field}` = {adapter} is not a valid checkpoint: {status.reason}. Use another checkpoint or "
                "sft_qlora's final/ directory."
            )
        stage = "checkpoint"
    elif read_manifest(d) is not None:
        stage = str(require_artifact(d, stage="sft_qlora", field=field).get("stage"))
    else:
        logger.warning("`%s` = %s has no dischargesum manifest; using it as a plain peft adapter", field, adapter)
    if not (d / "adapter_config.json").is_file():
        raise ArtifactError(f"`{field}` = {adapter}: no adapter_config.json (not a LoRA adapter directory).")
    weights = d / "adapter_model.safetensors"
    if not weights.is_file():
        raise ArtifactError(
            f"`{field}` = {adapter}: no adapter_model.safetensors (pickled .bin adapters are not loaded; "
            "re-save the adapter with safetensors)."
        )
    return stage, sha256_file(weights)


def resolve_model_source(
    model_name_or_path: str | None, adapter: str | None, *, field: str = "adapter"
) -> ModelSource:
    """Decide base, adapter and tokenizer, checking each exists (config.json only, no weights).

    The base is ``model_name_or_path`` when given (a warning notes a difference from the adapter's record), else the
    base recorded in the adapter. The tokenizer comes from the adapter directory when it has one (sft_qlora saves
    the tokenizer it trained with), else from the base.

    Raises:
        ArtifactError: bad adapter directory. ConfigError: no base model known, or it cannot be found.
    """
    from dischargesum.modeling import read_model_info, resolve_adapter_base

    stage = sha = None
    base = model_name_or_path
    if adapter is not None:
        stage, sha = check_adapter_dir(adapter, field=field)
        recorded = resolve_adapter_base(adapter)
        if base is None:
            base = recorded
        elif base != recorded:
            logger.warning("adapter %s was trained on %s; loading it onto %s as configured", adapter, recorded, base)
    if base is None:
        raise ConfigError("set `model_name_or_path` or `adapter` (a LoRA adapter directory that records its base).")
    read_model_info(base)  # raises ConfigError naming model_name_or_path when it cannot be found
    has_tokenizer = adapter is not None and (Path(adapter) / "tokenizer_config.json").is_file()
    return ModelSource(
        base=base,
        adapter=adapter,
        tokenizer_path=str(adapter) if has_tokenizer else base,
        adapter_sha256=sha,
        adapter_stage=stage,
    )


# Every model load_engine created and that is still alive: the pipeline checks that stage 1's is gone.
_LIVE_MODELS: weakref.WeakSet[Any] = weakref.WeakSet()


def live_model_count() -> int:
    """How many models loaded by :func:`load_engine` are still referenced (after a garbage collection)."""
    gc.collect()
    return len(_LIVE_MODELS)


def load_engine(
    source: ModelSource,
    settings: EngineSettings,
    *,
    precision: str,
    load_in_4bit: bool,
    merge_adapter: bool,
    attn_implementation: str,
    device: Any,
) -> InferenceEngine:
    """Load tokenizer, base and adapter (merged into the base, or kept as LoRA layers) onto ``device``.

    Raises:
        ConfigError: the model cannot be loaded; 4-bit without CUDA-capable bitsandbytes is bitsandbytes' error.
    """
    from dischargesum.modeling import load_base_model, load_tokenizer, read_model_info, resolve_precision

    device = torch.device(device)
    cuda = device.type == "cuda"
    dtype, note = resolve_precision(
        precision,
        read_model_info(source.base),
        device=device.type,
        bf16_supported=cuda and torch.cuda.is_bf16_supported(),
        device_name=torch.cuda.get_device_name(device) if cuda else "",
    )
    if note:
        logger.info("%s", note)
    tokenizer = load_tokenizer(source.tokenizer_path, field=source.tokenizer_field, padding_side="left")
    start = time.perf_counter()
    model: Any = load_base_model(
        source.base,
        dtype=dtype,
        load_in_4bit=load_in_4bit,
        attn_implementation="sdpa" if attn_implementation == "auto" else attn_implementation,
        device_map={"": str(device)},
    )
    if source.adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, source.adapter, is_trainable=False)
        if merge_adapter:
            model = model.merge_and_unload()
    model.eval()
    if attn_implementation == "auto":
        from dischargesum.inference.attention import use_gqa_fold

        use_gqa_fold(model)
    _LIVE_MODELS.add(model)
    logger.info(
        "loaded %s%s (%s%s, adapter %s) on %s in %.1fs",
        source.base,
        "" if source.adapter is None else f" + {source.adapter}",
        "4-bit NF4, compute " if load_in_4bit else "",
        dtype,
        "none" if source.adapter is None else ("merged" if merge_adapter else "unmerged"),
        device,
        time.perf_counter() - start,
    )
    return InferenceEngine(model, tokenizer, settings)


def engine_from_config(cfg: InferenceConfig, source: ModelSource, device: Any) -> InferenceEngine:
    if cfg.compile:
        configure_compile_cache(cfg.compile_cache_dir)
    return load_engine(
        source,
        EngineSettings.from_config(cfg),
        precision=cfg.precision,
        load_in_4bit=cfg.load_in_4bit,
        merge_adapter=cfg.merge_adapter_effective and source.adapter is not None,
        attn_implementation=cfg.attn_implementation,
        device=device,
    )


def default_compile_cache_dir() -> Path:
    """``$TORCHINDUCTOR_CACHE_DIR`` when set, else ``$XDG_CACHE_HOME`` (or ~/.cache)/dischargesum/torch_compile."""
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dischargesum" / "torch_compile"


def configure_compile_cache(directory: str | Path | None = None) -> Path:
    """Point torch.compile's on-disk caches at ``directory`` (default :func:`default_compile_cache_dir`) and make sure
    they are on, so a second run on this machine loads the compiled decoding step instead of compiling it again.

    What is cached there: inductor's FX-graph cache (generated kernels and wrappers), AOTAutograd's cache and
    Triton's compiled kernels (inductor puts them under the same directory unless ``TRITON_CACHE_DIR`` is set).
    What a rerun still pays: dynamo's tracing of the model's Python and the CUDA-graph capture (neither is cached by
    torch). torch's default directory is under /tmp (``/tmp/torchinductor_<user>``), which many machines wipe; a
    per-user directory survives. Must run before the first compilation (inductor reads the variable lazily).
    Returns the directory.
    """
    path = Path(directory).expanduser() if directory else default_compile_cache_dir()
    path.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path.resolve())
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    functorch_config.enable_autograd_cache = True
    logger.info("torch.compile caches: %s (a rerun reuses the compiled decoding step)", path)
    return path
