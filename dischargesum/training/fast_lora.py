"""A fused forward/backward for PEFT's LoRA layers on a frozen base: fewer, larger kernels per projection.

PEFT computes a LoRA projection on a 4-bit base (``peft.tuners.lora.bnb.Linear4bit.forward``) as

    result = base_layer(x).clone()                       # NF4 dequantise + GEMM, then a full copy of the output
    result = result + lora_B(lora_A(x)) * scaling        # two small GEMMs, then a multiply and an add over the output

and autograd adds the matching multiply in the backward. The copy, the multiply and the add are three extra passes
over an output of ``tokens x out_features`` per projection, in the forward, again in the gradient-checkpointing
recompute, and once more in the backward: measured on H100 (benchmarks/results/profile_train_step_h100.txt) as
~0.7 s of a 4.5-7 s optimizer step of the medgemma recipe, plus the launch overhead of ~10 small ops per projection.

:class:`LoraLinearFunction` computes the same function as one autograd node:

    out = x @ W.T                           (bitsandbytes' 4-bit GEMM, or a dense GEMM for an unquantised base)
    out += (scaling * (x @ A.T)) @ B.T      (one GEMM that accumulates into ``out``: no copy, multiply or add pass)

with the hand-written backward (``W`` is frozen and dequantised again in the backward, as bitsandbytes does)::

    gB = g @ B;  dx = g @ W + scaling * gB @ A;  dA = scaling * gB.T @ x;  dB = g.T @ (scaling * x @ A.T)

This is the approach of Unsloth's ``fast_lora`` (a custom autograd function per LoRA projection), written here for
PEFT's module structure. PEFT has no public hook to replace how a LoRA layer combines its base output with the
adapter's, so :func:`enable_fused_lora` sets ``forward`` on each supported *instance* (the class is untouched; the
instance falls back to PEFT's own ``forward`` for anything outside the fast path: dropout, DoRA and other variants,
several active adapters, merged or disabled adapters, mixed-batch adapter names, a bias, a dtype mismatch).
``tests/unit/test_fast_lora.py`` pins the equivalence (outputs and gradients against PEFT's forward, 4-bit and
dense, with gradient checkpointing through the trainer) and the PEFT attributes this relies on, so a PEFT upgrade
that changes them fails a test instead of silently changing the math.

Numerics: the same operations in the same precision as PEFT under bf16 autocast (LoRA weights cast to the input
dtype, fp32 accumulation in every GEMM), except that ``x @ A.T`` is scaled before (not after) the ``B`` GEMM and the
sum is rounded once (inside the GEMM's epilogue) instead of twice. Gradients of fp32 master weights come back in
fp32, as under autocast.

Not used under FSDP or DeepSpeed ZeRO-3: they gather a module's parameters in hooks around that module's own
``forward`` call, and the fused path reads the base layer's weight without calling it.
"""

from __future__ import annotations

import types
from typing import Any

import torch

from dischargesum.logging_utils import get_logger

logger = get_logger(__name__)


def _is_bnb_4bit(layer: torch.nn.Module) -> bool:
    try:
        import bitsandbytes as bnb
    except ImportError:  # pragma: no cover - bitsandbytes is a core dependency
        return False
    return isinstance(layer, bnb.nn.Linear4bit)


def _dense_weight(weight: torch.Tensor, quant_state: Any, dtype: torch.dtype) -> torch.Tensor:
    if quant_state is None:
        return weight.to(dtype)
    import bitsandbytes.functional as bnb_functional

    return bnb_functional.dequantize_4bit(weight, quant_state).to(dtype)


def _base_matmul(x2: torch.Tensor, weight: torch.Tensor, quant_state: Any) -> torch.Tensor:
    """``x2 @ W.T`` as a fresh, contiguous tensor in ``x2``'s dtype (called with autograd off)."""
    if quant_state is None:
        return torch.mm(x2, weight.to(x2.dtype).t())
    import bitsandbytes as bnb

    # Inside an autograd.Function's forward grad mode is off, so this is bitsandbytes' inference path (its fused
    # 4-bit GEMM or dequantise + cuBLAS, whichever it picks for the shape): the same kernels as its training forward.
    return bnb.matmul_4bit(x2, weight.t(), quant_state=quant_state).contiguous()


