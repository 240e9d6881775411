"""Shipped recipes and accelerate configs load; README paths exist; every script's --help works."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dischargesum.config import STAGE_CONFIGS, parse_config

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))
ACCELERATE_CONFIGS = sorted((ROOT / "accelerate_configs").glob("*.yaml"))
SCRIPTS = sorted((ROOT / "scripts").glob("*.py"))


def test_there_are_recipes_and_scripts() -> None:
    assert RECIPES, "no recipes found"
    assert SCRIPTS, "no scripts found"


def recipe_stage(stem: str) -> str | None:
    """The stage a recipe file belongs to: its name is the stage's (``sft_qlora.yaml``) or starts with the stage's
    name and an underscore (``sft_qlora_8gb.yaml``: a variant of the same stage); the longest stage name wins."""
    matches = [s for s in STAGE_CONFIGS if stem == s or stem.startswith(f"{s}_")]
    return max(matches, key=len) if matches else None


def test_recipe_stage_mapping() -> None:
    assert recipe_stage("sft_qlora") == "sft_qlora"
    assert recipe_stage("sft_qlora_8gb") == "sft_qlora"
    assert recipe_stage("sft_qloraX") is None and recipe_stage("notastage") is None


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_recipe_loads_with_its_stage_config(recipe: Path) -> None:
    stage = recipe_stage(recipe.stem)
    assert stage is not None, f"{recipe}: file name must start with a stage name ({sorted(STAGE_CONFIGS)})"
    cfg = parse_config(STAGE_CONFIGS[stage], ["--config", str(recipe)])
    assert cfg.output_dir


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_accelerate_config_loads(path: Path) -> None:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict)
    assert "distributed_type" in data
    assert isinstance(data.get("num_processes", 1), int)
    assert data.get("mixed_precision", "no") != "fp16", "Gemma 3 overflows in fp16"


def _readme_paths() -> list[str]:
    text = (ROOT / "README.md").read_text()
    pattern = r"(?<![\w./-])((?:scripts|recipes|accelerate_configs|benchmarks|dischargesum|tests|\.ci)/[\w./-]*[\w])"
    return sorted(set(re.findall(pattern, text)))


def test_readme_names_only_existing_paths() -> None:
    paths = _readme_paths()
    assert paths, "README names no project paths"
    missing = [p for p in paths if not (ROOT / p).exists() and "<" not in p]
    assert not missing, f"README names paths that do not exist: {missing}"


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "bash scripts/test.sh" in readme
    assert "scripts/test.sh" in (ROOT / ".ci" / "run").read_text()


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_help_parses(script: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr
    assert "--output_dir" in proc.stdout
    assert script.read_text().lstrip().startswith('"""'), "scripts start with a docstring giving the launch command"


def test_misspelt_recipe_key_fails_through_a_script(tmp_path: Path) -> None:
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("output_dir: x\nwith_encodr: false\n")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "build_tiny_model.py"), "--config", str(recipe)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "with_encodr" in proc.stderr and "with_encoder" in proc.stderr


def test_tier_check_refuses_untiered_and_misplaced_files() -> None:
    from tests.helpers import tier_problems

    tests = [
        (Path("tests/unit/test_a.py"), {"unit"}),
        (Path("tests/unit/test_b.py"), {"parametrize"}),  # no tier: `pytest -m unit` would skip it
        (Path("tests/integration/test_c.py"), {"gpu"}),  # gpu test outside tests/gpu: run_suite would miss it
        (Path("tests/gpu/test_d.py"), {"gpu", "skip"}),
    ]
    assert tier_problems(tests) == (["tests/unit/test_b.py"], ["tests/integration/test_c.py"])
