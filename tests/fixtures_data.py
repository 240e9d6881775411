"""Prepared datasets for the tests of later stages (sft_qlora, generate, eval).

``make_prepared_dataset`` returns a completed prepare_data output directory — the files of
:mod:`dischargesum.data.schema` plus a completed manifest — built from synthetic rows. The default one (64 rows,
seed 0) is the session fixture ``prepared_dataset_dir`` in ``tests/conftest.py``; for other rows or budgets call it
from a module-scoped fixture::

    @pytest.fixture(scope="module")
    def dataset_dir(tmp_path_factory, tiny_model_dir):
        return make_prepared_dataset(tmp_path_factory.mktemp("data"), tiny_model_dir, n_rows=24)
"""

from __future__ import annotations

from pathlib import Path

from dischargesum.config import PrepareDataConfig
from dischargesum.data.prepare import run_prepare_data


def make_prepared_dataset(
    out_dir: Path,
    tokenizer_dir: Path,
    *,
    n_rows: int = 64,
    profile: str = "tiny",
    seed: int = 0,
    max_seq_length: int = 512,
) -> Path:
    """Run prepare_data on ``n_rows`` synthetic Kaggle-schema rows (no defects) into ``out_dir``; return it.

    20% of patients go to validation and 20% to test, so even 64 rows give every split some rows. Runs in the
    test process (no subprocess, no plots): about a second for 64 tiny rows.
    """
    cfg = PrepareDataConfig(
        output_dir=str(out_dir),
        seed=seed,
        source="synthetic",
        synthetic_rows=n_rows,
        synthetic_profile=profile,  # type: ignore[arg-type]
        synthetic_schema="kaggle",
        tokenizer_name_or_path=str(tokenizer_dir),
        max_seq_length=max_seq_length,
        validation_fraction=0.2,
        test_fraction=0.2,
        num_workers=0,
        plots=False,
    )
    return run_prepare_data(cfg).output_dir
