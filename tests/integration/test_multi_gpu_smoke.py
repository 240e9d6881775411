"""``benchmarks/multi_gpu.py --smoke``: the multi-GPU harness end to end on the CPU (tiny model, 2 gloo processes).

The GPU run (lent 2-4 GPU machine) must work the first time, so the paths it takes that a CPU can take run here:
``accelerate launch`` of sft_qlora with ``ddp.yaml`` on 2 processes, SIGKILL of rank 1's process group after a
checkpoint, teardown, resume from that checkpoint, the result JSON, the background merge + generate-loader check of
the checkpoint, and the table printed last. To stay within the CI time budget the smoke run here leaves out the
single-process reference and the generation mode (both ran on GPUs; ``python benchmarks/multi_gpu.py --smoke --out
DIR`` runs every CPU-capable mode, ~5 min); their comparison helpers (losses, grad norms, note_ids vs the
single-GPU run, steady-state throughput, generation identity and rates) are checked on made-up rows below.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures_data import make_prepared_dataset
from tests.helpers import ROOT, subprocess_env

pytestmark = pytest.mark.integration


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_multi_gpu", ROOT / "benchmarks" / "multi_gpu.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_smoke_run_kills_resumes_and_checks_the_checkpoint(tmp_path: Path, tiny_model_dir: Path) -> None:
    work = tmp_path / "work"
    # The harness builds these itself when missing; the session's tiny model and a prepared dataset save two
    # interpreter start-ups here.
    shutil.copytree(tiny_model_dir, work / "smoke" / "model")
    make_prepared_dataset(work / "smoke" / "data", tiny_model_dir)
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable, "benchmarks/multi_gpu.py", "--smoke", "--out", str(out), "--work_dir", str(work),
            "--modes", "ddp", "--max-minutes", "14",
        ],
        cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    result_file = out / "multi_gpu_smoke_cpu.json"
    assert result_file.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(result_file.read_text())
    assert proc.returncode == 0, json.dumps(result.get("summary"), indent=1) + proc.stdout[-3000:]

    ddp = result["modes"]["ddp"]
    assert ddp["status"] == "ok" and ddp["passed"], ddp
    assert ddp["world_size"] == 2 and ddp["gradient_accumulation_steps"] == 1 and ddp["global_batch"] == 4
    killed, resumed = ddp["launches"]
    assert killed["kill"]["signal"] == "SIGKILL" and killed["kill"]["rank"] == 1
    assert killed["returncode"] != 0 and "survivors_killed" not in killed
    assert ddp["kill"]["steps_logged_before_kill"] >= 3
    assert "checkpoint-2" in ddp["kill"]["left_in_output_dir"]
    assert resumed["ok"] and ddp["resume"]["resumed_from_expected_checkpoint"] and ddp["resume"]["reached_max_steps"]
    assert ddp["losses_finite"] and ddp["final_step"] == 6 and sorted(map(int, ddp["losses"])) == list(range(1, 7))
    # Each step trained the global batch (2 ranks x 2), and no note twice: the resume continued the data order.
    ids = [n for step in sorted(ddp["note_ids"], key=int) for n in ddp["note_ids"][step]]
    assert all(len(v) == 4 for v in ddp["note_ids"].values()) and len(set(ids)) == len(ids)
    assert ddp["throughput"]["tokens_per_second_per_gpu"] > 0

    check = result["adapter_checks"]["ddp"]
    assert check["ok"] and check["checkpoint_valid"] and check["lora_B_all_zero"] == 0
    assert check["merge_probe"]["agree_on_changed"] >= 0.98 and check["generate_probe"]["new_tokens"] > 0
    assert not (work / "smoke" / "checks" / "ddp-merged").exists()  # the merged copy is removed after the check

    lines = proc.stdout.strip().splitlines()
    assert lines[-1].startswith("all passed: True"), lines[-12:]
    assert any(line.startswith("ddp ") and "PASS" in line for line in lines[-8:])


def test_comparisons_against_the_single_gpu_run(tmp_path: Path) -> None:
    bench = _bench_module()
    ref = {
        "losses": {"1": 12.0, "2": 11.0, "3": 10.0},
        "grad_norms": {"1": 1.0, "2": 0.5, "3": 0.25},
        "note_ids": {"1": ["a", "b"], "2": ["c", "d"], "3": ["e", "f"]},
    }
    close = bench.compare_to_reference({1: 12.0, 2: 11.001, 3: 10.0}, {1: 1.0, 2: 0.5, 3: 0.26}, ref, 1e-2, 5e-2)
    assert close["losses_match"] and close["grad_norms_match"] and close["steps_missing"] == []
    assert close["loss_max_rel_diff"] == pytest.approx(1e-3 / 11, rel=1e-6)
    off = bench.compare_to_reference({1: 12.0, 2: 11.5}, {1: 1.0, 2: 0.5}, ref, 1e-2, 5e-2)
    assert not off["losses_match"] and off["steps_missing"] == [3]
    assert not bench.compare_to_reference({1: 12.0, 2: 11.0, 3: 10.0}, {1: 2.0}, ref, 1e-2, 5e-2)["grad_norms_match"]

    run = tmp_path / "run"
    run.mkdir()
    rows = [
        {"step": 1, "note_ids": ["b", "a"]},
        {"step": 2, "note_ids": ["c", "d"]},
        {"step": 3, "note_ids": ["e", "x"]},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ids = bench.compare_note_ids(run, ref)
    assert ids == {"same_examples_per_step": False, "mismatched_steps": [3]}


def test_throughput_leaves_out_start_up_and_post_save_steps() -> None:
    bench = _bench_module()
    rows = [{"step": s, "tokens_per_second": 100.0 * s, "trained_tokens_per_second": 10.0 * s} for s in range(1, 8)]
    # save_steps 3: step 1 (start-up), 4 and 7 (their window holds a checkpoint write) are left out.
    t = bench.throughput([(rows, 1)], save_steps=3, world=2)
    assert t["steps_used"] == [2, 3, 5, 6]
    assert t["tokens_per_second"] == 400.0 and t["tokens_per_second_per_gpu"] == 200.0
    # A resumed launch starting at step 4 leaves its first step out too.
    assert bench.throughput([(rows[:3], 1), (rows[3:], 4)], save_steps=3, world=1)["steps_used"] == [2, 3, 5, 6]
    assert bench.generation_sizes(4) == [1, 2, 4] and bench.generation_sizes(2) == [1, 2]
    assert bench.generation_sizes(6) == [1, 2, 4, 6] and bench.generation_sizes(1) == [1]


def test_generation_throughput_is_over_the_slowest_rank_without_first_batches(tmp_path: Path) -> None:
    bench = _bench_module()

    def part(name: str, batches: list[tuple[int, float]]) -> Path:
        # one record per note; a batch of size b that took t seconds gives each of its notes t / b seconds
        lines = [
            json.dumps({"note_id": f"{name}-{i}-{j}", "new_tokens": 10, "seconds": t / b, "batch_size": b})
            for i, (b, t) in enumerate(batches)
            for j in range(b)
        ]
        path = tmp_path / f"{name}.jsonl"
        path.write_text("\n".join(lines) + "\n")
        return path

    fast = bench.rank_generation_stats(part("r0", [(2, 5.0), (2, 1.0)]))  # 5 s warm-up batch, then 1 s
    slow = bench.rank_generation_stats(part("r1", [(2, 1.0), (2, 2.0)]))
    assert fast["new_tokens"] == 40 and fast["steady_new_tokens"] == 20 and fast["steady_seconds"] == 1.0
    agg = bench.aggregate_generation([fast, slow])
    assert agg["new_tokens"] == 80
    assert agg["new_tokens_per_second"] == pytest.approx(80 / 6.0, abs=0.1)  # rank 0: 6 s in all
    assert agg["steady_new_tokens_per_second"] == pytest.approx(40 / 2.0, abs=0.1)  # rank 1's second batch: 2 s


def test_error_line_names_the_root_error_not_the_launcher(tmp_path: Path) -> None:
    bench = _bench_module()
    log = tmp_path / "ddp_1_killed.log"
    log.write_text(
        "loading...\n"
        "sft_qlora.py: error: sft_qlora: `lora_r` is 0; it must be >= 1.\n"
        "torch.distributed.elastic.multiprocessing.errors.ChildFailedError:\n"
        "subprocess.CalledProcessError: Command '[...]' returned non-zero exit status 1.\n"
    )
    failed = {"launches": [{"name": "ddp_killed", "ok": False, "log": str(log), "returncode": 1}]}
    assert bench.error_line(failed) == "sft_qlora.py: error: sft_qlora: `lora_r` is 0; it must be >= 1."
    killed = {"launches": [{"name": "ddp_killed", "ok": False, "log": str(log), "kill": {"rank": 1}}]}
    assert bench.error_line(killed) is None  # a planned kill is not an error


def test_generation_identity_against_the_one_process_run() -> None:
    bench = _bench_module()
    ref = [{"note_id": "a", "summary": "x"}, {"note_id": "b", "summary": "y"}]
    assert bench.compare_generations(ref, list(reversed(ref)))["identical_to_1"] is True
    changed = bench.compare_generations(ref, [{"note_id": "a", "summary": "x"}, {"note_id": "b", "summary": "z"}])
    assert changed["identical_to_1"] is False and changed["differing_note_ids"] == ["b"]
    lost = bench.compare_generations(ref, ref[:1])
    assert lost["identical_to_1"] is False and lost["missing_note_ids"] == ["b"]
