"""Test configuration shared by every tier: offline, deterministic, tiny artifacts built once per session."""

from __future__ import annotations

import os

# No test touches the network: the Hub, telemetry and dataset downloads are off before any library import.
for _var, _value in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "WANDB_DISABLED": "true",
}.items():
    os.environ[_var] = _value

import pytest  # noqa: E402

from tests.helpers import TIERS, tier_problems  # noqa: E402


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    skip_gpu = pytest.mark.skip(reason="needs CUDA (run the gpu tier on the GPU machine)")
    # Markers, not item.keywords: keywords also hold the names of the parent folders (tests/unit -> "unit"), so a file
    # without a marker would pass a keyword check while `pytest -m unit`, which matches markers, skips it.
    tiers = {item: TIERS.intersection(mark.name for mark in item.iter_markers()) for item in items}
    untiered, misplaced = tier_problems([(item.path, set(tiers[item])) for item in items])
    if untiered:
        # `pytest -m unit` (the inner loop) and every tier command would silently skip such a file.
        raise pytest.UsageError(f"test files without a tier marker ({', '.join(sorted(TIERS))}): {untiered}")
    if misplaced:
        # tests/<tier>/ holds that tier's files: `run_suite.sh gputests` runs tests/gpu, CI the CPU tiers' folders.
        raise pytest.UsageError(f"test files whose tier marker is not their folder's (tests/<tier>/): {misplaced}")
    for item in items:
        if "gpu" in tiers[item] and not has_cuda:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory):
    """A tiny Gemma3ForCausalLM directory (built once per test session, ~2 s)."""
    from dischargesum.tiny_models import build_tiny_gemma3

    return build_tiny_gemma3(tmp_path_factory.mktemp("tiny-gemma3"), seed=0)


@pytest.fixture(scope="session")
def tiny_vlm_dir(tmp_path_factory: pytest.TempPathFactory):
    """A tiny Gemma3ForConditionalGeneration (vision + text) directory: MedGemma's class at toy size."""
    from dischargesum.tiny_models import build_tiny_gemma3

    return build_tiny_gemma3(tmp_path_factory.mktemp("tiny-gemma3-vlm"), seed=0, kind="vlm")


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory):
    """A tiny BERT encoder directory for BERTScore tests."""
    from dischargesum.tiny_models import build_tiny_bert

    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), seed=0)


@pytest.fixture(scope="session")
def prepared_dataset_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir):
    """A completed prepare_data output (64 tiny synthetic rows, seed 0, budget 512), built once per session.

    Read-only: tests that train or resume on it share it; a test that needs other rows or a budget builds its own
    with :func:`tests.fixtures_data.make_prepared_dataset`.
    """
    from tests.fixtures_data import make_prepared_dataset

    return make_prepared_dataset(tmp_path_factory.mktemp("prepared-data"), tiny_model_dir)
