"""Every key the docs, notebooks, demo text, tooltips and hint line name is a key the
explorer binds (csr_widgets.widgets.pointer.KEYMAP, its one definition)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import ipywidgets as widgets

from csr_widgets.cli import DEMO_CELLS
from csr_widgets.widgets import CSRExplorer
from csr_widgets.widgets.pointer import KEYMAP, hint_line

from .test_widgets import image, model  # noqa: F401 (fixtures)

REPO = Path(__file__).resolve().parents[1]
KEY = r"(?:(?:Ctrl|Cmd|Shift|Alt)\+)*(?:[A-Za-z]|Delete|Backspace|Esc|Escape|Enter|Tab|Space)"
# how text names a key: `z` (Markdown), <kbd>z</kbd> (HTML), "undo (z)" (a tooltip's end)
MENTIONS = [re.compile(rf"`({KEY})`"), re.compile(rf"<kbd>({KEY})</kbd>"), re.compile(rf"\(({KEY})\)\s*$")]


def named_keys(text: str) -> set[str]:
    return {m.group(1) for pattern in MENTIONS for line in text.splitlines() for m in pattern.finditer(line)}


def bound(name: str) -> bool:
    names = {k for b in KEYMAP for k in (*b.keys, b.label)}
    return name in names or (len(name) == 1 and name.lower() in names)


def control_texts(widget) -> list[str]:
    """Tooltips and labels of a widget and everything inside it."""
    texts = []
    for attribute in ("tooltip", "description", "value"):
        value = getattr(widget, attribute, None)
        if isinstance(value, str):
            texts.append(value)
    texts.extend(getattr(widget, "tooltips", None) or [])
    texts.extend(label for label, _ in getattr(widget, "_options_full", None) or [] if isinstance(label, str))
    for child in getattr(widget, "children", ()):
        texts.extend(control_texts(child))
    return texts


def test_the_checker_finds_keys_in_every_form_and_rejects_unbound_ones():
    text = "Press `u` / `r` to undo. Keys: <kbd>Esc</kbd> cancels\nredo (Shift+Z)\nnot a key: `ex.boxes`"
    assert named_keys(text) == {"u", "r", "Esc", "Shift+Z"}
    assert not bound("u") and not bound("r") and bound("Esc") and bound("Shift+Z") and bound("Z")


def test_docs_name_only_keys_the_explorer_binds(model, image):
    sources = {"README.md": (REPO / "README.md").read_text(), "csr_widgets/cli.py (demo)": "\n".join(DEMO_CELLS)}
    for path in sorted((REPO / "notebooks").glob("*.ipynb")):
        cells = json.loads(path.read_text())["cells"]
        sources[path.name] = "\n".join("".join(cell["source"]) for cell in cells)
    ex = CSRExplorer(model, image)
    sources["explorer controls"] = "\n".join(control_texts(ex))
    sources["hint line"] = hint_line(html=True)
    unbound = {name: sorted(k for k in named_keys(text) if not bound(k)) for name, text in sources.items()}
    assert not any(unbound.values()), f"keys named but not bound (pointer.KEYMAP): {unbound}"
    # the checker saw the keys where they are named
    assert {"p", "n", "z"} <= named_keys(sources["explorer controls"])
    assert {b.label for b in KEYMAP} <= named_keys(sources["hint line"])
    assert isinstance(ex.panel, widgets.VBox)
