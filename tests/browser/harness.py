"""Real-browser harness: JupyterLab / Voila on 127.0.0.1 and Debian's Chromium via Playwright.

Used by the browser tests and by benchmarks/widget_latency.py. Never downloads anything:
Chromium is the system one (``playwright install`` is never run), servers listen on
127.0.0.1 only, with a random free port, a token, and temporary config/runtime folders,
and every server started here is stopped by the context manager that started it.
"""
from __future__ import annotations

import importlib.util
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).parent
REPO = HERE.parents[1]
ARTIFACTS = REPO / "test-artifacts"  # gitignored
NOTEBOOK = HERE / "explorer.ipynb"
SCENE = HERE / "scene.py"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def missing_browser() -> str | None:
    """Why the browser tests cannot run here, or None."""
    if importlib.util.find_spec("playwright") is None:
        return "Python Playwright is not installed (pip install playwright; never `playwright install`)"
    if chromium_path() is None:
        return "Chromium is not installed (Debian: apt-get install chromium)"
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prepare_root(root: Path, notebook: Path = NOTEBOOK) -> Path:
    """Copy the fixture notebook and its helper module into a server's root folder."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(notebook, root / notebook.name)
    shutil.copy(SCENE, root / SCENE.name)
    return root / notebook.name


def _environment(base: Path, nodelay: bool) -> dict:
    """Private Jupyter config/runtime/settings folders, so no user state leaks in or out."""
    env = dict(os.environ)
    config = base / "config"
    (config / "jupyter_server_config.d").mkdir(parents=True, exist_ok=True)
    if nodelay:
        extension = {"ServerApp": {"jpserver_extensions": {"csr_widgets.widgets.server": True}}}
        (config / "jupyter_server_config.d" / "csr_widgets.json").write_text(json.dumps(extension))
    settings = base / "lab-settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True, exist_ok=True)
    # no news or update checks: no network, and no toast over the notebook
    (settings / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    # The kernel (and the server extension) import the package of this checkout, not
    # whichever copy is installed: the kernel runs in the server's root folder, where the
    # current directory does not put the checkout on sys.path.
    paths = [str(REPO), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env.update(
        PYTHONPATH=os.pathsep.join(paths),
        JUPYTER_CONFIG_DIR=str(config),
        JUPYTER_RUNTIME_DIR=str(base / "runtime"),
        JUPYTER_DATA_DIR=str(base / "data"),  # e.g. the notebook-signing key, not in ~/.local
        JUPYTERLAB_SETTINGS_DIR=str(base / "lab-settings"),
        JUPYTERLAB_WORKSPACES_DIR=str(base / "lab-workspaces"),
        JUPYTER_PLATFORM_DIRS="1",
        PYTHONUNBUFFERED="1",
    )
    env.pop("JUPYTER_TOKEN", None)
    return env


@contextmanager
def _server(command: list[str], env: dict, ready_url: str, log_path: Path, timeout: float = 90.0, any_answer: bool = False):
    log = open(log_path, "wb")
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{command[2]} exited with {process.returncode}:\n{_tail(log_path)}")
            try:
                with urllib.request.urlopen(ready_url, timeout=2) as response:
                    if response.status == 200:
                        break
            except urllib.error.HTTPError:
                if any_answer:  # listening and answering: ready
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{command[2]} did not answer {ready_url} within {timeout:.0f} s:\n{_tail(log_path)}")
            time.sleep(0.25)
        yield process
    finally:
        _stop(process)
        log.close()


def _stop(process: subprocess.Popen) -> None:
    """Stop the server we started (and its kernels: they share its process group)."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, 15)
        except ProcessLookupError:
            pass
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(process.pid, 9)
            except ProcessLookupError:
                pass
            process.wait(timeout=10)


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@contextmanager
def _jupyter(module: str, app: str, root: Path, nodelay: bool):
    """A Jupyter front end (``python -m <module>``) serving ``root`` on 127.0.0.1."""
    base = Path(tempfile.mkdtemp(prefix=f"csr-{module}-"))
    port, token = free_port(), secrets.token_hex(16)
    command = [
        sys.executable, "-m", module, "--no-browser",
        "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
        f"--{app}.expose_app_in_browser=True",  # window.jupyterapp: run cells as the menu does
        *([f"--{app}.extension_manager=readonly"] if app == "LabApp" else []),  # no PyPI queries
        "--ServerApp.allow_root=True",  # CI containers run as root
        "--ServerApp.shutdown_no_activity_timeout=600",
    ]
    url = f"http://127.0.0.1:{port}"
    log = base / "server.log"
    try:
        with _server(command, _environment(base, nodelay), f"{url}/api/status?token={token}", log):
            yield url, token, log
    finally:
        shutil.rmtree(base, ignore_errors=True)


