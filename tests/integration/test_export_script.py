"""scripts/export.py: the merged model loads with plain transformers (no dischargesum, no remote code), holds only
safetensors, carries a model card with the data fingerprint and eval metrics, and computes what the adapter does.

The export under test is the one the quickstart notebook's demo writes (scripts/export.py, default bf16, from the
demo run's sft_qlora final/ and its two eval directories) — shared with the notebook test rather than retrained.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dischargesum.config import ExportConfig
from tests.helpers import subprocess_env
from tests.integration.conftest import ExecutedNotebook

pytestmark = pytest.mark.integration

# Runs in a fresh interpreter without this checkout on the path: plain transformers only.
PLAIN_LOAD = r"""
import json, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model_dir, prompts = sys.argv[1], json.loads(sys.argv[2])
tok = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
out = {"dtype": str(model.dtype), "logits": [], "greedy": []}
for note in prompts:
    messages = [{"role": "user", "content": note}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out["logits"].append(model(**ids).logits[0].float().tolist())
        gen = model.generate(**ids, max_new_tokens=8, do_sample=False)
    out["greedy"].append(gen[0, ids["input_ids"].shape[1]:].tolist())
out["dischargesum_imported"] = any(m.split(".")[0] == "dischargesum" for m in sys.modules)
print(json.dumps(out))
"""


def _prompts(run_dir: Path) -> list[str]:
    import pyarrow.parquet as pq

    notes = pq.read_table(run_dir / "data" / "test.parquet", columns=["note"]).column("note").to_pylist()
    return [str(n)[:300] for n in notes[:2]]


def _adapter_reference(adapter: Path, prompts: list[str], dtype: str) -> dict:
    """Logits and greedy tokens of the base + LoRA adapter (unmerged, peft) on the same prompts."""
    import torch
    from peft import PeftModel

    from dischargesum.modeling import load_base_model, load_tokenizer, resolve_adapter_base

    tok = load_tokenizer(str(adapter))
    model = PeftModel.from_pretrained(load_base_model(resolve_adapter_base(adapter), dtype=dtype), str(adapter)).eval()
    out: dict = {"logits": [], "greedy": []}
    for note in prompts:
        ids = tok.apply_chat_template(
            [{"role": "user", "content": note}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        with torch.no_grad():
            out["logits"].append(model(**ids).logits[0].float())
            gen = model.generate(**ids, max_new_tokens=8, do_sample=False)
        out["greedy"].append(gen[0, ids["input_ids"].shape[1] :].tolist())
    return out


def _plain_load(model_dir: Path, prompts: list[str]) -> dict:
    env = subprocess_env()
    env.pop("PYTHONPATH")
    proc = subprocess.run(
        [sys.executable, "-c", PLAIN_LOAD, str(model_dir), json.dumps(prompts)],
        capture_output=True, text=True, timeout=600, env=env, cwd=model_dir,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_export_is_standalone_with_a_model_card(quickstart_notebook: ExecutedNotebook) -> None:
    from safetensors import safe_open

    merged, run = quickstart_notebook.demo_dir / "merged", quickstart_notebook.run_dir
    names = {p.name for p in merged.iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "chat_template.jinja",
    } <= names
    assert not [p for p in merged.rglob("*") if p.suffix in {".bin", ".pt", ".pth", ".pkl", ".ckpt"}]
    config = json.loads((merged / "config.json").read_text())
    assert "auto_map" not in config and config["architectures"] == ["Gemma3ForCausalLM"]
    with safe_open(merged / "model.safetensors", "pt") as fh:
        dtypes = {str(fh.get_slice(k).get_dtype()) for k in fh.keys()}  # noqa: SIM118
        assert not any("lora" in k for k in fh.keys())  # noqa: SIM118
    assert dtypes == {"BF16"}
    card = (merged / "README.md").read_text()
    fingerprint = json.loads((run / "sft/final/data_fingerprint.json").read_text())["data_fingerprint"]
    assert fingerprint in card and "sample fraction 0.5" in card
    metrics = json.loads((run / "eval/metrics.json").read_text())
    recall = metrics["overall"]["entities"]["vs_reference"]["micro"]["overall"]["recall"]
    assert f"| entity recall vs reference BHC (micro) | {recall:.4f} |" in card
    assert "| entity recall vs stage-1 summary (micro) |" in card
    assert (merged / "eval/eval_stage2/metrics.json").is_file()
    manifest = json.loads((merged / "manifest.json").read_text())
    assert manifest["stage"] == "export" and manifest["status"] == "complete"
    assert manifest["data_fingerprint"] == fingerprint


def test_merged_bf16_export_loads_without_dischargesum_and_matches_the_adapter(
    quickstart_notebook: ExecutedNotebook,
) -> None:
    import torch

    run = quickstart_notebook.run_dir
    prompts = _prompts(run)
    got = _plain_load(quickstart_notebook.demo_dir / "merged", prompts)
    assert not got["dischargesum_imported"] and got["dtype"] == "torch.bfloat16"
    want = _adapter_reference(run / "sft/final", prompts, dtype="bfloat16")
    # bf16 weights: W + BA is rounded once to bf16 in the export, while peft adds the LoRA path's bf16 output to
    # the base layer's. Measured (30-step demo adapter, logits of magnitude ~1): max |difference| 0.011; allowed 0.03.
    for g, w in zip(got["logits"], want["logits"]):
        torch.testing.assert_close(torch.tensor(g), w, rtol=0, atol=0.03)
    assert got["greedy"] == want["greedy"]


def test_merged_float32_export_equals_the_adapter(quickstart_notebook: ExecutedNotebook, tmp_path: Path) -> None:
    import torch

    from dischargesum.export import run_export

    run = quickstart_notebook.run_dir
    out = run_export(ExportConfig(output_dir=str(tmp_path / "fp32"), adapter=str(run / "sft/final"), dtype="float32"))
    prompts = _prompts(run)
    got = _plain_load(out, prompts)
    want = _adapter_reference(run / "sft/final", prompts, dtype="float32")
    # fp32 merge: the same sums in another order. Measured max |difference| 5e-7 (30-step demo adapter; logits ~1);
    # allowed 1e-5 — while the adapter moves the base model's logits by far more (checked below).
    for g, w in zip(got["logits"], want["logits"]):
        torch.testing.assert_close(torch.tensor(g), w, rtol=0, atol=1e-5)
    assert got["greedy"] == want["greedy"]
    from dischargesum.modeling import load_base_model, load_tokenizer, resolve_adapter_base

    base = load_base_model(resolve_adapter_base(run / "sft/final"), dtype="float32")
    tok = load_tokenizer(str(run / "sft/final"))
    moved = 0.0
    for note, w in zip(prompts, want["logits"]):
        messages = [{"role": "user", "content": note}]
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            moved = max(moved, (base(**ids).logits[0] - w).abs().max().item())
    assert moved > 1e-3, f"the adapter barely changes the model ({moved}): the equality above would prove nothing"
    assert "## Evaluation" not in (out / "README.md").read_text()  # no eval_dir given: no metrics section


def test_export_refuses_a_foreign_output_dir(quickstart_notebook: ExecutedNotebook, tmp_path: Path) -> None:
    from dischargesum.config import ConfigError
    from dischargesum.export import run_export

    (tmp_path / "notes.txt").write_text("not an export")
    with pytest.raises(ConfigError, match="not empty"):
        run_export(ExportConfig(output_dir=str(tmp_path), adapter=str(quickstart_notebook.run_dir / "sft/final")))
