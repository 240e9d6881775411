"""Training-path correctness on CUDA (tiny model): with flex_attention — the default attention for packed rows on a
GPU — a packed micro-batch gives the loss and LoRA gradients of the same examples run one by one, in fp32 and in
bf16, for examples longer than twice the sliding window; and the fused LoRA node equals PEFT's forward on the
GPU's 4-bit kernels.

Run on the GPU machine: ``python -m pytest -m gpu tests/gpu/test_training_gpu.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.packing_checks import packed_vs_alone_gradients

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("pad_to", [None, 1024], ids=["packed", "packed_padded"])
@pytest.mark.parametrize("attn", ["flex_attention", "sdpa"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_packed_equals_one_by_one_on_gpu(tiny_model_dir: Path, attn: str, dtype: str, pad_to: int | None) -> None:
    # packed_padded: the row padded to a fixed length, as `static_packed_shape` trains
    alone, packed, worst = packed_vs_alone_gradients(tiny_model_dir, attn, device="cuda", dtype=dtype, pad_to=pad_to)
    loss_tol, grad_tol = (1e-5, 1e-4) if dtype == "float32" else (1e-2, 5e-2)
    assert packed == pytest.approx(alone, rel=loss_tol)
    assert worst < grad_tol, worst


def test_fused_lora_matches_peft_on_gpu_nf4(tiny_model_dir: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model

    from dischargesum.modeling import load_base_model
    from dischargesum.training import fast_lora

    model = load_base_model(
        str(tiny_model_dir), dtype="bfloat16", load_in_4bit=True, attn_implementation="sdpa", device_map={"": 0}
    )
    model.config.use_cache = False
    model.requires_grad_(False)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type="CAUSAL_LM"))
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    model.train()
    input_ids = torch.randint(3, 200, (2, 128), device="cuda")

    def run():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        return float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    ref_loss, ref = run()
    assert fast_lora.enable_fused_lora(model) > 0
    loss, got = run()
    assert loss == pytest.approx(ref_loss, rel=1e-2)
    worst = max(float((got[k] - g).norm() / g.norm()) for k, g in ref.items())
    assert worst < 5e-2, worst
