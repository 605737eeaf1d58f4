"""The test suite never downloads: huggingface_hub, transformers and datasets run offline (they read
these at import, which comes after this file). Hub ids and datasets are tested against local
caches and folders (tests/test_hub.py, tests/test_documents.py)."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
