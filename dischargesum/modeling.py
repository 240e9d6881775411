"""Tokenizer and model loading for training and inference: quantisation, dtype, attention kernel, Gemma 3 VLMs.

Two audiences:

* **sft_qlora** calls :func:`preflight` (a pure function of the config, the model's ``config.json`` and the
  hardware — it runs before any GPU allocation and refuses bad combinations with a ConfigError naming the key),
  then :func:`load_model_for_training` and :func:`lora_config`.
* **generate / compress** call :func:`load_tokenizer` and :func:`load_base_model` (works for a plain causal LM and
  for MedGemma's ``Gemma3ForConditionalGeneration``; both are called like a causal LM: ``model(input_ids,
  attention_mask)`` / ``model.generate(...)``), and :func:`resolve_adapter_base` to find the base model an adapter
  (``final/`` or ``checkpoint-N/``) was trained on. :func:`merge_adapter` writes a merged bf16 model directory.

MedGemma-4B-it is a vision-language Gemma 3. Text-only training keeps the class (so adapters load onto the real
checkpoint unchanged) but freezes the vision tower and restricts LoRA to the language model with a regex, so DDP sees
no parameter without a gradient. Gemma 3 overflows in fp16 — it is refused; bf16 is used where the GPU has it and
fp32 elsewhere.

Why one module (~700 lines): training and inference must load the same model the same way — one precision rule
(:func:`resolve_precision`), one tokenizer loader, one attention choice, one adapter-base resolution — and keeping
them together is what stops the two stages from drifting apart again (they had two precision rules before).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from dischargesum.config import ConfigError
from dischargesum.logging_utils import get_logger

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from dischargesum.config import SFTConfig

logger = get_logger(__name__)

GEMMA3_MODEL_TYPES = frozenset({"gemma3", "gemma3_text"})
VLM_ARCHITECTURES = frozenset({"Gemma3ForConditionalGeneration"})
# Attention paths that keep packed examples apart when a batch carries per-example `position_ids` and no
# attention mask (transformers >= 5.17, checked in masking_utils / modeling_flash_attention_utils): sdpa, eager and
# flex get a block-diagonal mask built by `find_packed_sequence_indices`; flash attention gets varlen `cu_seq_lens`.
# `tests/unit/test_modeling_packing.py` proves it for sdpa and eager on CPU — as long as no KV cache exists (training
# runs with use_cache=False; with a cache the packed-sequence detection is skipped).
PACKING_SAFE_ATTENTION = frozenset({"eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3"})
_FLASH_PACKAGES = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}
_GPU_ONLY_OPTIMIZERS = frozenset({"adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"})


# ---------------------------------------------------------------------------------------------------------------
# Hardware and model facts (cheap: no weights, no GPU allocation)
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hardware:
    """What this process runs on, read from torch and the launcher's environment."""

    device: Literal["cuda", "cpu"]
    bf16_supported: bool
    device_name: str
    # accelerate's distributed type as the launcher exported it: NO, MULTI_CPU, MULTI_GPU, DEEPSPEED, FSDP
    distributed_type: str
    deepspeed_zero_stage: int | None
    world_size: int
    # accelerate's mixed precision from the launcher config (no, bf16, fp16)
    launcher_mixed_precision: str


def detect_hardware(env: Mapping[str, str] | None = None) -> Hardware:
    """Inspect CUDA (capability queries only: nothing is allocated) and accelerate's environment variables."""
    import torch

    env = os.environ if env is None else env
    use_cpu = env.get("ACCELERATE_USE_CPU", "false").lower() == "true"
    cuda = torch.cuda.is_available() and not use_cpu
    world_size = int(env.get("WORLD_SIZE", "1") or 1)
    if env.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        dist = "FSDP"
    elif env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        dist = "DEEPSPEED"
    elif world_size > 1:
        dist = "MULTI_GPU" if cuda else "MULTI_CPU"
    else:
        dist = "NO"
    stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    return Hardware(
        device="cuda" if cuda else "cpu",
        bf16_supported=bool(cuda and torch.cuda.is_bf16_supported(including_emulation=False)),
        device_name=torch.cuda.get_device_name(0) if cuda else "cpu",
        distributed_type=dist,
        deepspeed_zero_stage=int(stage) if stage and stage.isdigit() else None,
        world_size=world_size,
        launcher_mixed_precision=env.get("ACCELERATE_MIXED_PRECISION", "no").lower(),
    )


