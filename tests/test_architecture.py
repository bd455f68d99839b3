"""The package's import graph, read from the source: no cycles, no layer importing one above it.

``LAYERS`` below is the single definition of the package's layering (docs/architecture.md
explains it). Every import statement counts, those inside functions too: a function-level
import is a lazy import, not a way around the layering. Relative imports are resolved;
``from package import name`` is an edge to ``package.name`` when that is a module, else to
the package itself (its ``__init__``). Importing a submodule also runs its package's
``__init__``; that is loading order, not an edge of the importer (the ``__init__``'s own
imports are its edges).
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ROOT = "csr_widgets"

# Lowest first; a module may import its own layer and the layers before it, never one after.
# A module belongs to the layer of the longest entry it falls under (an entry names a module
# or a package); the root package is only itself.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("infrastructure", ("csr_widgets._version", "csr_widgets._batching", "csr_widgets._distributed",
                        "csr_widgets._inference", "csr_widgets._tensor_files", "csr_widgets.config")),
    ("data", ("csr_widgets.data",)),
    ("model", ("csr_widgets.model",)),
    ("metrics", ("csr_widgets.evaluation.metrics",)),
    ("pretrained", ("csr_widgets.pretrained",)),
    ("training", ("csr_widgets.training",)),
    ("evaluation", ("csr_widgets.evaluation",)),
    ("widgets", ("csr_widgets.widgets",)),
    ("interface", ("csr_widgets.cli", "csr_widgets.__main__", "csr_widgets")),
)


# --------------------------------------------------------------------------- the checker
def package_modules(source: Path, root: str) -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package ``__init__``) for every .py under source/root."""
    modules = {}
    for path in sorted((source / root).rglob("*.py")):
        parts = list(path.relative_to(source).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return modules


def import_graph(source: Path, root: str) -> dict[str, set[str]]:
    """module -> the package modules it imports, anywhere in its source."""
    modules = package_modules(source, root)
    graph = {}
    for name, (path, is_package) in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    package = name.split(".") if is_package else name.split(".")[:-1]
                    package = package[: len(package) - (node.level - 1)]
                    base = ".".join(package + ([node.module] if node.module else []))
                targets.update(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names)
        resolved = set()
        for target in targets:
            while target and target not in modules:  # an attribute of a module: the module
                target = target.rpartition(".")[0]
            if target and target != name:
                resolved.add(target)
        graph[name] = resolved
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search, deterministic)."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" after
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def layer_of(module: str, layers=LAYERS, root: str = ROOT) -> int | None:
    """Index in ``layers`` of the longest entry that ``module`` falls under (None: no layer)."""
    best, best_length = None, -1
    for index, (_, entries) in enumerate(layers):
        for entry in entries:
            under = module == entry or (entry != root and module.startswith(entry + "."))
            if under and len(entry) > best_length:
                best, best_length = index, len(entry)
    return best


def upward_imports(graph: dict[str, set[str]], layers=LAYERS, root: str = ROOT) -> list[str]:
    """'a (layer) imports b (higher layer)' for every import against the layering."""
    found = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            low, high = layer_of(module, layers, root), layer_of(target, layers, root)
            if low is not None and high is not None and high > low:
                found.append(f"{module} ({layers[low][0]}) imports {target} ({layers[high][0]})")
    return found


# --------------------------------------------------------------------------- the package
@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(REPO, ROOT)


def test_the_package_has_no_import_cycle(graph):
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_every_module_has_a_layer(graph):
    assert [m for m in graph if layer_of(m) is None] == [], "add these modules to LAYERS (and docs/architecture.md)"


def test_no_layer_imports_a_layer_above_it(graph):
    assert upward_imports(graph) == []


def test_the_walker_sees_lazy_and_relative_imports(graph):
    """Guards against a checker that passes because it sees nothing."""
    assert "csr_widgets.widgets" in graph["csr_widgets"]  # inside __getattr__
    assert "csr_widgets.training.features" in graph["csr_widgets.evaluation.atlas"]  # inside build_atlas's helper
    assert "csr_widgets.evaluation.metrics" in graph["csr_widgets.training.fitting"]  # `from ..evaluation import metrics`
    assert "csr_widgets.model" in graph["csr_widgets.training.fitting"]  # `from ..model import CSRModel`: the package
    assert {"csr_widgets._version", "csr_widgets.config"} <= graph["csr_widgets.model.checkpoint"]


