"""Shared pieces of the tests that check loraplan's files with the training tools themselves
(tests/test_tools_*.py, marked `tools`): each skips, with the reason, when its tool is not installed.
Install them as .ci/run does (`make tools`), then `pytest -m tools`."""

from __future__ import annotations

import importlib
import importlib.metadata

import pytest


def require(module: str, dist: str | None = None):
    """Import MODULE or skip the test module, naming the distribution to install."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        pytest.skip(f"{dist or module} is not installed ({e}); `make tools` installs it", allow_module_level=True)


def version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"
