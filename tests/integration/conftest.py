"""Integration fixtures shared across files: one executed quickstart notebook (its demo is a whole
scripts/run_medgemma.sh chain plus an export), reused by the notebook, run_medgemma and export tests."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import ROOT, subprocess_env

NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"
# The demo shortened for the tests (the notebook's own default is the full demo recipes): 10 optimizer steps and
# 4 test notes keep the chain's compute to seconds; the launches' start-up is most of the time.
TEST_DEMO_ARGS = ["--sft_qlora.max_steps", "10", "--generate.limit", "4"]


@dataclass
class ExecutedNotebook:
    notebook: object  # nbformat.NotebookNode after execution
    demo_dir: Path
    seconds: float

    @property
    def run_dir(self) -> Path:
        return self.demo_dir / "run"

    def run_medgemma_args(self) -> list[str]:
        """The demo cell's run_medgemma.sh arguments (to rerun the same command from a test)."""
        tiny = self.demo_dir / "tiny-gemma3"
        return [
            "--source", str(self.demo_dir / "notes.csv"), "--sample", "0.5", "--output_dir", str(self.run_dir),
            "--recipes", "recipes/demo", "--base_model", str(tiny),
            "--accelerate_config", "accelerate_configs/cpu.yaml",
            "--eval_accelerate_config", "accelerate_configs/cpu.yaml",
            "--compress.model_name_or_path", str(tiny), "--eval.bertscore_model", str(tiny / "encoder"),
            *TEST_DEMO_ARGS,
        ]  # fmt: skip


def _kernel_manager(kernels_dir: Path):
    """A kernel manager whose only kernel is this interpreter (the venv running the tests), found offline."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    spec_dir = kernels_dir / "dischargesum-test"
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "dischargesum test",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    ksm = KernelSpecManager(kernel_dirs=[str(kernels_dir)], ensure_native_kernel=False)
    return KernelManager(kernel_name="dischargesum-test", kernel_spec_manager=ksm)


@pytest.fixture(scope="session")
def quickstart_notebook(tmp_path_factory: pytest.TempPathFactory) -> ExecutedNotebook:
    """notebooks/quickstart.ipynb executed on the demo (CPU): install and the medgemma run off, TensorBoard not
    started, outputs under a temporary directory. The parameters cell is kept; a cell after it overrides it."""
    import time

    import nbformat
    from nbclient import NotebookClient

    tmp = tmp_path_factory.mktemp("quickstart")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    overrides = {
        "REPO_DIR": str(ROOT),
        "DEMO_DIR": str(tmp / "demo"),
        "INSTALL": False,
        "RUN_DEMO": True,
        "RUN_MEDGEMMA": False,
        "SHOW_TENSORBOARD": False,
        "DEMO_ARGS": TEST_DEMO_ARGS,
    }
    nb.cells.insert(index + 1, nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in overrides.items())))
    km = _kernel_manager(tmp / "kernels")
    client = NotebookClient(nb, km=km, timeout=1200, resources={"metadata": {"path": str(ROOT)}})
    began = time.perf_counter()
    client.execute(env=subprocess_env())
    return ExecutedNotebook(nb, tmp / "demo", time.perf_counter() - began)