@dataclass(frozen=True)
class ModelInfo:
    """Facts from a model directory's config.json, read without loading weights."""

    path: str
    model_type: str
    architectures: tuple[str, ...]

    @property
    def is_gemma3(self) -> bool:
        return self.model_type in GEMMA3_MODEL_TYPES

    @property
    def is_vlm(self) -> bool:
        return bool(VLM_ARCHITECTURES.intersection(self.architectures)) or self.model_type == "gemma3"


def resolve_model_path(name_or_path: str) -> str:
    """An existing local directory as an absolute path (so adapters record a path that works from any cwd)."""
    p = Path(name_or_path).expanduser()
    return str(p.resolve()) if p.is_dir() else name_or_path


def read_model_info(name_or_path: str) -> ModelInfo:
    """Read ``config.json`` (local directory or the Hub cache).

    Raises:
        ConfigError: the model cannot be found or its config cannot be read (`model_name_or_path` is named).
    """
    from transformers import AutoConfig

    path = resolve_model_path(name_or_path)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"`model_name_or_path` = {name_or_path!r}: cannot read its config.json ({exc.__class__.__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}). Use a local model directory, or download the model "
            "first (`huggingface-cli download ...`) when this machine is offline."
        ) from None
    return ModelInfo(
        path=path, model_type=str(config.model_type), architectures=tuple(getattr(config, "architectures", ()) or ())
    )


# ---------------------------------------------------------------------------------------------------------------
# Preflight
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingPlan:
    """Decisions :func:`preflight` made; everything a loader and the trainer arguments need."""

    compute_dtype: Literal["bfloat16", "float32"]
    load_in_4bit: bool
    bnb_4bit_quant_storage: Literal["uint8", "bfloat16", "float32"]
    attn_implementation: str
    lora_dtype: Literal["float32", "bfloat16"]
    device: Literal["cuda", "cpu"]
    distributed_type: str
    is_vlm: bool
    # Route LoRA projections through dischargesum.training.fast_lora (False under FSDP / ZeRO-3).
    fused_lora: bool = False
    # Shown to the user at INFO (the fp32 fallback, the FSDP quant storage...).
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def bf16(self) -> bool:
        return self.compute_dtype == "bfloat16"

    def quantization_facts(self) -> dict[str, Any]:
        """The quantisation setup as plain data (recorded in checkpoints; a resume guard compares it)."""
        return {
            "load_in_4bit": self.load_in_4bit,
            "compute_dtype": self.compute_dtype,
            "quant_storage": self.bnb_4bit_quant_storage if self.load_in_4bit else None,
        }


FP16_OVERFLOW = (
    "Gemma 3 activations exceed fp16's range (max 65504): the loss turns NaN or CUDA asserts within a few steps."
)


def resolve_precision(
    precision: str, model: ModelInfo, *, device: str, bf16_supported: bool, device_name: str = ""
) -> tuple[Literal["bfloat16", "float32", "float16"], str | None]:
    """THE precision rule (training and inference): the dtype a model computes in, and a note when it is not what
    ``auto`` would pick on a bf16 GPU (shown at INFO).

    ``fp32`` -> float32; ``auto`` and ``bf16`` -> bfloat16 on a CUDA GPU with native bf16, else float32 (with a note
    saying why); ``fp16`` -> float16, except for Gemma 3, which overflows it.

    Raises:
        ConfigError: ``fp16`` with a Gemma 3 model.
    """
    if precision == "fp16":
        if model.is_gemma3:
            raise ConfigError(
                f"`precision` = fp16 with {model.model_type} ({model.path}): {FP16_OVERFLOW} Use `precision: auto` "
                "(bf16 where the GPU supports it, else fp32)."
            )
        return "float16", None
    if precision == "fp32":
        return "float32", None
    if device == "cuda" and bf16_supported:
        return "bfloat16", None
    where = "the CPU" if device != "cuda" else f"this GPU ({device_name}) has no native bf16"
    return "float32", (
        f"precision: fp32 because {where} (bf16 needs an Ampere-or-newer GPU; fp16 is not an option for Gemma 3)."
    )


