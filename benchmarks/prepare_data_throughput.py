"""prepare_data at full scale: 270,000 synthetic Kaggle-profile rows, clinical mode with the token budget.

    python benchmarks/prepare_data_throughput.py --rows 270000 --tokenizer outputs/demo/tiny-gemma3 \
        --out benchmarks/results/prepare_data_270k_cpu2.json

Steps (the timed run is a subprocess, exactly as a user runs the stage, so its peak RSS is measured alone):

1. write the synthetic CSV once (``--workdir``; reused when it exists with the same row count),
2. ``python scripts/prepare_data.py --source <csv> ...`` — wall time, peak RSS of the process tree (main process +
   worker processes, sampled every 0.2 s with psutil), rows/s and the CPU seconds of the tree (on a shared machine
   the load averages before/after and the CPU time tell how much of the wall time was waiting for a core),
3. the seed-style NLTK cleaning (``normalization: seed``, the seed prototype's pipeline) timed on a sample of
   ``--seed_sample`` rows in this process and extrapolated linearly to ``--rows`` (it is per-row work; the
   corpus-level rare-word filter adds a counting pass that is cheap by comparison).

``--shortening_rank_by_target`` / ``--entity_support_stats`` are passed to the stage (ranking train/validation
sections by the summary's entities and the card's support fractions cost entity extraction of the over-budget
notes); run once with ``false`` / ``off`` for the cost of the plain budget. ``--skip_seed_sample`` skips step 3.

Tokenizer: the real Gemma-3 tokenizer (262k vocabulary) cannot be downloaded here, so the budget is counted with
the tiny Gemma-3 tokenizer (byte-level BPE, 1,024 tokens, Gemma chat template) that ``build_tiny_model`` writes.
It yields ~2.5 characters per token, so it produces *more* tokens (and more notes to shorten at the same
max_seq_length) than Gemma's ~4; its per-character speed differs from the real tokenizer's, which the result
file states. Rerun with ``--tokenizer google/medgemma-4b-it`` where that model is cached.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _peak_tree_rss(pid: int, stop: threading.Event, out: dict[str, float]) -> None:
    import psutil

    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    peak_total = peak_main = 0
    while not stop.is_set():
        try:
            procs = [root, *root.children(recursive=True)]
            rss = [p.memory_info().rss for p in procs]
        except psutil.Error:
            time.sleep(0.2)
            continue
        peak_total = max(peak_total, sum(rss))
        peak_main = max(peak_main, rss[0])
        time.sleep(0.2)
    out["peak_rss_tree_bytes"] = peak_total
    out["peak_rss_main_bytes"] = peak_main


def _versions() -> dict[str, str | None]:
    from dischargesum.manifest import library_versions

    return library_versions(("tokenizers", "transformers", "trl", "pyarrow", "numpy", "nltk", "pandas"))


def _time_seed_sample(csv_path: Path, rows: int) -> dict[str, float]:
    import pyarrow.csv as pacsv

    from dischargesum.data.normalize import count_words, filter_rare_words, normalize_seed, seed_backends

    table = pacsv.read_csv(
        csv_path,
        read_options=pacsv.ReadOptions(block_size=32 << 20),
        parse_options=pacsv.ParseOptions(newlines_in_values=True),
        convert_options=pacsv.ConvertOptions(include_columns=["input", "target"]),
    ).slice(0, rows)
    notes = table.column("input").to_pylist()
    targets = table.column("target").to_pylist()
    began = time.perf_counter()
    cleaned = [normalize_seed(n) for n in notes] + [normalize_seed(t) for t in targets]
    counts = count_words(cleaned)
    filtered = [filter_rare_words(text, counts, 2) for text in cleaned]
    seconds = time.perf_counter() - began
    chars_in = sum(map(len, notes)) + sum(map(len, targets))
    chars_out = sum(map(len, filtered))
    return {
        "sample_rows": len(notes),
        "seconds": round(seconds, 2),
        "rows_per_second_one_process": round(len(notes) / seconds, 1),
        "characters_kept_fraction": round(chars_out / chars_in, 3),
        "backends": seed_backends(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=270_000)
    parser.add_argument("--profile", default="kaggle")
    parser.add_argument("--tokenizer", default=str(ROOT / "outputs/demo/tiny-gemma3"))
    parser.add_argument("--max_seq_length", type=int, default=2048)
    parser.add_argument("--num_workers", type=int, default=2)
    parser.add_argument("--workdir", default="/tmp/dischargesum-bench")
    parser.add_argument("--seed_sample", type=int, default=2000)
    parser.add_argument("--out", default=None, help="result JSON (default: print only)")
    parser.add_argument("--extrapolate_to", type=int, default=270_000, help="rows to extrapolate timings to")
    parser.add_argument("--note", default=None, help="free text stored in the result (e.g. what else ran meanwhile)")
    parser.add_argument(
        "--shortening_rank_by_target",
        default="true",
        choices=("true", "false"),
        help="passed to prepare_data (ranking train/validation sections by the summary's entities costs extraction)",
    )
    parser.add_argument(
        "--entity_support_stats",
        default="shortened",
        choices=("shortened", "all", "off"),
        help="passed to prepare_data",
    )
    parser.add_argument("--skip_seed_sample", action="store_true", help="do not time the seed-style NLTK cleaning")
    args = parser.parse_args(argv)

    from dischargesum.data.synthetic import write_synthetic

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    csv_path = work / f"synthetic_{args.profile}_{args.rows}.csv"
    generation_seconds = None
    if not csv_path.exists():
        result = write_synthetic(csv_path, args.rows, profile=args.profile, schema="kaggle", seed=0, workers=2)
        generation_seconds = round(result.seconds, 1)
    out_dir = work / f"prepared_{args.profile}_{args.rows}"
    command = [
        sys.executable,
        str(ROOT / "scripts/prepare_data.py"),
        "--output_dir",
        str(out_dir),
        "--source",
        str(csv_path),
        "--tokenizer_name_or_path",
        args.tokenizer,
        "--max_seq_length",
        str(args.max_seq_length),
        "--num_workers",
        str(args.num_workers),
        "--max_reject_fraction",
        "0.01",
        "--shortening_rank_by_target",
        args.shortening_rank_by_target,
        "--entity_support_stats",
        args.entity_support_stats,
    ]
    # this checkout first; keep the caller's entries after it (e.g. a sitecustomize that hides an editable install)
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=pythonpath, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("TOKENIZERS_PARALLELISM", None)  # let the fast tokenizer use every core, as a user's run does
    load_before = os.getloadavg()
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    began = time.perf_counter()
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    stop, memory = threading.Event(), {}
    sampler = threading.Thread(target=_peak_tree_rss, args=(proc.pid, stop, memory), daemon=True)
    sampler.start()
    _, stderr = proc.communicate()
    wall = time.perf_counter() - began
    stop.set()
    sampler.join()
    load_after = os.getloadavg()
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the stage and its workers (all waited for)
    cpu_seconds = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    if proc.returncode != 0:
        sys.stderr.write(stderr[-5000:])
        return proc.returncode
    card = json.loads((out_dir / "data_card.json").read_text())
    seed: dict[str, Any] | None = None
    if not args.skip_seed_sample:
        seed = _time_seed_sample(csv_path, args.seed_sample)
        target = args.extrapolate_to
        seed[f"extrapolated_seconds_{target}_rows_one_process"] = round(target / seed["rows_per_second_one_process"])
        seed[f"extrapolated_seconds_{target}_rows_two_workers"] = round(
            target / seed["rows_per_second_one_process"] / 2
        )
    result = {
        "benchmark": "prepare_data_throughput",
        "date": _dt.date.today().isoformat(),
        "device": f"CPU {os.cpu_count()} cores ({platform.processor() or platform.machine()})",
        "load_average_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
        "python": platform.python_version(),
        "versions": _versions(),
        "command": " ".join(command),
        "input": {
            "rows": args.rows,
            "profile": args.profile,
            "csv_bytes": csv_path.stat().st_size,
            "generation_seconds": generation_seconds,
        },
        "tokenizer": {
            "path": args.tokenizer,
            "note": "tiny Gemma-3 tokenizer (byte-level BPE, 1,024 tokens, Gemma chat template); the real Gemma-3 "
            "tokenizer (262k vocabulary) is not available offline, so token counts (~2.5 chars/token here vs "
            "~4 for Gemma) and tokenizer speed are not Gemma's",
        },
        "clinical": {
            "wall_seconds": round(wall, 1),
            "rows_per_second": round(args.rows / wall, 1),
            "cpu_seconds_tree": round(cpu_seconds, 1),
            "cpu_milliseconds_per_row": round(1000 * cpu_seconds / args.rows, 2),
            f"extrapolated_seconds_{args.extrapolate_to}_rows": round(args.extrapolate_to / (args.rows / wall)),
            "peak_rss_tree_gib": round(memory.get("peak_rss_tree_bytes", 0) / 2**30, 3),
            "peak_rss_main_gib": round(memory.get("peak_rss_main_bytes", 0) / 2**30, 3),
            "num_workers": args.num_workers,
            "max_seq_length": args.max_seq_length,
            "rows_kept": card["accounting"]["rows_kept"],
            "rows_rejected": card["accounting"]["rows_rejected"],
            "rows_shortened": card["length_budget"]["rows_shortened"],
            "shortening_events": card["length_budget"]["events"],
            "shortening_rank_by_target": args.shortening_rank_by_target,
            "entity_support_stats": args.entity_support_stats,
            "target_entity_support": {
                split: card["splits"][split].get("target_entity_support") for split in ("train", "validation", "test")
            },
            "total_tokens_train": card["splits"]["train"]["lengths"]["total_tokens"],
        },
        "seed_style_nltk_sample": seed,
        "goal": {"wall_seconds_max": 600, "peak_rss_gib_max": 4},
    }
    if args.note:
        result["note"] = args.note
    text = json.dumps(result, indent=2) + "\n"
    sys.stdout.write(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