@contextmanager
def jupyter_lab(root: Path, *, nodelay: bool = True):
    """JupyterLab 4 serving ``root`` on 127.0.0.1; yields (base URL, token, log path)."""
    with _jupyter("jupyterlab", "LabApp", root, nodelay) as served:
        yield served


@contextmanager
def notebook7(root: Path, *, nodelay: bool = True):
    """Jupyter Notebook 7 serving ``root`` on 127.0.0.1; yields (base URL, token, log path)."""
    with _jupyter("notebook", "JupyterNotebookApp", root, nodelay) as served:
        yield served


@contextmanager
def voila(root: Path, notebook: str):
    """Voila (standalone) rendering ``root/notebook`` on 127.0.0.1; yields (page URL, log path)."""
    base = Path(tempfile.mkdtemp(prefix="csr-voila-"))
    port, token = free_port(), secrets.token_hex(16)
    command = [
        sys.executable, "-m", "voila", str(root / notebook), "--no-browser",
        "--Voila.ip=127.0.0.1", f"--Voila.port={port}", "--Voila.port_retries=0",
        f"--token={token}", f"--Voila.root_dir={root}", "--show_tracebacks=True",
    ]
    url = f"http://127.0.0.1:{port}/?token={token}"
    log = base / "server.log"
    try:
        # Asking for the page would execute the notebook: any HTTP answer means it is up.
        with _server(command, _environment(base, nodelay=False), f"http://127.0.0.1:{port}/voila/static/ready", log, any_answer=True):
            yield url, log
    finally:
        shutil.rmtree(base, ignore_errors=True)


@contextmanager
def chromium():
    """A headless Chromium (the system one) with a fresh profile; yields a Playwright context."""
    from playwright.sync_api import sync_playwright

    profile = Path(tempfile.mkdtemp(prefix="csr-chromium-"))
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile),
            executable_path=chromium_path(),
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport={"width": 1500, "height": 1000},
        )
        try:
            yield context
        finally:
            context.close()
            shutil.rmtree(profile, ignore_errors=True)


# ----------------------------------------------------------------------------- page helpers
RUN_ALL = """async () => {
    const app = window.jupyterapp;
    const panel = app.shell.currentWidget;
    await panel.context.ready;
    await panel.sessionContext.ready;
    await app.commands.execute('notebook:run-all-cells');
}"""


def open_notebook_in_lab(page, url: str, token: str, name: str, timeout: float = 120_000, front_end: str = "lab") -> None:
    """Open a notebook in JupyterLab (or Notebook 7: front_end="notebook") and run all its
    cells (the "Run All" command)."""
    path = f"lab/tree/{name}" if front_end == "lab" else f"notebooks/{name}"
    page.goto(f"{url}/{path}?token={token}", timeout=timeout)
    page.wait_for_function(
        "() => window.jupyterapp && window.jupyterapp.shell.currentWidget && window.jupyterapp.shell.currentWidget.sessionContext",
        timeout=timeout,
    )
    page.evaluate(RUN_ALL)


def canvas_pixels(page, selector: str = ".csr-canvas"):
    """The displayed canvas (all layers composited) as an (H, W, 4) uint8 array.

    Read as a PNG data URL: a JSON array of every byte takes seconds on a busy machine.
    """
    import base64
    import io

    import numpy as np
    from PIL import Image

    url = page.evaluate("(selector) => document.querySelector(selector).toDataURL('image/png')", selector)
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGBA"))


def to_page(page, canvas_xy, selector: str = ".csr-canvas") -> tuple[float, float]:
    """Canvas pixel coordinates -> page (CSS) coordinates for Playwright's mouse."""
    box = page.locator(selector).bounding_box()
    size = page.evaluate("(s) => { const c = document.querySelector(s); return [c.width, c.height]; }", selector)
    return box["x"] + canvas_xy[0] * box["width"] / size[0], box["y"] + canvas_xy[1] * box["height"] / size[1]


def drag(page, start, end, steps: int = 12, selector: str = ".csr-canvas") -> None:
    """A real mouse drag between two canvas points."""
    (x0, y0), (x1, y1) = to_page(page, start, selector), to_page(page, end, selector)
    page.mouse.move(x0, y0)
    page.mouse.down()
    page.mouse.move(x1, y1, steps=steps)
    page.mouse.up()


def scene_line(page, timeout: float = 120_000) -> dict:
    """The JSON the fixture notebook prints after ``SCENE`` (where the strongest region is)."""
    locator = page.get_by_text("SCENE {", exact=False).first
    locator.wait_for(timeout=timeout)
    text = locator.inner_text()
    return json.loads(text[text.index("SCENE ") + 6 :].strip().splitlines()[0])