class LoraLinearFunction(torch.autograd.Function):
    """``x @ W.T + scaling * (x @ A.T) @ B.T`` for a frozen ``W`` (dense, or 4-bit with its bitsandbytes
    ``quant_state``) and trainable LoRA factors ``A`` (r x in) and ``B`` (out x r)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        scaling: float,
        weight: torch.Tensor,
        quant_state: Any,
    ) -> torch.Tensor:
        dtype = x.dtype
        a = lora_a.to(dtype)
        b = lora_b.to(dtype)
        x2 = x.reshape(-1, x.shape[-1])
        out = _base_matmul(x2, weight, quant_state)
        xa = torch.mm(x2, a.t())
        xa.mul_(scaling)
        out.addmm_(xa, b.t())
        ctx.scaling = scaling
        ctx.quant_state = quant_state
        ctx.x_shape = x.shape
        ctx.factor_dtypes = (lora_a.dtype, lora_b.dtype)
        ctx.save_for_backward(x2 if ctx.needs_input_grad[1] else None, xa, a, b, weight)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x2, xa, a, b, weight = ctx.saved_tensors
        g = grad_output.reshape(-1, grad_output.shape[-1]).to(b.dtype)
        gb = torch.mm(g, b)  # (tokens, r)
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.mm(g, _dense_weight(weight, ctx.quant_state, g.dtype))
            grad_x.addmm_(gb, a, alpha=ctx.scaling)
            grad_x = grad_x.view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            grad_a = torch.mm(gb.t(), x2).mul_(ctx.scaling).to(ctx.factor_dtypes[0])
        if ctx.needs_input_grad[2]:
            grad_b = torch.mm(g.t(), xa).to(ctx.factor_dtypes[1])
        return grad_x, grad_a, grad_b, None, None, None


def _fast_path_operands(layer: Any, x: torch.Tensor, args: tuple, kwargs: dict) -> tuple | None:
    """(A, B, scaling, weight, quant_state) when ``layer`` can take the fused path for ``x``, else None."""
    if args or kwargs or layer.disable_adapters or layer.merged:
        return None
    active = layer.active_adapters
    if len(active) != 1:
        return None
    name = active[0]
    if name not in layer.lora_A or name in getattr(layer, "lora_variant", {}) or layer.use_dora.get(name, False):
        return None
    if not isinstance(layer.lora_dropout[name], torch.nn.Identity):
        return None
    base = layer.get_base_layer()
    if getattr(base, "bias", None) is not None:
        return None
    if _is_bnb_4bit(base):
        from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module

        fix_4bit_weight_quant_state_from_module(base)
        quant_state = getattr(base.weight, "quant_state", None)
        if quant_state is None or getattr(quant_state, "packing_format_for_cpu", False):
            return None
        if base.compute_dtype is not None and x.dtype != base.compute_dtype:
            return None
    elif isinstance(base, torch.nn.Linear):
        quant_state = None
        if x.dtype != base.weight.dtype:
            return None
    else:
        return None
    lora_a = layer.lora_A[name].weight
    lora_b = layer.lora_B[name].weight
    return lora_a, lora_b, float(layer.scaling[name]), base.weight, quant_state


def _fused_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    operands = _fast_path_operands(self, x, args, kwargs)
    if operands is None:
        return type(self).forward(self, x, *args, **kwargs)
    lora_a, lora_b, scaling, weight, quant_state = operands
    return LoraLinearFunction.apply(x, lora_a, lora_b, scaling, weight, quant_state)


def _supported(module: torch.nn.Module) -> bool:
    from peft.tuners.lora import LoraLayer

    if not isinstance(module, LoraLayer):
        return False
    base = module.get_base_layer()
    return _is_bnb_4bit(base) or type(base) is torch.nn.Linear


def enable_fused_lora(model: Any) -> int:
    """Route every LoRA projection on a ``bitsandbytes`` 4-bit or plain ``nn.Linear`` base through
    :class:`LoraLinearFunction`; returns how many layers were switched (idempotent)."""
    count = 0
    for module in model.modules():
        if _supported(module):
            if getattr(module, "_dischargesum_fused", False):
                count += 1
                continue
            # Instance attributes, not nn.Module state: object.__setattr__ keeps them out of parameters/buffers.
            object.__setattr__(module, "forward", types.MethodType(_fused_forward, module))
            object.__setattr__(module, "_dischargesum_fused", True)
            count += 1
    return count


def disable_fused_lora(model: torch.nn.Module) -> int:
    """Undo :func:`enable_fused_lora` (the instances use PEFT's ``forward`` again); returns how many."""
    count = 0
    for module in model.modules():
        if getattr(module, "_dischargesum_fused", False):
            del module.forward
            del module._dischargesum_fused
            count += 1
    return count
