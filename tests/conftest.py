"""Shared set-up and fixtures. The helpers test modules share (tiny models, adapters, the CLI run
in-process) are the `support` package next to this file; test modules never import each other."""

import os
import sys
import tempfile
from pathlib import Path

import pytest

# tests/ on the path: test modules import `support.*`
sys.path.insert(0, str(Path(__file__).parent))

# A private structure cache per test session: no test depends on what a user's cache holds.
os.environ.setdefault("LORAPLAN_CACHE_DIR", tempfile.mkdtemp(prefix="loraplan-cache-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict[str, str]:
    """{family: a model folder holding only its tiny config.json}, for every family in support.tiny."""
    from support.tiny import FAMILIES, write_config

    root = tmp_path_factory.mktemp("tiny-configs")
    return {family: write_config(family, root / family) for family in FAMILIES}


def pytest_collection_modifyitems(config, items):
    """`gpu` tests run where CUDA is (the GPU machine) and are skipped, with the reason, elsewhere;
    `pytest -m "not slow"` is the fast subset."""
    gpu = [item for item in items if "gpu" in item.keywords]
    if not gpu:
        return
    import torch

    if not torch.cuda.is_available():
        for item in gpu:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device (marked gpu)"))
