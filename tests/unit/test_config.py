"""Config parsing: precedence, strictness, cross-field checks, help text, manifests."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from dischargesum.artifacts import ArtifactError
from dischargesum.config import (
    STAGE_CONFIGS,
    ConfigError,
    PrepareDataConfig,
    SFTConfig,
    config_from_dict,
    format_help,
    parse_config,
)
from dischargesum.manifest import finish_run, read_manifest, require_artifact, start_run

pytestmark = pytest.mark.unit


def _recipe(tmp_path: Path, data: dict, name: str = "r.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_precedence_default_then_yaml_then_cli(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, {"output_dir": "o", "dataset_dir": "d", "learning_rate": 1e-4, "save_steps": 50})
    cfg = parse_config(SFTConfig, ["--config", recipe, "--save_steps", "7"])
    assert cfg.learning_rate == 1e-4  # YAML beats default
    assert cfg.save_steps == 7  # CLI beats YAML
    assert cfg.gradient_accumulation_steps == 8  # default survives
    cfg2 = parse_config(SFTConfig, [f"--config={recipe}", "--save-steps=9"])
    assert cfg2.save_steps == 9


def test_misspelt_yaml_key_names_key_and_closest(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, {"output_dir": "o", "dataset_dir": "d", "save_step": 10})
    with pytest.raises(ConfigError, match=r"unknown key `save_step`.*Did you mean `save_steps`"):
        parse_config(SFTConfig, ["--config", recipe])


def test_misspelt_cli_flag_names_flag_and_closest() -> None:
    with pytest.raises(ConfigError, match=r"unknown option `--lerning_rate`.*`learning_rate`"):
        parse_config(SFTConfig, ["--output_dir", "o", "--dataset_dir", "d", "--lerning_rate", "1e-3"])


def test_wrong_type_names_field() -> None:
    with pytest.raises(ConfigError, match=r"`save_steps` = 'often' is not an integer"):
        parse_config(SFTConfig, ["--output_dir", "o", "--dataset_dir", "d", "--save_steps", "often"])
    with pytest.raises(ConfigError, match=r"`normalization` = 'clinicl' is not one of.*Did you mean `clinical`"):
        parse_config(PrepareDataConfig, ["--output_dir", "o", "--normalization", "clinicl"])


def test_yaml_wrong_type_is_error(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, {"output_dir": "o", "dataset_dir": "d", "save_steps": "ten"})
    with pytest.raises(ConfigError, match="save_steps"):
        parse_config(SFTConfig, ["--config", recipe])


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--output_dir", "o", "--validation_fraction", "0.6", "--test_fraction", "0.5"], "leaves no training"),
        (["--output_dir", "o", "--max_reject_fraction", "1.5"], "max_reject_fraction"),
        (["--output_dir", "o", "--schema", "custom"], "needs `column_mapping`"),
        (["--output_dir", "o", "--column_mapping", '{"text": "x"}'], "unknown key"),
        (["--source", "synthetic"], "output_dir"),
    ],
)
def test_cross_field_checks(argv: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_config(PrepareDataConfig, argv)


def test_bool_list_dict_and_optional_parsing() -> None:
    cfg = parse_config(
        PrepareDataConfig, ["--output_dir", "o", "--schema", "custom", "--column_mapping", "{input: text, target: y}"]
    )
    assert cfg.column_mapping == {"input": "text", "target": "y"}
    from dischargesum.config import GenerateConfig, TinyModelConfig

    g = parse_config(GenerateConfig, ["--output_dir", "o", "--dataset_dir", "d", "--model_name_or_path", "m"])
    assert g.adapter is None
    g2 = parse_config(GenerateConfig, ["--output_dir", "o", "--dataset_dir", "d", "--adapter", "runs/x/final"])
    assert g2.adapter == "runs/x/final"
    t = parse_config(TinyModelConfig, ["--output_dir", "o", "--with_encoder", "false"])
    assert t.with_encoder is False
    t2 = parse_config(TinyModelConfig, ["--output_dir", "o", "--with_encoder"])
    assert t2.with_encoder is True


def test_flag_given_twice_and_positional_are_errors() -> None:
    with pytest.raises(ConfigError, match="given twice"):
        parse_config(SFTConfig, ["--output_dir", "o", "--output_dir", "p", "--dataset_dir", "d"])
    with pytest.raises(ConfigError, match="unexpected argument"):
        parse_config(SFTConfig, ["stray"])


def test_help_lists_every_field_and_every_field_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    for cls in STAGE_CONFIGS.values():
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text"
        text = format_help(cls)
        for f in dataclasses.fields(cls):
            assert f"--{f.name} " in text
    with pytest.raises(SystemExit) as exc:
        parse_config(SFTConfig, ["--help"])
    assert exc.value.code == 0
    assert "--save_steps" in capsys.readouterr().out


def test_missing_recipe_and_non_mapping_recipe(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        parse_config(SFTConfig, ["--config", str(tmp_path / "nope.yaml")])
    # `--config recipes/demo` (the folder) exists: say it is a folder and name the stage's file in it.
    (tmp_path / "sft_qlora.yaml").write_text("dataset_dir: d\n")
    with pytest.raises(ConfigError, match=r"is a directory, not a recipe file; use `--config .*sft_qlora\.yaml`"):
        parse_config(SFTConfig, ["--config", str(tmp_path)])
    bad = tmp_path / "list.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        parse_config(SFTConfig, ["--config", str(bad)])


def test_config_round_trips_through_yaml(tmp_path: Path) -> None:
    cfg = parse_config(PrepareDataConfig, ["--output_dir", "o", "--column_mapping", "{input: a}"])
    again = config_from_dict(PrepareDataConfig, yaml.safe_load(cfg.to_yaml()))
    assert again == cfg


def test_run_manifest_lifecycle(tmp_path: Path) -> None:
    cfg = parse_config(PrepareDataConfig, ["--output_dir", str(tmp_path / "out")])
    start_run(cfg.output_dir, cfg, inputs={"source": "synthetic"})
    out = Path(cfg.output_dir)
    assert yaml.safe_load((out / "run_config.yaml").read_text())["output_dir"] == cfg.output_dir
    manifest = read_manifest(out)
    assert manifest is not None
    assert manifest["status"] == "running"
    assert manifest["library_versions"]["torch"]
    assert {"git_revision", "host", "started_at", "config_hash"} <= manifest.keys()
    with pytest.raises(ArtifactError, match="status `running`"):
        require_artifact(out, stage="prepare_data", field="dataset_dir")
    (out / "train.parquet").write_bytes(b"x" * 10)
    from dischargesum.manifest import fingerprint_file

    finish_run(out, outputs={"train": fingerprint_file(out / "train.parquet", out)})
    assert require_artifact(out, stage="prepare_data", field="dataset_dir", files=["train.parquet"])
    with pytest.raises(ArtifactError, match="produced by `prepare_data`"):
        require_artifact(out, stage="sft_qlora", field="adapter")
    (out / "train.parquet").write_bytes(b"x" * 11)
    with pytest.raises(ArtifactError, match="changed or vanished"):
        require_artifact(out, stage="prepare_data", field="dataset_dir")
    with pytest.raises(ArtifactError, match="no such directory"):
        require_artifact(tmp_path / "missing", stage="prepare_data", field="dataset_dir")
    json.loads((out / "manifest.json").read_text())


def test_manifest_masks_token_arguments(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr("sys.argv", ["x.py", "--hf_token", "secret123", "--api-token=abc"])
    cfg = parse_config(PrepareDataConfig, ["--output_dir", str(tmp_path)])
    manifest = start_run(tmp_path, cfg)
    assert "secret123" not in json.dumps(manifest)
    assert "abc" not in json.dumps(manifest["argv"])


def _float_fields() -> list[tuple[type, str]]:
    import typing

    out = []
    for cls in dict.fromkeys(STAGE_CONFIGS.values()):
        hints = typing.get_type_hints(cls)
        out += [(cls, f.name) for f in dataclasses.fields(cls) if hints[f.name] in (float, float | None)]
    return out


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "Infinity"])
def test_non_finite_floats_are_refused_in_every_config(tmp_path: Path, value: str) -> None:
    fields = _float_fields()
    assert len(fields) >= 10  # learning_rate, max_grad_norm, fractions, sampling, eval thresholds, ...
    for cls, name in fields:
        with pytest.raises(ConfigError, match=rf"`{name}` = '{value}' is not a finite number"):
            parse_config(cls, ["--output_dir", str(tmp_path), f"--{name}", value])
    recipe = _recipe(tmp_path, {"learning_rate": float("inf")})
    with pytest.raises(ConfigError, match="`learning_rate` = inf is not a finite number"):
        parse_config(SFTConfig, ["--config", recipe, "--output_dir", str(tmp_path)])


def test_a_run_into_a_finished_directory_says_it_replaces_it(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from dischargesum.config import EvalConfig, GenerateConfig
    from dischargesum.manifest import warn_if_replacing

    out = tmp_path / "eval"
    warn_if_replacing(out, "eval")  # nothing there yet: silent
    start_run(out, EvalConfig(predictions="p.jsonl", dataset_dir="d", output_dir=str(out)))
    finish_run(out)
    logging.getLogger("dischargesum").addHandler(caplog.handler)
    try:
        warn_if_replacing(out, "eval")
    finally:
        logging.getLogger("dischargesum").removeHandler(caplog.handler)
    assert "already holds `eval` outputs (complete, finished 20" in caplog.text and "replaced" in caplog.text
    other = tmp_path / "generate"
    start_run(other, GenerateConfig(dataset_dir="d", model_name_or_path="m", output_dir=str(other)))
    with pytest.raises(ArtifactError, match=r"holds `generate` outputs, not `eval` outputs.*another `output_dir`"):
        warn_if_replacing(other, "eval")


def test_completed_run_status_and_the_stage_status_script(tmp_path: Path) -> None:
    """What scripts/run_medgemma.sh skips: a completed run of this stage with the same config hash, outputs intact."""
    from dischargesum.config import GenerateConfig
    from dischargesum.manifest import completed_run_status, fingerprint_file
    from tests.helpers import run_script

    out = tmp_path / "gen"
    cfg = GenerateConfig(output_dir=str(out), dataset_dir="d", adapter="a")
    assert completed_run_status(cfg)[0] is False  # nothing there yet
    start_run(out, cfg)
    complete, why = completed_run_status(cfg)
    assert not complete and "running" in why
    (out / "stage1.jsonl").write_text("{}\n")
    finish_run(out, {"stage1.jsonl": fingerprint_file(out / "stage1.jsonl", out)})
    assert completed_run_status(cfg) == (True, "complete")
    # `overwrite` says what to do with old outputs, not what they are: same hash
    assert completed_run_status(dataclasses.replace(cfg, overwrite=True))[0]
    assert not completed_run_status(dataclasses.replace(cfg, max_new_tokens=7))[0]
    (out / "stage1.jsonl").write_text("{}\n{}\n")  # output changed since
    assert not completed_run_status(cfg)[0]
    proc = run_script(
        "stage_status.py", ["generate", "--output_dir", str(out), "--dataset_dir", "d", "--adapter", "a"]
    )
    assert proc.returncode == 1 and "changed or vanished" in proc.stdout
    proc = run_script("stage_status.py", ["nope"])
    assert proc.returncode == 2 and "unknown stage" in proc.stderr


def test_settings_from_config_copies_every_field_and_refuses_a_missing_one() -> None:
    import dataclasses

    from dischargesum.config import CompressConfig, GenerateConfig, settings_from_config
    from dischargesum.inference.compress import CompressionSettings
    from dischargesum.inference.engine import EngineSettings

    cfg = GenerateConfig(
        output_dir="o", dataset_dir="d", model_name_or_path="m", do_sample=True, top_k=7, prefill_chunk_rows=5
    )
    engine = EngineSettings.from_config(cfg)
    assert (engine.top_k, engine.prefill_chunk_rows) == (7, 5)
    assert all(getattr(engine, f.name) == getattr(cfg, f.name) for f in dataclasses.fields(EngineSettings))
    compress = CompressionSettings.from_config(
        CompressConfig(output_dir="o", input="x.jsonl", model_name_or_path="m", max_attempts=5, seed=3)
    )
    assert (compress.max_attempts, compress.seed) == (5, 3)

    @dataclasses.dataclass
    class Unknown:
        no_such_field: int = 0

    with pytest.raises(AttributeError, match="no_such_field"):
        settings_from_config(Unknown, cfg)
