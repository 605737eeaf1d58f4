"""The test suite never downloads: huggingface_hub, transformers and datasets run offline (they read
these at import, which comes after this file). Hub ids and datasets are tested against local
caches and folders (tests/arch/test_hub.py, tests/store/test_documents.py)."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"


def pytest_configure(config):
    """`slow` marks each test that starts processes (torchrun, kills, llama.cpp, the command in a child) or
    prunes a model end to end: `pytest -m "not slow"` is the quick loop while editing; CI runs everything."""
    config.addinivalue_line("markers", "slow: starts processes or prunes models end to end (left out by "
                                       "-m 'not slow')")

