"""Check the GPU machine before the long benchmark runs: library versions, imports of the carried packages, and
which attention kernels Gemma-3-4B's shapes (head_dim 256, sliding window 1024) can use.

    python benchmarks/gpu_env_check.py --out $OUT

Writes gpu_env_check.json (device, date, versions, checks) into --out and prints a short summary last.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import time
from pathlib import Path


def _try(fn):  # fn: a zero-argument callable; returns its value or the error, never raises
    try:
        return {"ok": True, "value": fn()}
    except Exception as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:400]}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    import torch

    result: dict = {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "checks": {}}
    result["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    result["gpu_count"] = torch.cuda.device_count()
    versions = {}
    for name in (
        "torch",
        "transformers",
        "trl",
        "peft",
        "accelerate",
        "bitsandbytes",
        "datasets",
        "deepspeed",
        "liger_kernel",
        "bert_score",
        "rouge_score",
        "spacy",
        "triton",
        "tokenizers",
    ):
        versions[name] = _try(lambda n=name: getattr(importlib.import_module(n), "__version__", "?"))
    result["versions"] = versions
    checks = result["checks"]
    dev = "cuda"
    q = torch.randn(2, 8, 2048, 256, device=dev, dtype=torch.bfloat16)
    k = torch.randn(2, 4, 2048, 256, device=dev, dtype=torch.bfloat16).repeat_interleave(2, dim=1)
    v = torch.randn_like(k)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def timed(fn, reps: int = 20) -> float:
        fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - t) / reps * 1e3

    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):

        def run(b=backend):
            with sdpa_kernel(b):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

        checks[f"sdpa_causal_{backend.name}_ms"] = _try(lambda r=run: timed(r))
    mask = torch.ones(2048, 2048, device=dev, dtype=torch.bool).tril()
    mask &= ~torch.ones_like(mask).tril(-1024)
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):

        def runm(b=backend):
            with sdpa_kernel(b):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)

        checks[f"sdpa_sliding_mask_{backend.name}_ms"] = _try(lambda r=runm: timed(r))

    def flex():
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        def sliding(b, h, qi, ki):
            return (qi >= ki) & (qi - ki < 1024)

        bm = create_block_mask(sliding, None, None, 2048, 2048, device=dev)
        f = torch.compile(flex_attention)
        return timed(lambda: f(q, k, v, block_mask=bm))

    checks["flex_attention_sliding_ms"] = _try(flex)

    def bnb4():
        import bitsandbytes as bnb

        lin = bnb.nn.Linear4bit(2560, 10240, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4").to(dev)
        x = torch.randn(4096, 2560, device=dev, dtype=torch.bfloat16)
        return timed(lambda: lin(x))

    checks["bnb_nf4_linear_4096x2560x10240_ms"] = _try(bnb4)
    checks["liger_import"] = _try(lambda: str(importlib.import_module("liger_kernel.transformers").__name__))
    checks["trl_sfttrainer_import"] = _try(lambda: str(importlib.import_module("trl").SFTTrainer.__name__))
    checks["spacy_blank"] = _try(lambda: len(importlib.import_module("spacy").blank("en")("BP 120/80")))

    def build():
        from _common import build_random_gemma3_4b  # benchmarks/ is this script's directory

        t = time.perf_counter()
        build_random_gemma3_4b("/tmp/gemma3-4b-random")
        return round(time.perf_counter() - t, 1)

    checks["build_random_gemma3_4b_s"] = _try(build)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_env_check.json").write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
