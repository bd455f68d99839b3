"""Browser tests: skipped, with the reason, where Chromium or Playwright is absent."""
from __future__ import annotations

from pathlib import Path

import pytest

from .harness import ARTIFACTS, missing_browser

# the fixture notebook is opened by the browser tests, not run by nbval
collect_ignore = ["explorer.ipynb", "readme.ipynb"]


def pytest_collection_modifyitems(config, items):
    reason = missing_browser()
    here = Path(__file__).parent
    for item in items:
        if Path(str(item.fspath)).parent == here:
            item.add_marker(pytest.mark.browser)
            if reason:
                item.add_marker(pytest.mark.skip(reason=f"browser test skipped: {reason}"))


@pytest.fixture
def artifacts() -> Path:
    """Where screenshots go (test-artifacts/, gitignored), kept after the run."""
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


@pytest.fixture
def browser_context():
    from .harness import chromium

    with chromium() as context:
        yield context