def preflight(cfg: SFTConfig, model: ModelInfo, hw: Hardware) -> TrainingPlan:
    """Check the training setup and decide precision, quantisation storage and attention before any allocation.

    Precision is :func:`resolve_precision`'s (sft_qlora also refuses fp16 for other models).

    Raises:
        ConfigError: fp16 (for Gemma 3 in the config or the launcher's; in sft_qlora for any model), 4-bit
            without bitsandbytes, an attention kernel that is not installed or needs a GPU, packing with an
            attention path that would let packed examples attend to each other, Liger kernels or GPU-only
            optimizers on CPU, base-weight hashing on sharded weights.
    """
    notes: list[str] = []
    if cfg.precision == "fp16" and not model.is_gemma3:
        raise ConfigError("`precision` = fp16 is not supported by sft_qlora; use `auto`, `bf16` or `fp32`.")
    compute_name, precision_note = resolve_precision(
        cfg.precision, model, device=hw.device, bf16_supported=hw.bf16_supported, device_name=hw.device_name
    )
    if hw.launcher_mixed_precision == "fp16" and model.is_gemma3:
        raise ConfigError(
            f"the accelerate config sets `mixed_precision: fp16` for {model.model_type}: {FP16_OVERFLOW} Use "
            "`mixed_precision: bf16` (or `no`) in the accelerate config or `accelerate launch --mixed_precision bf16`."
        )
    compute: Literal["bfloat16", "float32"] = "bfloat16" if compute_name == "bfloat16" else "float32"
    if precision_note:
        notes.append(f"{precision_note} Expect ~2x memory for activations and lower speed.")

    if cfg.load_in_4bit and importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(
            "`load_in_4bit: true` needs bitsandbytes (>= 0.48 for CPU kernels): `pip install bitsandbytes`, or set "
            "`load_in_4bit: false` to train LoRA on an unquantised base."
        )
    sharded = hw.distributed_type == "FSDP" or (hw.distributed_type == "DEEPSPEED" and hw.deepspeed_zero_stage == 3)
    quant_storage: Literal["uint8", "bfloat16", "float32"] = "uint8"
    if cfg.load_in_4bit and sharded:
        # FSDP and ZeRO-3 shard only floating-point tensors of one dtype: bitsandbytes must store the packed 4-bit
        # weights in the same float dtype as the rest of the model.
        quant_storage = compute
        notes.append(
            f"quantisation: {hw.distributed_type} shards the 4-bit base, so bnb_4bit_quant_storage={compute} "
            "(set automatically)."
        )

    attn = cfg.attn_implementation
    if attn == "auto":
        attn = "flex_attention" if (cfg.packing or cfg.padding_free) and hw.device == "cuda" else "sdpa"
        if attn == "flex_attention":
            notes.append(
                "attention: flex_attention for packed rows on the GPU (attn_implementation: auto); its block mask "
                "skips the empty blocks of the per-example and sliding-window masks. Its kernels compile at the first "
                "steps (tens of seconds, cached for reruns by torch's compile cache)."
            )
    if attn in _FLASH_PACKAGES:
        if hw.device != "cuda":
            raise ConfigError(f"`attn_implementation` = {attn} needs a CUDA GPU; use `auto` (sdpa) on this machine.")
        if importlib.util.find_spec(_FLASH_PACKAGES[attn]) is None:
            raise ConfigError(
                f"`attn_implementation` = {attn} needs the `{_FLASH_PACKAGES[attn]}` package, which is not "
                "installed. Install it or use `attn_implementation: auto` (sdpa)."
            )
    if (cfg.packing or cfg.padding_free) and attn not in PACKING_SAFE_ATTENTION:
        raise ConfigError(
            f"`attn_implementation` = {attn} with packing/padding_free: this kernel is not known to keep packed "
            f"examples apart. Use one of {sorted(PACKING_SAFE_ATTENTION)} or set `packing: false`."
        )
    if cfg.use_liger_kernel:
        if hw.device != "cuda":
            raise ConfigError(
                "`use_liger_kernel: true` needs a CUDA GPU (Liger's kernels are Triton GPU kernels; they import on "
                "CPU but cannot run there). Set `use_liger_kernel: false` on this machine."
            )
        if importlib.util.find_spec("liger_kernel") is None:
            raise ConfigError(
                "`use_liger_kernel: true` needs liger-kernel: `pip install 'dischargesum[gpu]'` (or liger-kernel)."
            )
    if cfg.compile_layers and hw.device != "cuda":
        raise ConfigError(
            "`compile_layers: true` compiles GPU kernels for each decoder layer; there is no GPU here. Set "
            "`compile_layers: false`."
        )
    if cfg.activation_offloading and hw.device != "cuda":
        raise ConfigError(
            "`activation_offloading: true` moves activations between a GPU and pinned CPU memory; there is no GPU "
            "here. Set `activation_offloading: false`."
        )
    if cfg.optim in _GPU_ONLY_OPTIMIZERS and hw.device != "cuda":
        raise ConfigError(f"`optim` = {cfg.optim} is a bitsandbytes GPU optimizer; use `adamw_torch` on CPU.")
    if cfg.check_base_unchanged and sharded:
        raise ConfigError(
            f"`check_base_unchanged: true` cannot hash weights that {hw.distributed_type} shards across ranks; "
            "turn it off for this topology."
        )

    fused_lora = cfg.fused_lora and not sharded
    if cfg.fused_lora and sharded:
        notes.append(
            f"fused_lora: off under {hw.distributed_type} (it gathers each layer's weights in hooks around the "
            "layer's own forward, which the fused path bypasses); PEFT's LoRA forward is used."
        )
    if cfg.lora_dtype == "auto":
        # FSDP flattens each wrapped module's parameters into one tensor, so LoRA weights must share the base dtype.
        lora_dtype: Literal["float32", "bfloat16"] = (
            "bfloat16" if hw.distributed_type == "FSDP" and compute == "bfloat16" else "float32"
        )
    else:
        lora_dtype = cfg.lora_dtype
    return TrainingPlan(
        compute_dtype=compute,
        load_in_4bit=cfg.load_in_4bit,
        bnb_4bit_quant_storage=quant_storage,
        attn_implementation=attn,
        lora_dtype=lora_dtype,
        device=hw.device,
        distributed_type=hw.distributed_type,
        is_vlm=model.is_vlm,
        fused_lora=fused_lora,
        notes=tuple(notes),
    )


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------


