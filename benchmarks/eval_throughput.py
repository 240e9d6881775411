"""Time the eval stage on N summary pairs: BERTScore + entities + numbers + ROUGE + compression + the report.

    python benchmarks/eval_throughput.py --pairs 2000 --encoder tiny                 # this CPU, toy encoder
    python benchmarks/eval_throughput.py --pairs 2000 --encoder bert-base-random     # Bio_ClinicalBERT's size
    python benchmarks/eval_throughput.py --pairs 2000 --encoder bert-base-random --device cuda --out $OUT/eval.json

What is timed is exactly what ``scripts/eval.py`` runs — ``load_eval_inputs`` + ``evaluate`` + ``write_report`` —
in stage-1 mode (summary vs reference BHC and vs source note), cold: encoder loading, worker start-up and the
report (plots, TensorBoard) are inside the total. Not timed: generating the synthetic pairs and building the
encoder directory.

Data: ``--pairs`` synthetic Kaggle-profile rows (note ≈ 2,600 characters, reference BHC ≈ 1,200); the
"prediction" is the reference with its last sentence dropped and every fourth row's digits changed (lost entities,
unsupported numbers), so every metric does real work.

Encoders (no weights can be downloaded here):

- ``tiny``: the 2-layer, hidden-32 BERT of ``dischargesum.tiny_models`` (window 126 tokens) — plumbing only.
- ``bert-base-random``: Bio_ClinicalBERT's architecture (BERT-base: 12 layers, hidden 768, 12 heads, intermediate
  3072, 512 positions, vocabulary 28,996) with random weights, scored at layer 9 like the MedGemma recipe: the same
  FLOPs per token. Its WordPiece vocabulary is trained here on synthetic text, so it may cut real MIMIC text into
  more pieces than it cuts synthetic text; the result file records characters per token so the time can be scaled.
- any local directory (``--encoder /path/to/Bio_ClinicalBERT --num_layers 9``).

Dependencies: the entity extractor needs spaCy (scispaCy optional); BERTScore needs torch, transformers and
bert_score; ROUGE needs rouge_score. A missing one is reported by name before anything runs (exit 2);
``--components bertscore,rouge`` runs without spaCy.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

COMPONENT_DEPENDENCIES = {
    "bertscore": ("torch", "transformers", "bert_score"),
    "rouge": ("rouge_score",),
    "entities": ("spacy",),
    "plots": ("matplotlib",),
    "tensorboard": ("tensorboard",),
}
GOAL_SECONDS = 60.0


def missing_dependencies(components: list[str]) -> dict[str, list[str]]:
    missing = {}
    # torch / transformers are needed whatever the components (the script builds the encoder).
    for component in dict.fromkeys(["bertscore", *components]):
        absent = [m for m in COMPONENT_DEPENDENCIES.get(component, ()) if importlib.util.find_spec(m) is None]
        if absent:
            missing[component] = absent
    return missing


def build_bert_base_random(out: Path, corpus: list[str], seed: int = 0) -> Path:
    """BERT-base with random weights and a WordPiece tokenizer trained on ``corpus`` (Bio_ClinicalBERT's shape)."""
    from dischargesum.tiny_models import build_random_bert

    return build_random_bert(
        out,
        seed=seed,
        corpus=corpus,
        tokenizer_vocab_size=28996,
        lowercase=False,  # Bio_ClinicalBERT is cased
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        max_length=512,
        model_vocab_size=28996,
    )


def perturb(summary: str, index: int) -> str:
    """Drop the last sentence; change the digits of every fourth row."""
    sentences = summary.rstrip().rsplit(". ", 1)
    text = sentences[0] + ("." if len(sentences) > 1 else "")
    if index % 4 == 3:
        text = text.translate(str.maketrans("0123456789", "1234567890"))
    return text


def _cpu_seconds() -> float:
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def device_description(device: str) -> str:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU: {model or platform.processor() or 'unknown'} ({os.cpu_count()} logical CPUs)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--encoder", default="tiny", help="tiny | bert-base-random | a local encoder directory")
    parser.add_argument("--num_layers", type=int, default=None, help="default: 2 (tiny), 9 (bert-base-random)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--batch_size", type=int, default=64, help="bertscore_batch_size (encoder windows per pass)")
    parser.add_argument("--num_workers", default="none", help="entity/ROUGE processes: none (all CPUs) or a count")
    parser.add_argument("--components", default="bertscore,rouge,entities", help="subset of bertscore,rouge,entities")
    parser.add_argument("--profile", default="kaggle", choices=["kaggle", "physionet", "tiny"])
    parser.add_argument("--no_plots", action="store_true", help="skip the PNG plots (no matplotlib needed)")
    parser.add_argument("--no_tensorboard", action="store_true", help="skip TensorBoard (no tensorboard needed)")
    parser.add_argument("--workdir", default=None, help="where data, encoder and outputs go (default: a temp dir)")
    parser.add_argument("--out", default=None, help="result JSON (default: benchmarks/results/eval_throughput_*.json)")
    args = parser.parse_args(argv)

    components = [c.strip() for c in args.components.split(",") if c.strip()]
    unknown = sorted(set(components) - {"bertscore", "rouge", "entities"})
    if unknown or not components:
        print(f"error: --components {args.components!r}: use a subset of bertscore,rouge,entities", file=sys.stderr)
        return 2
    report_parts = [p for p, off in (("plots", args.no_plots), ("tensorboard", args.no_tensorboard)) if not off]
    missing = missing_dependencies(components + report_parts)
    if missing:
        for component, modules in missing.items():
            print(f"error: {component} needs {', '.join(modules)}, which is not importable here", file=sys.stderr)
        print(
            "install (or carry) those wheels, or drop the component, e.g. --components bertscore,rouge "
            "(the entity extractor needs spaCy; scispaCy is optional), --no_plots, --no_tensorboard",
            file=sys.stderr,
        )
        return 2

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    from dischargesum.config import EvalConfig
    from dischargesum.data.synthetic import generate_rows
    from dischargesum.evaluation.evaluate import evaluate
    from dischargesum.evaluation.inputs import load_eval_inputs
    from dischargesum.evaluation.report import write_report
    from dischargesum.evaluation.text_scoring import available_cpus
    from dischargesum.logging_utils import setup_logging
    from dischargesum.manifest import git_revision, library_versions

    setup_logging("info")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="eval_bench_"))
    work.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    rows = list(generate_rows(args.pairs, profile=args.profile, schema="kaggle", seed=0, with_entities=False))
    refs, preds = work / "references.jsonl", work / "stage1.jsonl"
    with open(refs, "w") as fh_ref, open(preds, "w") as fh_pred:
        for i, row in enumerate(rows):
            fh_ref.write(
                json.dumps({"note_id": row["note_id"], "summary": row["target"], "note": row["input"]}) + "\n"
            )
            fh_pred.write(json.dumps({"note_id": row["note_id"], "summary": perturb(row["target"], i)}) + "\n")
    data_seconds = time.perf_counter() - started

    if args.encoder == "tiny":
        from dischargesum.tiny_models import build_tiny_bert

        encoder = build_tiny_bert(work / "tiny-bert", seed=0)
        num_layers = args.num_layers or 2
    elif args.encoder == "bert-base-random":
        corpus_rows = generate_rows(400, profile="kaggle", schema="kaggle", seed=1, with_entities=False)
        corpus = [t for r in corpus_rows for t in (str(r["input"]), str(r["target"]))]
        encoder = build_bert_base_random(work / "bert-base-random", corpus)
        num_layers = args.num_layers or 9
    else:
        encoder = Path(args.encoder)
        if args.num_layers is None:
            print("error: --num_layers is required with an encoder directory", file=sys.stderr)
            return 2
        num_layers = args.num_layers

    metrics = ["numbers", "compression", *components]
    num_workers = None if args.num_workers.lower() == "none" else int(args.num_workers)
    cfg = EvalConfig(
        output_dir=str(work / "eval"),
        predictions=str(preds),
        references=str(refs),
        mode="stage1",
        metrics=metrics,
        bertscore_model=str(encoder),
        bertscore_num_layers=num_layers,
        bertscore_batch_size=args.batch_size,
        bertscore_dtype=args.dtype,
        device=args.device,
        num_workers=num_workers,
        length_buckets=[1500, 3000, 6000, 12000],
        plots=not args.no_plots,
        tensorboard=not args.no_tensorboard,
    )
    load_before = os.getloadavg()
    cpu_before = _cpu_seconds()
    t0 = time.perf_counter()
    inputs = load_eval_inputs(cfg)
    t1 = time.perf_counter()
    result = evaluate(inputs, cfg)
    t2 = time.perf_counter()
    write_report(result, cfg)
    t3 = time.perf_counter()
    total = t3 - t0
    load_after = os.getloadavg()
    cpu_used = _cpu_seconds() - cpu_before

    m = result.metrics
    device = m.get("bertscore_settings", {}).get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    stats = {}
    for role in ("prediction", "reference", "source"):
        chars = [r[f"{role}_chars"] for r in result.rows if r.get(f"{role}_chars") is not None]
        tokens = [r[f"{role}_tokens"] for r in result.rows if r.get(f"{role}_tokens") is not None]
        stats[role] = {
            "mean_chars": sum(chars) / len(chars),
            "mean_tokens": sum(tokens) / len(tokens) if tokens else None,
            "chars_per_token": sum(chars) / sum(tokens) if tokens and sum(tokens) else None,
        }
    on_gpu = device.startswith("cuda")
    record = {
        "benchmark": "eval_throughput",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": "python benchmarks/eval_throughput.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "git_revision": git_revision(),
        "device": device_description(device),
        "torch_device": device,
        "cpus_available": available_cpus(),
        # Other processes on the machine slow a CPU run down; the 1-minute load average before and after says how
        # busy it was (on an idle machine it stays below the CPU count).
        "load_average_1min": {"before": round(load_before[0], 2), "after": round(load_after[0], 2)},
        "versions": library_versions(
            ("torch", "transformers", "bert-score", "rouge-score", "spacy", "scispacy", "tokenizers", "numpy")
        ),
        "settings": {
            "pairs": args.pairs,
            "profile": args.profile,
            "encoder": args.encoder,
            "num_layers": num_layers,
            "dtype": args.dtype,
            "bertscore_batch_size": args.batch_size,
            "num_workers": num_workers,
            "components": components,
            "plots": not args.no_plots,
            "tensorboard": not args.no_tensorboard,
            "window_tokens": m.get("bertscore_settings", {}).get("window_tokens"),
            "long_text": cfg.bertscore_long_text,
        },
        "data": stats,
        "bertscore_samples_over_window": m.get("bertscore_settings", {}).get("samples_over_window"),
        "seconds": {
            "total": round(total, 2),
            "load_inputs": round(t1 - t0, 2),
            "evaluate": round(t2 - t1, 2),
            "write_report": round(t3 - t2, 2),
            **{f"evaluate.{k}": v for k, v in m["timing_s"].items()},
            "untimed_data_generation": round(data_seconds, 2),
        },
        # user + system CPU time of this process and its (finished) worker processes over the timed part: less
        # sensitive than wall time to other load on a shared machine.
        "cpu_seconds": round(cpu_used, 2),
        "pairs_per_second": round(args.pairs / total, 2),
        "goal": f"<= {GOAL_SECONDS:g} s for 2,000 pairs on one H100",
        "goal_met": (total <= GOAL_SECONDS and args.pairs >= 2000) if on_gpu else None,
        "headline": {
            "bertscore_f1_mean": (m["overall"].get("bertscore") or {}).get("f1", {}).get("mean"),
            "entity_recall_vs_reference_micro": (
                ((m["overall"].get("entities") or {}).get("vs_reference") or {}).get("micro", {}).get("overall", {})
            ).get("recall"),
        },
        "notes": (
            "Synthetic Kaggle-profile pairs; prediction = reference minus its last sentence (digits changed in every "
            "fourth row). Timed: load_eval_inputs + evaluate + write_report (what scripts/eval.py runs), cold. "
            "bert-base-random has Bio_ClinicalBERT's architecture with random weights (same FLOPs per token); its "
            "tokenizer is trained on synthetic text, see data.*.chars_per_token."
        ),
    }
    tag = re.sub(r"[^A-Za-z0-9]+", "-", f"{'gpu' if on_gpu else 'cpu'}{available_cpus()}-{Path(args.encoder).name}")
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"eval_throughput_{tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    summary = {"seconds": record["seconds"], "cpu_seconds": record["cpu_seconds"], "out": str(out)}
    print(json.dumps({**summary, "pairs_per_second": record["pairs_per_second"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
