"""The fused LoRA path (dischargesum/training/fast_lora.py) computes what PEFT computes: same outputs, same gradients
of the input and of both LoRA factors, on a 4-bit (bitsandbytes NF4, CPU kernels) and a dense base, with gradient
checkpointing; and it falls back to PEFT's forward wherever its fast path does not apply. The PEFT attributes it
reads are pinned, so an upgrade that renames them fails here instead of changing the math silently."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.unit


def _peft_model(model_dir: Path, *, load_in_4bit: bool, dropout: float = 0.0):
    import torch
    from peft import LoraConfig, get_peft_model

    from dischargesum.modeling import keep_cpu_4bit_layout, load_base_model

    model = load_base_model(str(model_dir), dtype="float32", load_in_4bit=load_in_4bit, attn_implementation="sdpa")
    model.config.use_cache = False
    if load_in_4bit:
        keep_cpu_4bit_layout(model)
    model.requires_grad_(False)
    cfg = LoraConfig(
        r=4,
        lora_alpha=12,
        lora_dropout=dropout,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, cfg)
    gen = torch.Generator().manual_seed(0)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:  # PEFT initialises B to zero: make the adapters take part in the output
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return peft_model


def _loss_and_grads(model, input_ids, *, checkpointing: bool = False):

    model.zero_grad(set_to_none=True)
    model.train()  # checkpointing only recomputes in training mode; every dropout here is 0 (deterministic)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    else:
        model.gradient_checkpointing_disable()
    out = model(input_ids=input_ids, labels=input_ids)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return float(out.loss.detach()), out.logits.detach(), grads


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


@pytest.mark.parametrize("load_in_4bit", [True, False], ids=["nf4", "dense"])
def test_fused_lora_matches_peft(tiny_model_dir: Path, load_in_4bit: bool) -> None:
    import torch

    from dischargesum.training import fast_lora

    model = _peft_model(tiny_model_dir, load_in_4bit=load_in_4bit)
    input_ids = torch.randint(3, 200, (2, 40), generator=torch.Generator().manual_seed(1))
    ref_loss, ref_logits, ref_grads = _loss_and_grads(model, input_ids, checkpointing=True)

    calls = []
    original_apply = fast_lora.LoraLinearFunction.apply

    def spy(*args):
        calls.append(args[0].shape)
        return original_apply(*args)

    n = fast_lora.enable_fused_lora(model)
    assert n == 7 * model.config.num_hidden_layers
    assert fast_lora.enable_fused_lora(model) == n  # idempotent
    fast_lora.LoraLinearFunction.apply = spy  # type: ignore[method-assign]
    try:
        loss, logits, grads = _loss_and_grads(model, input_ids, checkpointing=True)
    finally:
        fast_lora.LoraLinearFunction.apply = original_apply  # type: ignore[method-assign]
    # forward + the checkpointing recompute, every projection of every layer
    assert len(calls) == 2 * n
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert _rel(logits, ref_logits) < 1e-5
    assert grads.keys() == ref_grads.keys() and len(grads) == 2 * n
    worst = max(_rel(grads[k], ref_grads[k]) for k in grads)
    assert worst < 1e-4, worst
    assert all(g.dtype == torch.float32 for g in grads.values())

    # The control: a wrong scaling must be visible, so the comparison above can fail.
    layer = next(m for m in model.modules() if getattr(m, "_dischargesum_fused", False))
    layer.scaling["default"] *= 2
    wrong_loss, _, _ = _loss_and_grads(model, input_ids)
    layer.scaling["default"] /= 2
    assert wrong_loss != pytest.approx(ref_loss, rel=1e-5)

    assert fast_lora.disable_fused_lora(model) == n
    again, _, _ = _loss_and_grads(model, input_ids)
    assert again == pytest.approx(ref_loss, rel=1e-6)


def test_fused_lora_bf16_dense_within_bf16_rounding(tiny_model_dir: Path) -> None:
    import torch

    from dischargesum.training import fast_lora

    model = _peft_model(tiny_model_dir, load_in_4bit=False)
    model.to(torch.bfloat16)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()  # fp32 master weights, as the trainer keeps them
    input_ids = torch.randint(3, 200, (2, 64), generator=torch.Generator().manual_seed(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_loss, _, ref_grads = _loss_and_grads(model, input_ids)
        fast_lora.enable_fused_lora(model)
        loss, _, grads = _loss_and_grads(model, input_ids)
    assert loss == pytest.approx(ref_loss, rel=2e-2)
    worst = max(_rel(grads[k], ref_grads[k]) for k in grads)
    assert worst < 5e-2, worst


def test_fallback_to_peft_outside_the_fast_path(tiny_model_dir: Path) -> None:
    import torch

    from dischargesum.training import fast_lora

    model = _peft_model(tiny_model_dir, load_in_4bit=False, dropout=0.1)
    model.eval()  # dropout modules are inactive but present: the fast path must not claim them
    input_ids = torch.randint(3, 200, (1, 32), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(input_ids=input_ids).logits
    fast_lora.enable_fused_lora(model)
    calls = []
    original_apply = fast_lora.LoraLinearFunction.apply
    fast_lora.LoraLinearFunction.apply = lambda *a: calls.append(1) or original_apply(*a)  # type: ignore[method-assign]
    try:
        with torch.no_grad():
            out = model(input_ids=input_ids).logits
            with model.disable_adapter():
                base = model(input_ids=input_ids).logits
    finally:
        fast_lora.LoraLinearFunction.apply = original_apply  # type: ignore[method-assign]
    assert calls == []
    assert torch.equal(out, ref)
    assert not torch.allclose(base, ref)


def test_peft_attributes_the_fast_path_reads(tiny_model_dir: Path) -> None:
    """If PEFT renames any of these, the fused path would misread a layer: fail loudly instead."""
    import inspect

    import torch
    from peft.tuners.lora.bnb import Linear4bit

    model = _peft_model(tiny_model_dir, load_in_4bit=False)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    for attr in ("lora_A", "lora_B", "lora_dropout", "scaling", "use_dora", "disable_adapters", "merged"):
        assert hasattr(layer, attr), attr
    assert layer.active_adapters == ["default"]
    assert isinstance(layer.lora_dropout["default"], torch.nn.Identity)
    assert type(layer.get_base_layer()) is torch.nn.Linear
    source = inspect.getsource(Linear4bit.forward)
    # PEFT's vanilla LoRA update that the fused node reproduces: result + lora_B(lora_A(dropout(x))) * scaling
    assert "lora_B(lora_A(dropout(x))) * scaling" in source
    assert "self.disable_adapters" in source and "self.merged" in source
