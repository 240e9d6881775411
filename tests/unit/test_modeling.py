"""modeling: preflight decisions and refusals, hardware detection, VLM loading and LoRA targeting, merge, digests."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from dischargesum.config import ConfigError, SFTConfig
from dischargesum.modeling import (
    Hardware,
    ModelInfo,
    base_weights_digest,
    detect_hardware,
    load_base_model,
    load_tokenizer,
    lora_config,
    lora_target_modules,
    merge_adapter,
    preflight,
    read_model_info,
    resolve_adapter_base,
)

pytestmark = pytest.mark.unit

GEMMA = ModelInfo(path="google/medgemma-4b-it", model_type="gemma3", architectures=("Gemma3ForConditionalGeneration",))
LLAMA = ModelInfo(path="llama", model_type="llama", architectures=("LlamaForCausalLM",))


def _cfg(**kw) -> SFTConfig:
    return SFTConfig(output_dir="o", dataset_dir="d", **kw)


def _hw(device="cuda", bf16=True, dist="NO", stage=None, mp="no", name="NVIDIA H100") -> Hardware:
    return Hardware(
        device=device,
        bf16_supported=bf16,
        device_name=name if device == "cuda" else "cpu",
        distributed_type=dist,
        deepspeed_zero_stage=stage,
        world_size=1 if dist == "NO" else 2,
        launcher_mixed_precision=mp,
    )


# --- precision ---------------------------------------------------------------------------------------------------


def test_fp16_is_refused_for_gemma3_with_the_reason() -> None:
    with pytest.raises(ConfigError, match=r"`precision` = fp16.*gemma3.*NaN.*precision: auto"):
        preflight(_cfg(precision="fp16"), GEMMA, _hw())


def test_fp16_from_the_accelerate_config_is_refused_for_gemma3() -> None:
    with pytest.raises(ConfigError, match=r"mixed_precision: fp16.*NaN"):
        preflight(_cfg(), GEMMA, _hw(mp="fp16"))


def test_fp16_is_not_offered_for_other_models_either() -> None:
    with pytest.raises(ConfigError, match="fp16 is not supported"):
        preflight(_cfg(precision="fp16"), LLAMA, _hw())


def test_bf16_on_a_bf16_gpu() -> None:
    plan = preflight(_cfg(), GEMMA, _hw())
    assert plan.compute_dtype == "bfloat16" and plan.bf16
    assert plan.notes == ()
    assert plan.lora_dtype == "float32"  # fp32 master weights, bf16 compute under autocast


@pytest.mark.parametrize("precision", ["auto", "bf16"])
def test_gpu_without_bf16_falls_back_to_fp32_with_a_message(precision: str) -> None:
    plan = preflight(_cfg(precision=precision), GEMMA, _hw(bf16=False, name="Tesla T4"))
    assert plan.compute_dtype == "float32"
    assert any("fp32" in n and "Tesla T4" in n for n in plan.notes)


def test_cpu_trains_in_fp32_with_a_message() -> None:
    plan = preflight(_cfg(), GEMMA, _hw(device="cpu", bf16=False))
    assert plan.compute_dtype == "float32" and not plan.bf16
    assert any("CPU" in n for n in plan.notes)


def test_explicit_fp32_on_gpu() -> None:
    assert preflight(_cfg(precision="fp32"), GEMMA, _hw()).compute_dtype == "float32"


# --- quantisation ---------------------------------------------------------------------------------------------------


def test_4bit_needs_bitsandbytes(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name))
    with pytest.raises(ConfigError, match=r"load_in_4bit.*pip install bitsandbytes"):
        preflight(_cfg(load_in_4bit=True), GEMMA, _hw())
    assert not preflight(_cfg(load_in_4bit=False), GEMMA, _hw()).load_in_4bit


@pytest.mark.parametrize(
    ("dist", "stage", "storage", "lora_dtype"),
    [
        ("NO", None, "uint8", "float32"),
        ("MULTI_GPU", None, "uint8", "float32"),
        ("DEEPSPEED", 2, "uint8", "float32"),
        ("DEEPSPEED", 3, "bfloat16", "float32"),
        ("FSDP", None, "bfloat16", "bfloat16"),
    ],
)
def test_sharded_topologies_store_4bit_weights_in_bf16(dist, stage, storage, lora_dtype) -> None:
    plan = preflight(_cfg(), GEMMA, _hw(dist=dist, stage=stage))
    assert plan.bnb_4bit_quant_storage == storage
    assert plan.lora_dtype == lora_dtype
    assert plan.quantization_facts()["quant_storage"] == storage
    if storage == "bfloat16":
        assert any("bnb_4bit_quant_storage=bfloat16" in n for n in plan.notes)


def test_detect_hardware_reads_the_accelerate_environment() -> None:
    hw = detect_hardware({"ACCELERATE_USE_FSDP": "true", "WORLD_SIZE": "4", "ACCELERATE_MIXED_PRECISION": "bf16"})
    assert hw.distributed_type == "FSDP" and hw.world_size == 4 and hw.launcher_mixed_precision == "bf16"
    hw = detect_hardware({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"})
    assert hw.distributed_type == "DEEPSPEED" and hw.deepspeed_zero_stage == 3
    hw = detect_hardware({"ACCELERATE_USE_CPU": "true", "WORLD_SIZE": "2"})
    assert hw.distributed_type == "MULTI_CPU" and hw.device == "cpu"
    assert detect_hardware({}).distributed_type == "NO"


def test_fsdp_detected_from_the_environment_sets_quant_storage() -> None:
    hw = detect_hardware({"ACCELERATE_USE_FSDP": "true", "WORLD_SIZE": "2"})
    hw = Hardware(**{**hw.__dict__, "device": "cuda", "bf16_supported": True})
    assert preflight(_cfg(), GEMMA, hw).bnb_4bit_quant_storage == "bfloat16"


# --- attention, packing, GPU-only options ----------------------------------------------------------------------


def test_attention_auto_is_sdpa_and_packing_with_known_kernels_is_accepted() -> None:
    assert preflight(_cfg(), GEMMA, _hw()).attn_implementation == "sdpa"
    for attn in ("eager", "sdpa", "flex_attention"):
        assert preflight(_cfg(attn_implementation=attn, packing=True), GEMMA, _hw()).attn_implementation == attn


def test_packing_with_an_unknown_kernel_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"packing/padding_free.*keep packed\s+examples apart"):
        preflight(_cfg(attn_implementation="kernels-community/some-attn", packing=True), GEMMA, _hw())
    with pytest.raises(ConfigError, match="padding_free"):
        preflight(_cfg(attn_implementation="kernels-community/some-attn", padding_free=True), GEMMA, _hw())
    # without packing the same kernel is the user's choice
    assert preflight(_cfg(attn_implementation="kernels-community/some-attn"), GEMMA, _hw())


def test_misspelt_attention_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="Did you mean `sdpa`"):
        _cfg(attn_implementation="spda")


def test_flash_attention_needs_a_gpu_and_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        preflight(_cfg(attn_implementation="flash_attention_2"), GEMMA, _hw(device="cpu", bf16=False))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flash_attn" else real(name))
    with pytest.raises(ConfigError, match="flash_attn"):
        preflight(_cfg(attn_implementation="flash_attention_2"), GEMMA, _hw())


def test_liger_and_bnb_optimizers_are_refused_on_cpu() -> None:
    cpu = _hw(device="cpu", bf16=False)
    with pytest.raises(ConfigError, match=r"use_liger_kernel.*CUDA GPU"):
        preflight(_cfg(use_liger_kernel=True), GEMMA, cpu)
    with pytest.raises(ConfigError, match=r"paged_adamw_8bit.*adamw_torch"):
        preflight(_cfg(optim="paged_adamw_8bit"), GEMMA, cpu)


def test_base_hashing_is_refused_for_sharded_weights() -> None:
    with pytest.raises(ConfigError, match="check_base_unchanged"):
        preflight(_cfg(check_base_unchanged=True), GEMMA, _hw(dist="FSDP"))


# --- real tiny models ---------------------------------------------------------------------------------------------


def test_read_model_info_and_a_missing_model(tiny_model_dir: Path, tiny_vlm_dir: Path, tmp_path: Path) -> None:
    info = read_model_info(str(tiny_model_dir))
    assert info.is_gemma3 and not info.is_vlm and info.path == str(tiny_model_dir.resolve())
    vlm = read_model_info(str(tiny_vlm_dir))
    assert vlm.is_gemma3 and vlm.is_vlm
    with pytest.raises(ConfigError, match="model_name_or_path"):
        read_model_info(str(tmp_path / "nope"))


def test_vlm_loads_as_a_causal_lm_with_a_frozen_vision_tower(tiny_vlm_dir: Path) -> None:
    import torch

    model = load_base_model(str(tiny_vlm_dir), dtype="float32")
    assert type(model).__name__ == "Gemma3ForConditionalGeneration"
    assert all(not p.requires_grad for p in model.model.vision_tower.parameters())
    tok = load_tokenizer(str(tiny_vlm_dir), padding_side="left")
    batch = tok(["a note", "another longer note"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape[:2] == batch["input_ids"].shape
    out = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == batch["input_ids"].shape[1] + 3


def test_lora_targets_only_the_language_model_of_a_vlm(tiny_vlm_dir: Path) -> None:
    from peft import get_peft_model

    model = load_base_model(str(tiny_vlm_dir), dtype="float32")
    vision_names = {n for n, _ in model.named_modules() if "vision_tower" in n}
    assert any(n.endswith(("q_proj", "k_proj", "v_proj")) for n in vision_names), "tiny VLM must share proj names"
    peft_model = get_peft_model(model, lora_config(SFTConfig(output_dir="o", dataset_dir="d"), is_vlm=True))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("language_model" in n and "lora_" in n for n in trainable)
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    layers = {n.split("layers.")[1].split(".")[0] for n in trainable}
    assert layers == {"0", "1"}


def test_causal_lm_targets_are_plain_names() -> None:
    assert lora_target_modules(["q_proj", "v_proj"], is_vlm=False) == ["q_proj", "v_proj"]
    regex = lora_target_modules(["q_proj"], is_vlm=True)
    import re

    assert re.fullmatch(regex, "model.language_model.layers.3.self_attn.q_proj")
    assert not re.fullmatch(regex, "model.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj")


def test_4bit_base_loads_on_cpu(tiny_model_dir: Path) -> None:
    import torch

    model = load_base_model(str(tiny_model_dir), dtype="float32", load_in_4bit=True)
    assert getattr(model, "is_loaded_in_4bit", False)
    assert any(type(m).__name__ == "Linear4bit" for m in model.modules())
    with torch.no_grad():
        out = model(input_ids=torch.tensor([[2, 10, 11, 12]]))
    assert torch.isfinite(out.logits).all()


def test_base_digest_ignores_peft_wrapping_and_sees_changes(tiny_model_dir: Path) -> None:
    import torch
    from peft import get_peft_model

    base = load_base_model(str(tiny_model_dir), dtype="float32")
    digest = base_weights_digest(base)
    wrapped = get_peft_model(base, lora_config(SFTConfig(output_dir="o", dataset_dir="d", lora_r=4), is_vlm=False))
    assert base_weights_digest(wrapped) == digest
    with torch.no_grad():
        next(p for n, p in wrapped.named_parameters() if "lora_" not in n).add_(1e-3)
    assert base_weights_digest(wrapped) != digest


def test_merge_adapter_matches_the_adapted_model(tiny_model_dir: Path, tmp_path: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = load_base_model(str(tiny_model_dir), dtype="float32")
    peft_model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights=False)
    )
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    load_tokenizer(str(tiny_model_dir)).save_pretrained(adapter)
    assert resolve_adapter_base(adapter) == str(tiny_model_dir.resolve())
    ids = torch.tensor([[2, 5, 17, 99, 300, 41]])
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits
    merged_dir = merge_adapter(adapter, tmp_path / "merged", dtype="float32")
    merged = load_base_model(str(merged_dir), dtype="float32")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        got = merged(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    plain = load_base_model(str(tiny_model_dir), dtype="float32")
    with torch.no_grad():
        assert not torch.allclose(plain(input_ids=ids).logits, want, atol=1e-4), "the adapter must matter"
    assert (merged_dir / "merged_from.json").is_file() and (merged_dir / "tokenizer.json").is_file()


def test_resolve_adapter_base_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"adapter_config\.json"):
        resolve_adapter_base(tmp_path)


def test_cpu_4bit_layout_is_kept_through_evaluation(tiny_model_dir: Path) -> None:
    """bitsandbytes repacks 4-bit weights for its CPU inference kernel on AVX512-BF16 CPUs (rounding the scales to
    bf16) the first time a layer runs in eval mode without grad; training must keep one layout, and the base digest
    (which covers the quantisation state) must see such a change."""
    import torch
    from bitsandbytes.nn.modules import has_avx512bf16

    from dischargesum.modeling import keep_cpu_4bit_layout

    ids = torch.tensor([[2, 10, 11, 12, 13]])
    kept = load_base_model(str(tiny_model_dir), dtype="float32", load_in_4bit=True)
    assert keep_cpu_4bit_layout(kept) == 14  # 2 layers x 7 projections
    before = base_weights_digest(kept)
    kept.eval()
    with torch.no_grad():
        kept(input_ids=ids)
    assert base_weights_digest(kept) == before
    if not has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes never repacks here")
    repacked = load_base_model(str(tiny_model_dir), dtype="float32", load_in_4bit=True).eval()
    assert base_weights_digest(repacked) == before
    with torch.no_grad():
        repacked(input_ids=ids)
    assert base_weights_digest(repacked) != before, "the repack rounds the 4-bit scales: the digest must notice"


def test_auto_attention_is_flex_for_packed_rows_on_a_gpu_and_sdpa_elsewhere() -> None:
    plan = preflight(_cfg(packing=True), GEMMA, _hw())
    assert plan.attn_implementation == "flex_attention"
    assert any("flex_attention" in note for note in plan.notes)
    assert preflight(_cfg(padding_free=True), GEMMA, _hw()).attn_implementation == "flex_attention"
    assert preflight(_cfg(packing=False), GEMMA, _hw()).attn_implementation == "sdpa"
    assert preflight(_cfg(packing=True), GEMMA, _hw(device="cpu", bf16=False)).attn_implementation == "sdpa"
    assert preflight(_cfg(packing=True, attn_implementation="sdpa"), GEMMA, _hw()).attn_implementation == "sdpa"


def test_fused_lora_is_off_where_the_base_is_sharded() -> None:
    assert preflight(_cfg(fused_lora=True), GEMMA, _hw()).fused_lora
    assert not preflight(_cfg(fused_lora=False), GEMMA, _hw()).fused_lora
    fsdp = preflight(_cfg(fused_lora=True), GEMMA, _hw(dist="FSDP"))
    assert not fsdp.fused_lora and any("fused_lora: off under FSDP" in n for n in fsdp.notes)
    zero3 = preflight(_cfg(fused_lora=True), GEMMA, _hw(dist="DEEPSPEED", stage=3))
    assert not zero3.fused_lora
