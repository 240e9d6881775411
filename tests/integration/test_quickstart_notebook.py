"""notebooks/quickstart.ipynb runs top to bottom on the demo (CPU) and shows what it promises."""

from __future__ import annotations

import json

import nbformat
import pytest

from tests.integration.conftest import NOTEBOOK, ExecutedNotebook

pytestmark = pytest.mark.integration


def _outputs(nb) -> tuple[str, list[str]]:
    """All stream text of the executed notebook, and the markdown it displayed."""
    text, markdown = [], []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.output_type == "stream":
                text.append(out.text)
            elif "text/markdown" in out.get("data", {}):
                markdown.append(out.data["text/markdown"])
    return "".join(text), markdown


def test_the_notebook_is_clean_and_user_cells_come_first() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit the notebook without outputs"
    first_code = next(c for c in nb.cells if c.cell_type == "code")
    assert "parameters" in first_code.metadata.get("tags", [])
    for name in ("DATA_PATH", "OUTPUT_DIR", "RECIPES", "SAMPLE", "RUN_MEDGEMMA", "SHOW_TENSORBOARD"):
        assert f"\n{name} = " in "\n" + first_code.source
    source = "\n".join(c.source for c in nb.cells)
    # the same scripts as the command line, not a second implementation
    assert "scripts/run_medgemma.sh" in source and "scripts/export.py" in source
    assert "from dischargesum" not in source.replace("from dischargesum.data.synthetic import write_synthetic", "")


def test_the_notebook_runs_the_demo_and_renders_the_report(quickstart_notebook: ExecutedNotebook) -> None:
    text, markdown = _outputs(quickstart_notebook.notebook)
    run = quickstart_notebook.run_dir
    assert "run finished:" in text and "=== 6/6 eval stage 2" in text
    for stage in ("data", "sft", "generate", "compress", "eval", "eval_stage2"):
        assert json.loads((run / stage / "manifest.json").read_text())["status"] == "complete", stage
    # TensorBoard guarded off: the command is printed instead of starting a server
    assert f"tensorboard.main --logdir {run}/sft/tensorboard" in text
    assert any(m.startswith("# Evaluation report") for m in markdown), "report.md rendered"
    assert any("data fingerprint" in m for m in markdown), "the export's model card rendered"
    assert "RUN_MEDGEMMA is off" in text
    print(f"quickstart notebook executed in {quickstart_notebook.seconds:.0f} s")
