"""binder/ installs exactly what the package and its notebooks need: pyproject's
dependencies (through ``-e .``) plus the distributions the notebooks use beyond them, no
more, no fewer, with the same version bounds. Both sides are parsed: pyproject.toml and
binder/requirements.txt as data, the notebooks' code cells as Python (their imports).
"""
from __future__ import annotations

import ast
import importlib.metadata
import json
import re
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
BINDER = REPO / "binder"
OWN_PACKAGE = "csr_widgets"
# Distributions a notebook uses without importing them: data packages that a library
# finds through an entry point. A call named on the left needs the distribution on the right.
DATA_PROVIDERS = {"get_testdata_file": "pydicom-data"}  # pydicom's test files: the real chest film


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def requirements(lines) -> dict[str, Requirement]:
    parsed = {}
    for line in lines:
        requirement = Requirement(line)
        parsed[canonicalize_name(requirement.name)] = requirement
    return parsed


def binder_requirements() -> tuple[dict[str, Requirement], bool, list[str]]:
    """(named requirements, whether the package itself is installed, pip options)."""
    named, options, installs_package = [], [], False
    for raw in (BINDER / "requirements.txt").read_text().splitlines():
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        if line in ("-e .", "--editable .", "--editable=.", "."):
            installs_package = True
        elif line.startswith("-"):
            options.append(line)
        else:
            named.append(line)
    return requirements(named), installs_package, options


def notebook_code(path: Path) -> str:
    """The notebook's code cells as one Python module (IPython magics and shell lines dropped)."""
    cells = json.loads(path.read_text())["cells"]
    lines = []
    for cell in cells:
        if cell["cell_type"] == "code":
            source = "".join(cell["source"])
            lines += [line for line in source.splitlines() if not line.lstrip().startswith(("%", "!"))]
    return "\n".join(lines)


def imported_modules(code: str) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            modules.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            modules.add(node.module.split(".")[0])
    return modules


def distributions_of(code: str, providers: dict[str, list[str]]) -> set[str]:
    """The distributions a notebook's code needs, outside the standard library and this
    package; providers: {top-level module: distributions}, as importlib.metadata gives it."""
    distributions = set()
    for module in imported_modules(code) - set(sys.stdlib_module_names) - {OWN_PACKAGE}:
        assert module in providers, f"{module!r} is imported, but no installed distribution provides it"
        distributions.update(canonicalize_name(d) for d in providers[module])
    distributions.update(canonicalize_name(d) for call, d in DATA_PROVIDERS.items() if re.search(rf"\b{call}\(", code))
    return distributions


def notebook_distributions() -> dict[str, set[str]]:
    """{distribution: notebooks that need it}."""
    providers = importlib.metadata.packages_distributions()
    needed: dict[str, set[str]] = {}
    for path in sorted((REPO / "notebooks").glob("*.ipynb")):
        for distribution in distributions_of(notebook_code(path), providers):
            needed.setdefault(distribution, set()).add(path.name)
    return needed


def test_the_notebook_parser_sees_imports_and_data_providers(tmp_path):
    path = tmp_path / "n.ipynb"
    cells = ["%matplotlib inline\nimport numpy as np, json", "!ls\nfrom pydicom.data import get_testdata_file",
             "from . import local\nimport csr_widgets.data\nfilm = get_testdata_file('RG1_UNCR.dcm')"]
    path.write_text(json.dumps({"cells": [{"cell_type": "code", "source": source} for source in cells]}))
    code = notebook_code(path)
    assert imported_modules(code) == {"numpy", "json", "pydicom", "csr_widgets"}
    providers = {"numpy": ["numpy"], "pydicom": ["pydicom"]}
    assert distributions_of(code, providers) == {"numpy", "pydicom", "pydicom-data"}
    # importing the function without calling it needs no data
    assert distributions_of("from pydicom.data import get_testdata_file", providers) == {"pydicom"}


def test_binder_installs_the_package_and_exactly_what_the_notebooks_add():
    project = pyproject()["project"]
    dependencies = requirements(project["dependencies"])
    dev = requirements(project["optional-dependencies"]["dev"])
    listed, installs_package, options = binder_requirements()
    assert installs_package, "binder/requirements.txt must install the package itself (-e .), which brings pyproject's dependencies"

    needed = notebook_distributions()
    assert needed, "no notebook imports were found: the parser is broken"
    beyond = {name for name in needed if name not in dependencies}
    # CI runs the notebooks with the dev extra: whatever they need must be declared there.
    undeclared = sorted(name for name in beyond if name not in dev)
    assert not undeclared, f"notebooks need {undeclared} ({[sorted(needed[n]) for n in undeclared]}), in neither dependencies nor the dev extra"
    missing = sorted(beyond - set(listed))
    assert not missing, f"binder/requirements.txt lacks {missing}, which notebooks {[sorted(needed[n]) for n in missing]} need"
    extra = sorted(set(listed) - set(dependencies) - beyond)
    assert not extra, f"binder/requirements.txt installs {extra}, which neither pyproject's dependencies nor any notebook needs"

    # The same version bounds as pyproject (a bare name defers to them: pip resolves -e . together).
    for name, requirement in listed.items():
        declared = dependencies.get(name) or dev.get(name)
        if requirement.specifier:
            assert requirement.specifier == declared.specifier, (
                f"binder pins {requirement}, pyproject says {declared}: one bound, in one place")
    # CPU wheels for torch on Binder, from PyTorch's index; nothing else is fetched at run time.
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in options


def test_the_demo_needs_nothing_beyond_the_package():
    """`pip install -e . && csr-widgets demo` opens the quickstart: every distribution it
    uses must come with the package, not only with the dev extra."""
    dependencies = requirements(pyproject()["project"]["dependencies"])
    needed = distributions_of(notebook_code(REPO / "notebooks" / "01_quickstart.ipynb"),
                              importlib.metadata.packages_distributions())
    assert needed and sorted(needed - set(dependencies)) == []


def test_binder_runs_python_311_single_threaded_and_opens_the_quickstart():
    assert (BINDER / "runtime.txt").read_text().strip() == "python-3.11"
    start = (BINDER / "start").read_text().splitlines()
    assert start[0] == "#!/bin/bash" and start[-1] == 'exec "$@"'  # repo2docker: start must hand over
    assert "export OMP_NUM_THREADS=1" in start
    post_build = (BINDER / "postBuild").read_text()
    assert post_build.startswith("#!/bin/bash") and "set -euo pipefail" in post_build
    quickstart = re.search(r"default_url = \"/lab/tree/(\S+)\"", post_build).group(1)
    assert (REPO / quickstart).is_file(), f"binder/postBuild opens {quickstart}, which does not exist"
    assert quickstart == "notebooks/01_quickstart.ipynb"
