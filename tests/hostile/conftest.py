"""Fixtures shared by the hostile-input tests (test_bad_inputs.py, test_hostile_files.py)."""

import pytest

from tests.harness import DEMO
from tests.models import save_tiny_model


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A 3-layer sharded llama (17 shards), built once; each test mutates its own copy."""
    return save_tiny_model(tmp_path_factory.mktemp("model") / "in", "llama", layers=3, vocab=512,
                           tokenizer_from=DEMO / "stories260K")
