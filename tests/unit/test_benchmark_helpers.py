"""benchmarks/_common.py's pure pieces: FLOP accounting for Gemma-3-4B, check micro-batching and comparison,
LoRA parameter naming, kernel categories, the GPU-slot scheduler's isolation of a failing job."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# benchmarks/ is not a package (and a site-packages distribution owns the name `benchmarks`): import by path.
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import _common

pytestmark = pytest.mark.unit


def test_flop_model_counts_gemma3_4b() -> None:
    cfg = _common.gemma3_4b_text_config().to_dict()
    fm = _common.flop_model(cfg, [2048], [512], lora_r=32)
    assert fm.base_matmul_params == 34 * (2560 * 2048 * 2 + 2560 * 1024 * 2 + 3 * 2560 * 10240)  # 3.21e9
    assert fm.lm_head_params == 2560 * 262_208
    assert fm.lora_params == 34 * 32 * (4608 + 3584 + 3584 + 4608 + 3 * 12800)
    assert fm.trained_fraction == 0.25
    # the "~23 GFLOP per token with checkpointing" is 6N (N incl. the LM head), whole-sequence loss
    per = fm.per_token(completion_only=False, checkpointing="full")
    six_n = 6 * (fm.base_matmul_params + fm.lm_head_params)
    assert 22e9 < six_n < 24e9
    assert per["executed"] > per["useful"] > 4 * fm.base_matmul_params
    assert fm.per_token(completion_only=False, checkpointing="none")["executed"] == per["useful"]
    # sliding layers cap attention at 1024 keys: a longer example costs less than quadratic growth
    long = _common.flop_model(cfg, [4096], [1], lora_r=32).attention_fwd_flops_per_token
    assert long < 2 * fm.attention_fwd_flops_per_token


def test_check_batches_follow_the_variant_shapes() -> None:
    ex = [{"input_ids": [0] * n, "labels": [0] * n} for n in (100, 300, 200, 50)]
    padded = _common.check_batches(ex, per_device=2, flatten=False, row_tokens=None)
    assert [len(b) for b in padded] == [2, 2]
    packed = _common.check_batches(ex, per_device=1, flatten=True, row_tokens=400)
    assert [sum(len(e["input_ids"]) for e in b) for b in packed] == [400, 250]


def test_check_comparison_and_lora_names() -> None:
    ref = {"loss": 2.0, "grad_sketch": [1.0, 0.0, 0.0]}
    same = _common.compare_checks({"loss": 2.0, "grad_sketch": [1.0, 0.0, 0.0]}, ref)
    assert same == {"loss_rel_diff": 0.0, "grad_rel_err": 0.0}
    off = _common.compare_checks({"loss": 2.2, "grad_sketch": [1.0, 0.5, 0.0]}, ref)
    assert off["loss_rel_diff"] == pytest.approx(0.1) and off["grad_rel_err"] == pytest.approx(0.5)
    name = "base_model.model.model.layers.12.mlp.gate_proj.lora_A.default.weight"
    assert _common.canonical_lora_name(name) == "12.mlp.gate_proj.lora_A"
    assert _common.canonical_lora_name("model.layers.0.mlp.gate_proj.base_layer.weight") is None


def test_kernel_categories() -> None:
    assert _common.kernel_category("pytorch_flash::flash_fwd_kernel<...>") == "attention"
    assert _common.kernel_category("fmha_cutlassF_bf16_aligned_64x128_rf_sm80") == "attention"
    assert _common.kernel_category("void kDequantizeBlockwise<__nv_bfloat16, 512, 64, 8, 2>") == (
        "nf4 dequant / 4-bit matmul"
    )
    assert _common.kernel_category("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64") == "matmul"
    assert _common.kernel_category("void at::native::multi_tensor_apply_kernel<...>") == "optimizer"
    kernels = _common.attention_kernels(
        ["aten::mm", "aten::_scaled_dot_product_efficient_attention"] * 2
        + ["aten::_scaled_dot_product_flash_attention"],
        "sdpa",
    )
    assert kernels == {"sdpa/mem_efficient": 2, "sdpa/flash": 1}


def test_a_failing_or_hanging_job_does_not_stop_the_others(tmp_path: Path) -> None:
    py = sys.executable
    jobs = [
        _common.Job("fails", [py, "-c", "raise SystemExit(3)"], timeout_s=60, log_path=tmp_path / "a.log"),
        _common.Job("hangs", [py, "-c", "import time; time.sleep(60)"], timeout_s=2, log_path=tmp_path / "b.log"),
        _common.Job("works", [py, "-c", "print('ok')"], timeout_s=60, log_path=tmp_path / "c.log"),
    ]
    done: list[str] = []
    _common.run_jobs(jobs, [None, None], on_done=lambda j: done.append(j.name))
    by = {j.name: j for j in jobs}
    assert by["fails"].returncode == 3 and by["hangs"].timed_out and by["works"].returncode == 0
    assert sorted(done) == ["fails", "hangs", "works"] and "ok" in (tmp_path / "c.log").read_text()


def test_unsloth_row_loop_with_a_stand_in_module(tmp_path: Path, tiny_model_dir: Path, monkeypatch) -> None:
    """The Unsloth row's own code (collation, identical-batch check, step loop, result) on CPU, with a stand-in
    `unsloth` module (plain transformers + peft) — Unsloth itself needs a GPU; this checks our loop around it."""
    import json
    import random
    import types

    import torch

    def from_pretrained(model_name, max_seq_length, dtype, load_in_4bit, **kwargs):
        from transformers import AutoModelForCausalLM

        assert kwargs.get("local_files_only") is True and load_in_4bit
        return AutoModelForCausalLM.from_pretrained(model_name, dtype=torch.float32), None

    def get_peft_model(model, r, lora_alpha, lora_dropout, target_modules, **kwargs):
        from peft import LoraConfig, get_peft_model

        assert kwargs["use_gradient_checkpointing"] == "unsloth" and lora_dropout == 0.0
        return get_peft_model(model, LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=target_modules))

    fake = types.ModuleType("unsloth")
    fake.FastLanguageModel = types.SimpleNamespace(  # type: ignore[attr-defined]
        from_pretrained=from_pretrained, get_peft_model=get_peft_model, for_training=lambda m: m.train()
    )
    monkeypatch.setitem(sys.modules, "unsloth", fake)
    import train_throughput as tt

    rng = random.Random(0)
    ids = [[2] + [rng.randrange(10, 1000) for _ in range(n)] for n in (40, 25, 33, 18, 50)]
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"input_ids": ids, "completion_start": [len(x) // 2 for x in ids]}))
    spec = {
        "name": "unsloth",
        "profile": "tiny",
        "tokens_path": str(tokens),
        "model_dir": str(tiny_model_dir),
        "max_seq_length": 128,
        "lora_r": 4,
        "lora_alpha": 8,
        "batch_size": 2,
        "grad_accum": 2,
        "check_examples": 3,
        "warmup_steps": 1,
        "measure_steps": 2,
    }
    result = tt.run_unsloth_variant(spec)
    assert [s["step"] for s in result["steps"]] == [1, 2, 3] and result["measured_steps"] == 2
    assert result["tokens_per_s"] > 0 and all(s["tokens"] > s["trained_tokens"] > 0 for s in result["steps"])
    check = result["check"]
    assert check["trained_tokens"] == sum(len(x) - len(x) // 2 for x in ids[:3])
    assert len(check["grad_sketch"]) == 2 * 7 * 2 * _common.SKETCH_DIM  # 2 layers x 7 projections x (A, B)
    assert result["group"] == _common.loss_group(True, 4, 8, tt.LORA_TARGETS)
