"""The test suite never downloads: huggingface_hub, transformers and datasets run offline (they read
these at import, which comes after this file). Hub ids and datasets are tested against local
caches and folders (tests/arch/test_hub.py, tests/store/test_documents.py)."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import pytest  # noqa: E402

# Files whose tests start processes (torchrun, kills, llama.cpp) or prune real models end to end:
# `pytest -m "not slow"` leaves them out for a quick check while editing; CI runs everything.
SLOW_FILES = {"test_distributed.py", "test_faults.py", "test_gguf_export.py", "test_data_safety.py",
              "test_hub.py", "test_run_flow.py", "test_rope_types.py", "test_hostile_per_layer.py",
              "test_hostile_cli.py", "test_hostile_files.py", "test_pipeline.py", "test_plan.py",
              "test_documents.py", "test_evaluate.py", "test_loading.py", "test_bad_inputs.py",
              "test_tensor_parallel.py", "test_report.py", "test_lock.py"}


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: starts processes or prunes models end to end (left out by "
                                       "-m 'not slow')")


def pytest_collection_modifyitems(items):
    for item in items:
        if item.path.name in SLOW_FILES:
            item.add_marker(pytest.mark.slow)
