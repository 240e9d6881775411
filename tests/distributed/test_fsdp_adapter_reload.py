"""FSDP resume puts the checkpoint's adapter back into the wrapped model (``DischargeSFTTrainer``).

accelerate's own FSDP resume path restored nothing for our FSDP-QLoRA runs on 2 H100s (the loss after resuming was
the untrained model's), so the trainer reloads ``adapter_model.safetensors`` itself. Here the live LoRA weights are
zeroed, reloaded, and compared every LoRA tensor with the saved ones. FSDP needs no GPU for this: one CPU process
(gloo) wraps the tiny Gemma-3 with PEFT's wrap policy (what accelerate uses), so the load goes through FSDP's flat
parameters and FULL_STATE_DICT hooks. Two CPU ranks do not work: FSDP1's unshard on gloo/CPU fails inside torch
("setStorage ... storage of size 0", measured), so sharding across ranks is covered only by the GPU run of
benchmarks/multi_gpu.py's ``fsdp`` mode (4-bit base, bf16 storage, kill + resume on 2 GPUs).
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

pytestmark = pytest.mark.distributed
WORLD = 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, world: int, port: int, model_dir: str, adapter_dir: str, out: str) -> None:
    import os

    import torch.distributed as dist
    from peft import PeftModel
    from peft.utils.other import fsdp_auto_wrap_policy
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from transformers import AutoModelForCausalLM

    from dischargesum.training.checkpoint_trainer import gather_fsdp_adapter, load_fsdp_adapter, save_fsdp_adapter

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(model_dir), adapter_dir, is_trainable=True
        )
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.zero_()  # a value never overwritten must not pass for a restored one
        fsdp = FSDP(
            model, auto_wrap_policy=fsdp_auto_wrap_policy(model), device_id=torch.device("cpu"), use_orig_params=False
        )
        with torch.no_grad():  # FSDP's lazy initialisation, as the trainer's setup does before resuming
            fsdp(input_ids=torch.tensor([[5, 6, 7]]))

        gathered = gather_fsdp_adapter(fsdp, model)
        if rank == 0:
            assert gathered and all(float(v.abs().sum()) == 0 for v in gathered.values())  # what was zeroed
        loaded = load_fsdp_adapter(fsdp, model, Path(adapter_dir))
        state = gather_fsdp_adapter(fsdp, model)
        if rank == 0:  # what a checkpoint gets: must load with PEFT as any adapter does
            save_fsdp_adapter(model, state, Path(out) / "resaved")
        torch.save({"loaded": loaded, "state": state}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_fsdp_resume_reloads_the_adapter(tmp_path: Path, tiny_model_dir: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    peft_model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False),
    )
    adapter_dir = tmp_path / "checkpoint-3"
    peft_model.save_pretrained(adapter_dir)
    saved = {k: v.clone() for k, v in peft_model.state_dict().items() if "lora_" in k}
    assert saved and all(v.abs().sum() > 0 for v in saved.values())
    mp.spawn(
        _worker,
        args=(WORLD, _free_port(), str(tiny_model_dir), str(adapter_dir), str(tmp_path)),
        nprocs=WORLD,
        join=True,
    )
    result = torch.load(tmp_path / "rank0.pt")
    assert result["loaded"] == len(saved)
    restored = result["state"]
    assert set(restored) == set(saved)
    for key, tensor in saved.items():
        assert torch.equal(restored[key], tensor), key
    from peft import PeftModel

    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "resaved")
    again = {k: v for k, v in reloaded.state_dict().items() if "lora_" in k}
    assert set(again) == set(saved)
    for key, tensor in saved.items():
        assert torch.equal(again[key], tensor), key
