"""`csr-widgets demo`: the notebook it writes and the server it starts (headless: the
command is captured; tests/browser/test_demo.py starts it for real)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import nbformat

from csr_widgets import cli


def test_the_demo_notebook_is_the_quickstart_with_a_kernelspec_and_is_never_overwritten(tmp_path):
    path = tmp_path / "demo.ipynb"
    assert cli.demo_notebook(path)
    notebook = nbformat.read(path, as_version=4)
    assert notebook.metadata["kernelspec"]["name"] == "python3"  # no "Select Kernel" dialog
    nbformat.validate(notebook)
    quickstart = nbformat.read(cli.QUICKSTART, as_version=4)
    assert [c.source for c in notebook.cells if c.cell_type == "code"] == [c.source for c in quickstart.cells if c.cell_type == "code"]
    # its links to the other notebooks work from where the copy lies
    links = [link for cell in notebook.cells if cell.cell_type == "markdown" for link in cli.MARKDOWN_LINK.findall(cell.source)]
    assert links and all((path.parent / target).resolve().is_file() for _, target, _ in links)
    # without a checkout's notebooks (a wheel install): the three-cell explorer demo
    fallback = tmp_path / "fallback.ipynb"
    assert cli.demo_notebook(fallback, quickstart=tmp_path / "missing.ipynb")
    assert "CSRExplorer(model, image)" in nbformat.read(fallback, as_version=4).cells[1].source
    path.write_text(json.dumps({"changed": "by the user"}))
    assert not cli.demo_notebook(path)
    assert json.loads(path.read_text()) == {"changed": "by the user"}


def test_relink_moves_relative_links_and_leaves_urls_and_anchors(tmp_path):
    origin, folder = tmp_path / "repo" / "notebooks", tmp_path
    text = "[next](02_b.ipynb#part-2), [docs](../docs/m.md), [web](https://x.org/a.md), ![p](/abs/p.png), [here](#top)"
    assert cli.relink(text, origin, folder) == (
        "[next](repo/notebooks/02_b.ipynb#part-2), [docs](repo/docs/m.md), [web](https://x.org/a.md), ![p](/abs/p.png), [here](#top)")


def test_the_demo_runs_as_root_with_the_nodelay_extension(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(subprocess, "call", lambda command: calls.append(command) or 0)
    for uid in (0, 1000):
        monkeypatch.setattr(os, "geteuid", lambda uid=uid: uid)
        assert cli.main(["demo", "--no-browser", "--port", "8123"]) == 0
    as_root, as_user = calls
    assert as_root[:4] == [sys.executable, "-m", "jupyter", "lab"] and "--port=8123" in as_root
    assert "--allow-root" in as_root and "--allow-root" not in as_user
    assert "--ServerApp.jpserver_extensions=csr_widgets.widgets.server=True" in as_root
    assert "--allow-root" in capsys.readouterr().out  # and it says so
    assert (tmp_path / "csr-widgets-demo.ipynb").exists()
