"""sft_qlora on a CUDA GPU (skipped without one; run on the GPU machine with `pytest -m gpu`).

The tiny Gemma-3 VLM (MedGemma's class) through `accelerate launch` with accelerate_configs/single_gpu.yaml: the
preflight must pick bf16 compute, the 4-bit base is quantised on the GPU, LoRA keeps fp32 master weights, packing
runs with sdpa (and padding-free with flash attention / Liger when those packages are installed), and the GPU memory
scalars reach TensorBoard and metrics.jsonl.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.fixtures_data import make_prepared_dataset
from tests.integration.test_sft_train import check_completed_run, check_tensorboard, launch, sft_args

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def vlm_dataset(tmp_path_factory: pytest.TempPathFactory, tiny_vlm_dir: Path) -> Path:
    return make_prepared_dataset(tmp_path_factory.mktemp("sft-gpu-data"), tiny_vlm_dir)


def test_preflight_picks_bf16_on_this_gpu(tiny_vlm_dir: Path) -> None:
    import torch

    from dischargesum.config import SFTConfig
    from dischargesum.modeling import detect_hardware, preflight, read_model_info

    hw = detect_hardware({})
    plan = preflight(SFTConfig(output_dir="o", dataset_dir="d"), read_model_info(str(tiny_vlm_dir)), hw)
    assert hw.device == "cuda"
    assert plan.compute_dtype == ("bfloat16" if torch.cuda.is_bf16_supported() else "float32")
    assert plan.is_vlm


@pytest.mark.parametrize(
    "extra",
    [
        ["--packing", "true", "--attn_implementation", "sdpa"],
        ["--padding_free", "true", "--attn_implementation", "flash_attention_2", "--use_liger_kernel", "true"],
    ],
    ids=["packing-sdpa", "padding_free-flash-liger"],
)
def test_qlora_vlm_trains_on_the_gpu(extra: list[str], vlm_dataset: Path, tiny_vlm_dir: Path, tmp_path: Path) -> None:
    if "flash_attention_2" in extra and importlib.util.find_spec("flash_attn") is None:
        pytest.skip("flash-attn is not installed")
    if "--use_liger_kernel" in extra and importlib.util.find_spec("liger_kernel") is None:
        pytest.skip("liger-kernel is not installed")
    out = tmp_path / "run"
    args = sft_args(vlm_dataset, tiny_vlm_dir, out, max_steps=4, load_in_4bit=True)
    if "--packing" in extra:  # a packed row mixes notes: no per-step note_ids
        args[args.index("--log_note_ids") + 1] = "false"
    args += extra
    proc = launch(args, config_file="single_gpu.yaml")
    assert "bfloat16 compute" in proc.stderr or "float32 compute" in proc.stderr
    training = check_completed_run(out, steps=4, world_size=1, base_digest=None)
    assert training["load_in_4bit"] is True and training["device"].startswith(("NVIDIA", "Tesla"))
    check_tensorboard(out, steps=4)
    from dischargesum.training.metrics import read_metrics

    rows = [r for r in read_metrics(out) if "loss" in r]
    assert all(r["gpu_memory_peak_gib"] > 0 for r in rows)


def test_fp16_is_refused_before_loading(vlm_dataset: Path, tiny_vlm_dir: Path, tmp_path: Path) -> None:
    from tests.helpers import accelerate_launch

    args = [*sft_args(vlm_dataset, tiny_vlm_dir, tmp_path / "run"), "--precision", "fp16"]
    proc = accelerate_launch("sft_qlora.py", args, config_file="single_gpu.yaml", timeout=300)
    assert proc.returncode != 0
    assert "fp16" in proc.stderr and "NaN" in proc.stderr
    assert not (tmp_path / "run" / "checkpoint-2").exists()
