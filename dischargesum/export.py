"""export: a LoRA adapter merged into its base, written as a standalone model that needs no dischargesum.

The output directory holds what plain ``transformers`` (``AutoModelForCausalLM.from_pretrained(dir)``, no
``trust_remote_code``) and serving engines (vLLM, TGI, SGLang) read: ``config.json``, ``generation_config.json``,
safetensors weights (nothing pickled), the tokenizer with its chat template (``chat_template.jinja``), the base's
image-processor files when it is a vision-language model (MedGemma), and ``README.md`` — a model card with the
base, the adapter's sha256, the training data fingerprint and, when eval directories are given, their headline
metrics (the full ``metrics.json`` files are copied under ``eval/``). ``manifest.json`` records the export like
every other stage. The merge itself is :func:`dischargesum.modeling.merge_adapter` (bf16 base reloaded
unquantised; merging into a 4-bit base is never done).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from dischargesum.artifacts import EVAL_METRICS_FILE as METRICS_FILE
from dischargesum.artifacts import MODEL_CARD_FILE
from dischargesum.config import ConfigError, ExportConfig
from dischargesum.logging_utils import get_logger
from dischargesum.manifest import (
    MANIFEST_NAME,
    fingerprint_file,
    finish_run,
    read_manifest,
    require_artifact,
    start_run,
)

logger = get_logger(__name__)

EVAL_COPY_DIR = "eval"
# Files a serving engine needs besides config, weights and tokenizer: Gemma 3 VLMs (MedGemma) declare an image
# processor; vLLM refuses to start Gemma3ForConditionalGeneration without it.
BASE_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")

# (label, path in metrics.json's `overall`): the headline numbers of the model card, in this order.
HEADLINE_METRICS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("entity recall vs reference (micro)", ("entities", "vs_reference", "micro", "overall", "recall")),
    ("entity precision vs reference (micro)", ("entities", "vs_reference", "micro", "overall", "precision")),
    ("entity F1 vs reference (micro)", ("entities", "vs_reference", "micro", "overall", "f1")),
    ("hallucinated-entity rate (micro)", ("hallucination", "rate_micro")),
    ("numeric fidelity vs source (micro)", ("numbers", "vs_source", "fidelity_micro")),
    ("BERTScore F1 (mean)", ("bertscore", "f1", "mean")),
    ("ROUGE-1 F1 (mean)", ("rouge", "rouge1", "f1", "mean")),
    ("ROUGE-2 F1 (mean)", ("rouge", "rouge2", "f1", "mean")),
    ("ROUGE-L F1 (mean)", ("rouge", "rougeL", "f1", "mean")),
    (
        "length ratio vs reference (characters, ratio of totals)",
        ("compression", "vs_reference", "chars", "ratio_of_totals"),
    ),
)


def _dig(data: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def headline_metrics(metrics: dict[str, Any]) -> list[tuple[str, float]]:
    """The model card's numbers from one eval ``metrics.json`` (those it has). "reference" is named as the eval
    named it: the reference BHC for stage 1, the stage-1 summary for stage 2."""
    overall = metrics.get("overall", {})
    reference = _dig(metrics, ("roles", "reference", "label")) or "reference"
    out = []
    for label, path in HEADLINE_METRICS:
        value = _dig(overall, path)
        if isinstance(value, int | float):
            out.append((label.replace("reference", str(reference)), float(value)))
    return out


def _adapter_record(adapter: Path) -> dict[str, Any]:
    """Training data and summary as sft_qlora recorded them (final/: data_fingerprint.json and the manifest)."""
    from dischargesum.training.sft import DATA_FINGERPRINT_FILE

    record: dict[str, Any] = {}
    manifest = read_manifest(adapter) or {}
    path = adapter / DATA_FINGERPRINT_FILE
    if path.is_file():
        record = json.loads(path.read_text(encoding="utf-8"))
    record.setdefault("data_fingerprint", manifest.get("data_fingerprint"))
    record["training"] = manifest.get("training") or {}
    return record


def _read_evals(eval_dirs: list[str]) -> list[dict[str, Any]]:
    """Each eval directory's manifest and metrics, checked complete before anything is written.

    Raises:
        ArtifactError: a directory is not a completed eval output.
    """
    evals = []
    for d in eval_dirs:
        manifest = require_artifact(d, stage="eval", field="eval_dir", files=[METRICS_FILE])
        metrics = json.loads((Path(d) / METRICS_FILE).read_text(encoding="utf-8"))
        evals.append({"dir": Path(d), "manifest": manifest, "metrics": metrics})
    return evals


def _check_output_dir(out: Path) -> None:
    """Refuse a non-empty directory that is not an earlier export (it would be mixed with the model files).

    Raises:
        ConfigError: naming the directory and the fix.
    """
    if not out.exists() or not any(out.iterdir()):
        return
    manifest = read_manifest(out)
    if manifest is None or manifest.get("stage") != ExportConfig.STAGE:
        raise ConfigError(
            f"export: `output_dir` = {out} is not empty and holds no earlier export; choose a new directory."
        )
    # An earlier export: drop its weights (a new dtype may shard differently) and copied metrics.
    for p in [*out.glob("*.safetensors"), *out.glob("*.safetensors.index.json")]:
        p.unlink()
    shutil.rmtree(out / EVAL_COPY_DIR, ignore_errors=True)


def _base_file(base: str, name: str) -> Path | None:
    """``name`` from the base model: its local directory, or the Hugging Face cache (never downloaded here)."""
    local = Path(base).expanduser()
    if local.is_dir():
        p = local / name
        return p if p.is_file() else None
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(base, name)
    return Path(cached) if isinstance(cached, str) else None


def run_export(cfg: ExportConfig) -> Path:
    """Merge ``cfg.adapter`` into its base and write the standalone model into ``cfg.output_dir``.

    Raises:
        ArtifactError: the adapter or an eval directory is missing or incomplete. ConfigError: the base model cannot
            be found, or output_dir holds something else.
    """
    from dischargesum.inference.loading import resolve_model_source
    from dischargesum.modeling import merge_adapter

    out = Path(cfg.output_dir)
    _check_output_dir(out)
    source = resolve_model_source(cfg.base_model, cfg.adapter)
    adapter = Path(cfg.adapter)
    record = _adapter_record(adapter)
    evals = _read_evals(cfg.eval_dir)
    start_run(
        out,
        cfg,
        inputs={
            "adapter": str(adapter.resolve()),
            "adapter_sha256": source.adapter_sha256,
            "base_model": source.base,
            "data_fingerprint": record.get("data_fingerprint"),
            "eval_dirs": [str(e["dir"].resolve()) for e in evals],
        },
    )
    merge_adapter(adapter, out, dtype=cfg.dtype, base_model=source.base)
    for name in BASE_PROCESSOR_FILES:
        found = _base_file(source.base, name)
        if found is not None:
            shutil.copyfile(found, out / name)
    for e in evals:
        target = out / EVAL_COPY_DIR / e["dir"].name / METRICS_FILE
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(e["dir"] / METRICS_FILE, target)
    pickled = sorted(p.name for p in out.rglob("*") if p.suffix in PICKLE_SUFFIXES)
    weights = sorted(p.name for p in out.glob("*.safetensors"))
    if pickled or not weights:  # a bug, not a user error: the export contract is safetensors only
        raise RuntimeError(f"export wrote pickled files {pickled} or no safetensors weights ({weights}) in {out}")
    (out / MODEL_CARD_FILE).write_text(model_card(cfg, source.base, source.adapter_sha256, record, evals))
    outputs = {
        str(p.relative_to(out)): fingerprint_file(p, out)
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name != MANIFEST_NAME
    }
    finish_run(out, outputs, base_model=source.base, data_fingerprint=record.get("data_fingerprint"))
    logger.info("exported %s (%s, %s) -> %s", adapter, source.base, cfg.dtype, out)
    return out


def model_card(
    cfg: ExportConfig, base: str, adapter_sha256: str | None, record: dict[str, Any], evals: list[dict[str, Any]]
) -> str:
    """``README.md`` of the exported model: provenance, data fingerprint, metrics when given, use (no note text)."""
    card = record.get("data_card") or {}
    splits = card.get("splits", {})
    split_rows = ", ".join(f"{k} {v.get('rows')}" for k, v in splits.items() if isinstance(v, dict)) or "unknown"
    sample = card.get("sample", {}).get("fraction")
    training = record.get("training", {})
    source = card.get("source", {})
    lines = [
        "---",
        f"base_model: {base}",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags: [dischargesum, clinical-summarization, merged-lora]",
        "---",
        "",
        f"# {Path(cfg.output_dir).name}: brief hospital course from a discharge note",
        "",
        f"`{base}` with the LoRA adapter `{cfg.adapter}` (sha256 `{adapter_sha256}`) merged in, written in "
        f"{cfg.dtype} safetensors by `dischargesum` export. Loads with plain `transformers` — no extra package, no "
        "remote code.",
        "",
        "## Training data",
        "",
        f"- data fingerprint: `{record.get('data_fingerprint')}` (sha256 over the prepared train/validation/test "
        "files; the same value is in the adapter's `data_fingerprint.json` and every stage manifest)",
        f"- source: {source.get('schema_detected', 'unknown')} schema, {source.get('format', 'unknown')} file"
        + (f", sample fraction {sample}" if sample is not None and sample < 1 else ""),
        f"- rows per split: {split_rows}; split by patient",
        f"- token budget (prompt + summary): {record.get('max_seq_length', 'unknown')}; summaries never truncated",
        f"- training: {training.get('global_step', 'unknown')} optimizer steps, final loss "
        f"{training.get('final_train_loss', 'unknown')}, {training.get('world_size', '?')} x "
        f"{training.get('device', '?')}, 4-bit base during training: {training.get('load_in_4bit', 'unknown')}",
        "",
    ]
    if evals:
        lines += ["## Evaluation", ""]
        for e in evals:
            metrics, manifest = e["metrics"], e["manifest"]
            scored_on = _dig(manifest, ("inputs", "dataset_dir", "data_fingerprint"))
            note = ""
            if scored_on and record.get("data_fingerprint") and scored_on != record["data_fingerprint"]:
                note = f" **Scored on other data** (fingerprint `{scored_on[:16]}`), not this model's test split."
            lines += [
                f"### {e['dir'].name} (mode {metrics.get('mode')}, {_dig(metrics, ('overall', 'n'))} notes)",
                "",
                f"Full results: `{EVAL_COPY_DIR}/{e['dir'].name}/{METRICS_FILE}`.{note}",
                "",
                "| metric | value |",
                "|---|---|",
                *(f"| {label} | {value:.4f} |" for label, value in headline_metrics(metrics)),
                "",
            ]
    lines += [
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f'tok = AutoTokenizer.from_pretrained("{cfg.output_dir}")',
        f'model = AutoModelForCausalLM.from_pretrained("{cfg.output_dir}", dtype="auto")',
        "instruction = " + json.dumps(card.get("instruction", "<the data card's instruction>")),
        'messages = [{"role": "user", "content": f"{instruction}\\n\\n{note}"}]  # note: the discharge note text',
        "ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors='pt', return_dict=True)",
        "out = model.generate(**ids, max_new_tokens=768, do_sample=False)",
        "print(tok.decode(out[0, ids['input_ids'].shape[1]:], skip_special_tokens=True))",
        "```",
        "",
        f"Serving: `vllm serve {cfg.output_dir}` (the chat template is in `chat_template.jinja`). Prompts are the "
        "training instruction, a blank line and the note, as one user turn (dischargesum.data.formatting).",
        "",
        "## Limitations",
        "",
        "Outputs must be reviewed by a clinician. A model fine-tuned on MIMIC-derived notes is derived from "
        "credentialed data: check your PhysioNet data use agreement before sharing these weights. No note or "
        "summary text is stored in this directory.",
        "",
    ]
    return "\n".join(lines)