def torch_dtype(name: str) -> torch.dtype:
    import torch

    return {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}[name]


def load_tokenizer(
    name_or_path: str, *, field: str = "model_name_or_path", padding_side: Literal["left", "right"] | None = None
) -> PreTrainedTokenizerBase:
    """Load the tokenizer (with its chat template) of a model or adapter directory; never runs remote code. The one
    tokenizer loader of every stage (prepare_data counts tokens with it, sft_qlora trains with it, generate and
    compress prompt with it). ``field`` is the config key that named ``name_or_path``: errors name it.

    A tokenizer without a pad token gets eos as pad (padded positions are masked out). Generation wants
    ``padding_side="left"``; training pads itself (TRL's collator pads right).

    Raises:
        ConfigError: the tokenizer cannot be loaded, or it has no chat template (the prompts are chat turns).
    """
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name_or_path), trust_remote_code=False)
    except (OSError, ValueError) as exc:
        hint = (
            "the directory has no tokenizer files"
            if Path(name_or_path).is_dir()
            else "it is not a local directory and is not in the Hugging Face cache (this stage never downloads "
            "unless HF_HUB_OFFLINE is unset; gated models such as google/medgemma-4b-it need `hf auth login` and "
            "an accepted licence)"
        )
        raise ConfigError(f"`{field}` = {name_or_path!r} could not be loaded: {hint}. ({exc})") from exc
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            f"`{field}` = {name_or_path!r} has no chat template; dischargesum renders notes as chat turns. Point it "
            "at an instruction-tuned model (e.g. google/medgemma-4b-it; its tokenizer_config.json or "
            "chat_template.jinja carries the template)."
        )
    if tokenizer.pad_token is None:
        # Gemma ships <pad>; other bases may not. eos as pad is safe here: padded positions are masked out.
        tokenizer.pad_token = tokenizer.eos_token
    if padding_side is not None:
        tokenizer.padding_side = padding_side
    return tokenizer


