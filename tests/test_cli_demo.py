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
    assert notebook.cells == nbformat.read(cli.QUICKSTART, as_version=4).cells  # the quickstart
    # without a checkout's notebooks (a wheel install): the three-cell explorer demo
    fallback = tmp_path / "fallback.ipynb"
    assert cli.demo_notebook(fallback, quickstart=tmp_path / "missing.ipynb")
    assert "CSRExplorer(model, image)" in nbformat.read(fallback, as_version=4).cells[1].source
    path.write_text(json.dumps({"changed": "by the user"}))
    assert not cli.demo_notebook(path)
    assert json.loads(path.read_text()) == {"changed": "by the user"}


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
