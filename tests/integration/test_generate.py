"""generate through ``accelerate launch`` on the tiny model: stage1.jsonl and its manifest, prompts identical to
training's, resume after SIGKILL (every note exactly once, a torn last line redone), and the resumability guard."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.fixtures_data import make_prepared_dataset
from tests.helpers import ACCELERATE_CONFIGS, ROOT, accelerate_launch, subprocess_env

pytestmark = pytest.mark.integration

MAX_NEW_TOKENS = 16


def make_tiny_adapter(run_dir: Path, model_dir: Path, dataset_dir: Path, *, seed: int = 0) -> Path:
    """A LoRA adapter on the tiny model laid out like sft_qlora's ``<run>/final`` (random, non-zero LoRA weights,
    tokenizer, completed manifest), so generation really goes through base + merged adapter."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dischargesum.config import SFTConfig
    from dischargesum.manifest import finish_run, start_run

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(model, lora)
    final = run_dir / "final"
    cfg = SFTConfig(output_dir=str(final), dataset_dir=str(dataset_dir), model_name_or_path=str(model_dir))
    start_run(final, cfg)
    peft_model.save_pretrained(final)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(final)
    finish_run(final)
    return final


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("generate")
    data = make_prepared_dataset(root / "data", tiny_model_dir, n_rows=64)
    adapter = make_tiny_adapter(root / "sft", tiny_model_dir, data)
    return {"root": root, "data": data, "adapter": adapter}


def _args(ws: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        "--output_dir", str(out), "--dataset_dir", str(ws["data"]), "--adapter", str(ws["adapter"]),
        "--max_new_tokens", str(MAX_NEW_TOKENS), "--seed", "0", *extra,
    ]  # fmt: skip


def load_script(name: str):
    """A ``scripts/<name>`` module, to call its ``main(argv)`` in this process (no interpreter start-up)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"script_{Path(name).stem}", ROOT / "scripts" / name)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def collect_logs() -> Iterator[list[str]]:
    """Messages logged under ``dischargesum`` meanwhile (its logger does not propagate to pytest's caplog)."""
    messages: list[str] = []
    handler = logging.Handler(level=logging.DEBUG)
    handler.emit = lambda record: messages.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("dischargesum").addHandler(handler)
    try:
        yield messages
    finally:
        logging.getLogger("dischargesum").removeHandler(handler)


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def full_run(workspace: dict[str, Path]) -> Path:
    out = workspace["root"] / "full"
    proc = accelerate_launch("generate.py", _args(workspace, out, "--max_batch_size", "4"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_generate_writes_one_record_per_test_note_in_input_order(full_run: Path, workspace: dict[str, Path]) -> None:
    table = pq.read_table(workspace["data"] / "test.parquet").to_pydict()
    records = _records(full_run / "stage1.jsonl")
    assert [r["note_id"] for r in records] == table["note_id"]
    # the prompt is the training prompt, token for token: prepare_data counted it with the same template
    assert [r["prompt_tokens"] for r in records] == table["prompt_tokens"]
    for r in records:
        assert set(r) == {
            "note_id",
            "summary",
            "prompt_tokens",
            "new_tokens",
            "finish_reason",
            "seconds",
            "batch_size",
        }
        assert 1 <= r["new_tokens"] <= MAX_NEW_TOKENS and r["batch_size"] <= 4
        assert r["finish_reason"] in ("eos", "length")
        assert r["finish_reason"] == "eos" or r["new_tokens"] == MAX_NEW_TOKENS
        assert isinstance(r["summary"], str)
    manifest = json.loads((full_run / "manifest.json").read_text())
    assert manifest["stage"] == "generate" and manifest["status"] == "complete"
    assert manifest["summary"]["notes"] == len(records)
    assert manifest["inputs"]["adapter_sha256"]
    assert manifest["outputs"]["stage1.jsonl"]["bytes"] == (full_run / "stage1.jsonl").stat().st_size


def test_sigkill_midway_then_rerun_gives_every_note_exactly_once(full_run: Path, workspace: dict[str, Path]) -> None:
    out = workspace["root"] / "killed"
    part = out / "parts" / "stage1.rank000.jsonl"
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE_CONFIGS / "cpu.yaml"),
        str(ROOT / "scripts" / "generate.py"), *_args(workspace, out, "--max_batch_size", "1"),
    ]  # fmt: skip
    log = workspace["root"] / "killed.log"
    with open(log, "w") as stderr:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True
        )
        deadline = time.monotonic() + 240
        try:
            while time.monotonic() < deadline and proc.poll() is None:
                if part.is_file() and part.read_text().count("\n") >= 2:
                    break
                time.sleep(0.05)
            assert proc.poll() is None, "generate ended before it could be killed: " + log.read_text()[-2000:]
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its worker, without warning
        finally:
            proc.wait(timeout=60)
    written = part.read_text().count("\n")
    n_notes = len(pq.read_table(workspace["data"] / "test.parquet", columns=["note_id"]))
    assert 2 <= written < n_notes
    assert not (out / "stage1.jsonl").exists()
    # a write torn by the crash: half a record and no newline
    with open(part, "a") as fh:
        fh.write('{"note_id": "torn", "summary": "half a rec')
    with collect_logs() as messages:  # the rerun in this process (the killed run was a real launch)
        assert load_script("generate.py").main(_args(workspace, out, "--max_batch_size", "1")) == 0
    assert any("resuming" in m for m in messages) and any("torn or unreadable" in m for m in messages)
    records = _records(out / "stage1.jsonl")
    ids = [r["note_id"] for r in records]
    assert len(ids) == len(set(ids)) == n_notes
    # nothing was generated twice: the journal holds exactly one line per note
    assert part.read_text().count("\n") == n_notes and "torn" not in part.read_text()
    # greedy outputs match the uninterrupted run (batch size 4 there, 1 here)
    full = {r["note_id"]: r["summary"] for r in _records(full_run / "stage1.jsonl")}
    assert {r["note_id"]: r["summary"] for r in records} == full


def test_rerun_with_other_decoding_settings_is_refused_before_loading(
    full_run: Path, workspace: dict[str, Path]
) -> None:
    script = load_script("generate.py")
    before = (full_run / "stage1.jsonl").read_bytes()
    args = _args(workspace, full_run, "--max_batch_size", "4")
    args[args.index("--max_new_tokens") + 1] = str(MAX_NEW_TOKENS + 1)
    assert script.main(args) == 2
    assert (full_run / "stage1.jsonl").read_bytes() == before
    # a speed knob alone may change: the rerun resumes (nothing to do) and rewrites the same output
    same = _args(workspace, full_run, "--max_batch_size", "2")
    assert script.main(same) == 0
    assert (full_run / "stage1.jsonl").read_bytes() == before