def bnb_config(
    *,
    compute_dtype: str,
    quant_type: str = "nf4",
    double_quant: bool = True,
    quant_storage: str = "uint8",
):
    """The bitsandbytes 4-bit configuration (NF4 + double quantisation by default)."""
    import torch
    from transformers import BitsAndBytesConfig

    storage = {"uint8": torch.uint8, "bfloat16": torch.bfloat16, "float32": torch.float32}[quant_storage]
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=torch_dtype(compute_dtype),
        bnb_4bit_quant_storage=storage,
    )


def load_base_model(
    path: str,
    *,
    dtype: str | torch.dtype = "bfloat16",
    load_in_4bit: bool = False,
    attn_implementation: str = "sdpa",
    device_map: str | dict[str, Any] | None = None,
    quant_type: str = "nf4",
    double_quant: bool = True,
    quant_storage: str = "uint8",
) -> PreTrainedModel:
    """Load a causal LM or a Gemma 3 vision-language model for text use (training or generation).

    ``AutoModelForCausalLM`` maps MedGemma's ``gemma3`` config to ``Gemma3ForConditionalGeneration``; the returned
    model is called exactly like a causal LM (``input_ids``/``attention_mask`` in, ``logits`` out, ``generate``).
    The vision tower is loaded (it is part of the checkpoint) but frozen and never run for text-only inputs.
    ``dtype`` is the dtype of unquantised weights (and, with ``load_in_4bit``, the compute dtype). Remote code is
    never executed.

    Raises:
        ConfigError: the model cannot be loaded from ``path``.
    """
    import torch
    from transformers import AutoModelForCausalLM

    dt = torch_dtype(dtype) if isinstance(dtype, str) else dtype
    kwargs: dict[str, Any] = {
        "dtype": dt,
        "attn_implementation": attn_implementation,
        "trust_remote_code": False,
        "use_safetensors": True,
    }
    if load_in_4bit:
        dtype_name = {torch.bfloat16: "bfloat16", torch.float32: "float32", torch.float16: "float16"}[dt]
        kwargs["quantization_config"] = bnb_config(
            compute_dtype=dtype_name, quant_type=quant_type, double_quant=double_quant, quant_storage=quant_storage
        )
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(resolve_model_path(path), **kwargs)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load model {path!r}: {str(exc).splitlines()[0]}") from None
    vision = vision_modules(model)
    for module in vision:
        module.requires_grad_(False)
    return model


def vision_modules(model: Any) -> list[Any]:
    """The vision tower and projector of a Gemma 3 VLM (empty for a text-only model)."""
    inner = getattr(model, "model", None)
    return [m for m in (getattr(inner, "vision_tower", None), getattr(inner, "multi_modal_projector", None)) if m]


def is_vlm_model(model: Any) -> bool:
    return bool(vision_modules(model))


def training_device_map(plan: TrainingPlan) -> dict[str, int] | None:
    """Where each process loads the base: its own GPU for single-GPU/DDP (so 4-bit quantisation happens on the
    GPU, never on the host), nothing for DeepSpeed/FSDP (they place and shard weights themselves) or CPU."""
    if plan.device != "cuda" or plan.distributed_type in {"DEEPSPEED", "FSDP"}:
        return None
    return {"": int(os.environ.get("LOCAL_RANK", "0") or 0)}


