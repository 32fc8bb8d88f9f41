"""Shared test settings: where ../shared is, and the slow-test switch."""

from __future__ import annotations

import os

import pytest
import torch

from pivotseg.paths import shared_path


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow") or os.environ.get("PIVOTSEG_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow or PIVOTSEG_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def require_shared(*parts: str):
    """Path under ../shared, or skip the test with the reason."""
    path = shared_path(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (set PIVOTSEG_SHARED to the shared folder)")
    return path


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield
