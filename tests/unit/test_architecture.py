"""Rules of docs/architecture.md, checked on the source.

- The import arrows point one way: a stage package never imports a later stage, the base layer imports no stage.
  Every import counts, module level or inside a function, so a new upward arrow fails here instead of surfacing
  later as an import cycle.
- A module over ~600 lines says in its opening docstring why it stays one module.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

PACKAGE = Path(__file__).resolve().parents[2] / "dischargesum"
BASE = ("config", "logging_utils", "artifacts", "manifest", "cli")

# module (or package prefix) -> what it may import from the project (module names or package prefixes).
ALLOWED: dict[str, tuple[str, ...]] = {
    **{name: BASE for name in BASE},
    "modeling": BASE,
    "data": (*BASE, "modeling", "data"),
    "evaluation": (*BASE, "data.schema", "data.lexicon", "data.vocabularies", "evaluation"),
    "training": (*BASE, "modeling", "data", "training"),
    "inference": (*BASE, "modeling", "data", "training.checkpoint_store", "evaluation.entities", "inference"),
    "tiny_models": (*BASE, "data.synthetic"),
    "launch": BASE,
    # The top: a merged model for serving needs the adapter loading and the training run's records.
    "export": (*BASE, "modeling", "data", "training", "inference", "evaluation"),
}

# Upward arrows that stay, each inside a function (never at import time), with the reason.
LAZY_EXCEPTIONS = {
    # Ctrl-C message of every stage: names the checkpoint a rerun resumes from (checkpoint_store is files only).
    ("cli", "training.checkpoint_store"),
    # Ranking a training note's sections by the summary's entities, and the data card's entity-support figures, use
    # the one entity extractor.
    ("data.target_support", "evaluation.entities"),
}


def _name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _covers(prefix: str, name: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(project module imported, whether the import runs at module import time) of one source file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    lazy: set[int] = set()
    type_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            lazy.update(id(inner) for inner in ast.walk(node))
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            type_only.update(id(inner) for inner in ast.walk(node))  # never runs: annotations only
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from dischargesum.data import lexicon` imports the module dischargesum.data.lexicon.
            names = [f"{node.module}.{alias.name}" for alias in node.names]
            names = [
                n if (PACKAGE.parent / n.replace(".", "/")).with_suffix(".py").exists() else node.module for n in names
            ]
        for name in names:
            if name.startswith("dischargesum."):
                found.append((name.removeprefix("dischargesum."), id(node) not in lazy))
    return found


def _rule(module: str) -> tuple[str, ...]:
    matches = [key for key in ALLOWED if _covers(key, module)]
    assert matches, f"{module}: no layer in ALLOWED; add it there and to docs/architecture.md"
    return ALLOWED[max(matches, key=len)]


def test_every_import_follows_the_arrows() -> None:
    wrong = []
    seen_exceptions = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _name(path)
        if not module:
            continue
        allowed = _rule(module)
        for target, eager in _imports(path):
            if any(_covers(prefix, target) for prefix in allowed) or _covers(module.split(".")[0], target):
                continue
            if (module, target) in LAZY_EXCEPTIONS and not eager:
                seen_exceptions.add((module, target))
                continue
            wrong.append(f"{module} -> {target}{' (at import time)' if eager else ''}")
    assert not wrong, "imports against the arrows of docs/architecture.md: " + "; ".join(wrong)
    assert seen_exceptions == LAZY_EXCEPTIONS, f"stale LAZY_EXCEPTIONS: {LAZY_EXCEPTIONS - seen_exceptions}"


def test_the_check_finds_an_upward_arrow(tmp_path: Path) -> None:
    source = tmp_path / "x.py"
    source.write_text(
        "import os\nfrom typing import TYPE_CHECKING\nfrom dischargesum.inference import engine\n\n"
        "if TYPE_CHECKING:\n    from dischargesum.training import sft\n\n\ndef f():\n    import dischargesum.cli\n"
    )
    # the module-level import is eager, the one in a function lazy, the TYPE_CHECKING one never runs
    assert sorted(_imports(source)) == [("cli", False), ("inference.engine", True)]
    assert not any(_covers(prefix, "inference.engine") for prefix in _rule("evaluation.scores"))


LONG_MODULE_LINES = 600


def test_a_long_module_says_why_it_stays_one() -> None:
    silent = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        if source.count("\n") > LONG_MODULE_LINES:
            docstring = ast.get_docstring(ast.parse(source)) or ""
            if not re.search(r"[Ww]hy (this |it )?(stays )?one module", docstring):
                silent.append(f"{_name(path)} ({source.count(chr(10))} lines)")
    assert not silent, f"modules over {LONG_MODULE_LINES} lines without a 'Why ... one module' docstring: {silent}"