def load_model_for_training(cfg: SFTConfig, plan: TrainingPlan) -> PreTrainedModel:
    """Load the frozen base for LoRA training according to ``plan`` (from :func:`preflight`).

    Not done on purpose: peft's ``prepare_model_for_kbit_training``, which casts every unquantised weight (norms and
    the 262k x 2560 embedding, ~2.7 GB) to fp32 — measured memory for no accuracy need; gradient checkpointing's
    input-grad hook is added by TRL instead.

    Raises:
        ConfigError: the model cannot be loaded.
    """
    model = load_base_model(
        cfg.model_name_or_path,
        dtype=plan.compute_dtype,
        load_in_4bit=plan.load_in_4bit,
        attn_implementation=plan.attn_implementation,
        device_map=training_device_map(plan),
        quant_type=cfg.bnb_4bit_quant_type,
        double_quant=cfg.bnb_4bit_use_double_quant,
        quant_storage=plan.bnb_4bit_quant_storage,
    )
    # No KV cache in training: it is useless there, conflicts with checkpointing, and with a cache transformers
    # skips the block-diagonal mask of packed sequences (tests/unit/test_modeling_packing.py).
    model.config.use_cache = False
    model.config.get_text_config().use_cache = False
    model.requires_grad_(False)
    if plan.load_in_4bit and plan.device == "cpu":
        keep_cpu_4bit_layout(model)
    if cfg.compile_layers:
        n = compile_decoder_layers(model)
        logger.info("torch.compile: %d decoder layers compile at their first call", n)
    return model


def compile_decoder_layers(model: Any) -> int:
    """``torch.compile`` every language-model decoder layer in place (``nn.Module.compile``); returns how many.

    Compilation is lazy (first call), so the adapters PEFT injects afterwards are part of the compiled code, and
    gradient checkpointing stays outside it (transformers' checkpointing wrapper calls the compiled layer). Per
    layer rather than the whole model: the loss, the LM head and the vision tower stay eager, and one graph serves
    every layer of the same attention type (parameters are graph inputs).
    """
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    for layer in layers:
        layer.compile()
    return len(layers)


def lora_target_modules(targets: Sequence[str], *, is_vlm: bool) -> list[str] | str:
    """PEFT ``target_modules``: the plain names for a causal LM; for a Gemma 3 VLM a regex that matches them only
    inside ``language_model`` — SigLIP also has ``q_proj``/``k_proj``/``v_proj``, and adapters there would get no
    gradient from text (DDP would stop on unused parameters)."""
    if not is_vlm:
        return list(targets)
    names = "|".join(re.escape(t) for t in targets)
    return rf".*\.language_model\..*\.(?:{names})"


def lora_config(cfg: SFTConfig, *, is_vlm: bool):
    """The peft LoraConfig from the recipe (task CAUSAL_LM, no bias)."""
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=lora_target_modules(cfg.lora_target_modules, is_vlm=is_vlm),
        bias="none",
        task_type="CAUSAL_LM",
    )


def lora_facts(cfg: SFTConfig) -> dict[str, Any]:
    """The LoRA setup as plain data (recorded in checkpoints; a resume guard compares it)."""
    return {
        "r": cfg.lora_r,
        "alpha": cfg.lora_alpha,
        "dropout": cfg.lora_dropout,
        "target_modules": sorted(cfg.lora_target_modules),
    }


def cast_trainable_parameters(model: Any, dtype_name: str) -> int:
    """Cast every trainable parameter to ``dtype_name``; return how many were cast.

    TRL casts the adapters of a quantised model to bf16; we keep fp32 master weights by default: Adam updates
    smaller than bf16's 8-bit mantissa resolution would otherwise be rounded away (compute still runs in bf16
    under autocast).
    """
    dt = torch_dtype(dtype_name)
    count = 0
    for param in model.parameters():
        if param.requires_grad and param.dtype != dt:
            param.data = param.data.to(dt)
            count += 1
    return count


def _canonical_parameter_name(name: str) -> str:
    """A base tensor's name independent of PEFT wrapping (``base_model.model.`` prefix, ``.base_layer``)."""
    if name.startswith("base_model.model."):
        name = name[len("base_model.model.") :]
    return name.replace(".base_layer.", ".")