# --------------------------------------------------------------------------- the checker, on a planted graph
PLANTED = {
    "pkg/__init__.py": "from .low import base\n",
    "pkg/low.py": "def base():\n    from .high import top  # lazy, and upward: the planted cycle\n    return top\n",
    "pkg/util.py": "VALUE = 1\n",
    "pkg/high.py": "from . import low\nfrom .sub.deep import leaf\n\ndef top():\n    return low.base\n",
    "pkg/sub/__init__.py": "",
    "pkg/sub/deep.py": "import pkg.low\nfrom .. import util\n\ndef leaf():\n    return util.VALUE\n",
}
PLANTED_LAYERS = (("low", ("pkg.low", "pkg.util")), ("high", ("pkg.high", "pkg.sub")), ("top", ("pkg",)))


@pytest.fixture
def planted(tmp_path) -> Path:
    for name, text in PLANTED.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


def test_the_checker_resolves_a_planted_package(planted):
    assert import_graph(planted, "pkg") == {
        "pkg": {"pkg.low"},
        "pkg.low": {"pkg.high"},
        "pkg.util": set(),
        "pkg.high": {"pkg.low", "pkg.sub.deep"},
        "pkg.sub": set(),
        "pkg.sub.deep": {"pkg.low", "pkg.util"},
    }


def test_the_checker_finds_a_planted_cycle_and_an_upward_import(planted):
    graph = import_graph(planted, "pkg")
    assert find_cycle(graph) == ["pkg.low", "pkg.high", "pkg.low"]
    assert upward_imports(graph, PLANTED_LAYERS, "pkg") == ["pkg.low (low) imports pkg.high (high)"]
    graph["pkg.low"] = set()  # without the lazy import
    assert find_cycle(graph) is None and upward_imports(graph, PLANTED_LAYERS, "pkg") == []
    assert layer_of("pkg.sub.deep", PLANTED_LAYERS, "pkg") == 1 and layer_of("pkg", PLANTED_LAYERS, "pkg") == 2
    assert layer_of("pkg.other", PLANTED_LAYERS, "pkg") is None  # the root covers only itself


# --------------------------------------------------------------------------- docs/
CITATION = re.compile(r"docs/([\w-]+\.md)#([\w-]+)")


def anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+\s+(.+?)\s*$", markdown, flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def cited_files() -> list[Path]:
    return sorted([*(REPO / ROOT).rglob("*.py"), *(REPO / "tests").rglob("*.py"), *(REPO / "benchmarks").rglob("*.py"),
                   *(REPO / "docs").glob("*.md"), REPO / "README.md", *(REPO / "notebooks").glob("*.ipynb")])


def test_every_docs_citation_names_a_heading():
    missing = []
    for path in cited_files():
        for file, anchor in CITATION.findall(path.read_text()):
            target = REPO / "docs" / file
            if not target.is_file() or anchor not in anchors(target.read_text()):
                missing.append(f"{path.relative_to(REPO)}: docs/{file}#{anchor}")
    assert missing == []


def test_links_between_the_docs_name_a_heading():
    missing = []
    for path in sorted((REPO / "docs").glob("*.md")):
        for file, anchor in re.findall(r"\]\(([\w-]+\.md)?#([\w-]+)\)", path.read_text()):
            target = path.parent / file if file else path
            if not target.is_file() or anchor not in anchors(target.read_text()):
                missing.append(f"{path.name}: {file}#{anchor}")
    assert missing == []


def test_the_code_cites_docs_not_the_design_file():
    """DESIGN.md is not in the repository: the code points into docs/ instead."""
    design = re.compile(r"DESIGN(\.md|\s+sections?|\s*:|\s+in\b)")
    files = [*cited_files(), *(REPO / "binder").iterdir()]
    stale = [f"{p.relative_to(REPO)}" for p in files if p != Path(__file__) and design.search(p.read_text())]
    assert stale == []
