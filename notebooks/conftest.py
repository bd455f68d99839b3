"""The notebooks run as tests through nbval (pyproject.toml's addopts).

- pyproject.toml names nbval's sanitize file relative to the repository root: made
  absolute here, so that pytest started from another folder finds it too.
- Every notebook but the quickstart trains a model or sweeps hundreds of images (one to
  three minutes each on a 2-core CPU): marked slow, so the quick loop
  (-m "not slow and not browser") keeps the quickstart as its smoke test and CI runs all.
"""
from pathlib import Path

import pytest

QUICK = {"01_quickstart.ipynb"}  # about 15-35 s


def pytest_configure(config):
    path = config.getoption("nbval_sanitize_with", default=None)
    if path and not Path(path).is_file() and (config.rootpath / path).is_file():
        config.option.nbval_sanitize_with = str(config.rootpath / path)


def pytest_collection_modifyitems(config, items):
    for item in items:
        path = Path(str(item.path))
        if path.suffix == ".ipynb" and path.name not in QUICK:
            item.add_marker(pytest.mark.slow)