def base_weights_digest(model: Any) -> str:
    """sha256 over every non-LoRA tensor of the model's state dict (names canonicalised, sorted).

    The state dict, not only the parameters: a 4-bit base keeps its scales (absmax, nested quantisation state) in
    bitsandbytes' quant_state, which the state dict serialises — a change there changes the model as much as a change
    of the packed 4-bit codes. Computed the same way on a plain base model and on its PEFT-wrapped training copy, so
    "training left the base byte-identical" can also be checked against the weights on disk.
    """
    import hashlib

    import torch

    digest = hashlib.sha256()
    tensors = {_canonical_parameter_name(n): t for n, t in model.state_dict().items() if "lora_" not in n}
    for name in sorted(tensors):
        tensor = tensors[name].detach()
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        flat = tensor.contiguous().view(-1)
        if flat.dtype in (torch.bfloat16, torch.float16):
            flat = flat.view(torch.int16)
        digest.update(flat.cpu().numpy().tobytes())
    return digest.hexdigest()


def keep_cpu_4bit_layout(model: Any) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for its CPU inference kernel; return how many layers.

    On CPUs with AVX512-BF16, ``Linear4bit.forward`` in eval mode without grad (our evaluation loop) converts the
    weight to a CPU-packed layout once and keeps it — rounding the scales (absmax) to bf16 and undoing double
    quantisation. Training after the first evaluation then runs on a slightly different base than a process that
    resumed from a checkpoint (which starts from the exact scales): the QLoRA-on-CPU resume differed by ~1e-4 in the
    adapter after two steps (measured here). Training keeps one layout throughout; only CPU evaluation speed is lost.
    """
    count = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


# ---------------------------------------------------------------------------------------------------------------
# Adapters
# ---------------------------------------------------------------------------------------------------------------


def resolve_adapter_base(adapter_dir: str | Path) -> str:
    """The base model an adapter directory (sft_qlora's ``final/`` or ``checkpoint-N/``) was trained on.

    Read from ``adapter_config.json``'s ``base_model_name_or_path`` (written by peft; sft_qlora records an absolute
    path for local bases) and cross-checked against the resolved ``run_config.yaml`` when present.

    Raises:
        ConfigError: no adapter_config.json, or it names no base model.
    """
    d = Path(adapter_dir)
    cfg_path = d / "adapter_config.json"
    if not cfg_path.is_file():
        raise ConfigError(f"`adapter` = {adapter_dir}: no adapter_config.json (not a LoRA adapter directory).")
    base = json.loads(cfg_path.read_text(encoding="utf-8")).get("base_model_name_or_path")
    if not base:
        raise ConfigError(f"`adapter` = {adapter_dir}: adapter_config.json names no base model; set it explicitly.")
    return str(base)


def merge_adapter(
    adapter_dir: str | Path,
    output_dir: str | Path,
    *,
    dtype: str | torch.dtype = "bfloat16",
    base_model: str | None = None,
) -> Path:
    """Merge a LoRA adapter into its base and write a standalone model directory (safetensors + tokenizer).

    The base is reloaded unquantised in ``dtype`` (bf16 by default) — merging into a 4-bit base is not done: the
    rounding of re-quantising ``W + BA`` would change the model that was trained and evaluated. Needs RAM for the
    bf16 base (~8.6 GB for MedGemma-4B); runs on CPU.

    Raises:
        ConfigError: ``adapter_dir`` is not an adapter directory or its base cannot be loaded.
    """
    from peft import PeftModel

    from dischargesum.manifest import atomic_write_json, sha256_file

    adapter = Path(adapter_dir)
    base = base_model or resolve_adapter_base(adapter)
    model = load_base_model(base, dtype=dtype, load_in_4bit=False, attn_implementation="sdpa")
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out, safe_serialization=True)
    tokenizer_source = adapter if (adapter / "tokenizer_config.json").is_file() else Path(base)
    load_tokenizer(str(tokenizer_source)).save_pretrained(out)
    weights = adapter / "adapter_model.safetensors"
    atomic_write_json(
        out / "merged_from.json",
        {
            "adapter_dir": str(adapter.resolve()),
            "adapter_sha256": sha256_file(weights) if weights.is_file() else None,
            "base_model": base,
            "dtype": str(dtype).replace("torch.", ""),
        },
    )
    logger.info("merged %s into %s -> %s", adapter, base, out)
    return out
