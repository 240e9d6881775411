"""Does PEFT's own ``save_pretrained`` keep the adapter of an FSDP-wrapped model? (Why the trainer writes it itself.)

    python benchmarks/peft_fsdp_save_check.py --model_dir outputs/demo/tiny-gemma3 --out benchmarks/results

One CPU process (gloo) wraps the tiny Gemma-3 + LoRA with PEFT's FSDP wrap policy (what accelerate uses), gathers the
LoRA tensors with ``dischargesum.training.checkpoint_trainer.gather_fsdp_adapter`` and saves twice: through
``PeftModel.save_pretrained(state_dict=gathered)`` and through ``save_fsdp_adapter``. Records how many tensors each
file holds (``peft_fsdp_save_cpu.json``). With PEFT 0.21 the first holds none: PEFT picks adapter keys from module
names and strips only a leading ``_fsdp_wrapped_module.``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model_dir", required=True, help="a tiny Gemma-3 (scripts/build_tiny_model.py)")
    p.add_argument("--out", default=None, help="directory for peft_fsdp_save_cpu.json (default: print only)")
    args = p.parse_args()
    import torch
    import torch.distributed as dist
    from peft import LoraConfig, get_peft_model
    from peft.utils.other import fsdp_auto_wrap_policy
    from safetensors.torch import load_file
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from transformers import AutoModelForCausalLM

    from dischargesum.training.checkpoint_trainer import gather_fsdp_adapter, save_fsdp_adapter

    with socket.socket() as sock:  # a free port for the one-process group
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(args.model_dir), lora)
        fsdp = FSDP(model, auto_wrap_policy=fsdp_auto_wrap_policy(model), device_id=torch.device("cpu"))
        with torch.no_grad():
            fsdp(input_ids=torch.tensor([[5, 6, 7]]))
        gathered = gather_fsdp_adapter(fsdp, model)
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(f"{tmp}/peft", state_dict=gathered)
            save_fsdp_adapter(model, gathered, Path(tmp) / "ours")
            result = {
                "benchmark": "peft_fsdp_save_check",
                **_common.environment_facts(),
                "versions": _common.library_versions(["torch", "transformers", "peft", "accelerate"]),
                "lora_tensors_gathered": len(gathered),
                "tensors_written_by_peft_save_pretrained": len(load_file(f"{tmp}/peft/adapter_model.safetensors")),
                "tensors_written_by_save_fsdp_adapter": len(load_file(f"{tmp}/ours/adapter_model.safetensors")),
            }
    finally:
        dist.destroy_process_group()
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out, "peft_fsdp_save_cpu.json").write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
