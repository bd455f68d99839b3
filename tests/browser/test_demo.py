"""`csr-widgets demo` for real: JupyterLab starts (as root, here), with the package's
TCP_NODELAY extension loaded, serving a demo notebook that names its kernel."""
from __future__ import annotations

import os
import sys

import nbformat
import pytest

from . import harness

pytestmark = pytest.mark.browser


def test_the_demo_server_starts_with_the_nodelay_extension(tmp_path, monkeypatch):
    port = harness.free_port()
    code = "import sys; from csr_widgets.cli import main; sys.exit(main(sys.argv[1:]))"
    command = [sys.executable, "-c", code, "demo", "--no-browser", "--port", str(port)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(harness.REPO), os.environ.get("PYTHONPATH", "")])}
    env["JUPYTER_CONFIG_DIR"] = str(tmp_path / "config")  # no user state in or out
    env["JUPYTER_RUNTIME_DIR"] = str(tmp_path / "runtime")
    env["JUPYTERLAB_SETTINGS_DIR"] = str(tmp_path / "settings")
    env["JUPYTERLAB_WORKSPACES_DIR"] = str(tmp_path / "workspaces")
    log = tmp_path / "demo.log"
    env["PYTHONUNBUFFERED"] = "1"
    monkeypatch.chdir(tmp_path)  # the demo writes its notebook in the current folder
    with harness._server(command, env, f"http://127.0.0.1:{port}/api/status", log, any_answer=True, timeout=120):
        pass
    text = log.read_text()
    assert "csr_widgets: TCP_NODELAY set on kernel websockets" in text
    if os.geteuid() == 0:
        assert "starting JupyterLab with --allow-root" in text
    notebook = nbformat.read(tmp_path / "csr-widgets-demo.ipynb", as_version=4)
    assert notebook.metadata["kernelspec"]["name"] == "python3"
