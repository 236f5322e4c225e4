"""Test-suite options: tests marked ``slow`` (long end-to-end runs, e.g. the cross-framework
examples) run only with ``--runslow`` or ``CERTONNX_SLOW=1``, so ``make test`` stays within CI's
time budget while the slow checks remain one flag away."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.paths import FIXTURES
from tests.train_util import one_thread  # noqa: F401  (a fixture for every test module)


@pytest.fixture
def fixtures() -> Path:
    """The folder of bundled test fixtures (``tests/fixtures``)."""
    return FIXTURES


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow") or os.environ.get("CERTONNX_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow end-to-end test: run with --runslow or CERTONNX_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
