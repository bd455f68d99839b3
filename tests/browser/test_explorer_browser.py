"""CSRExplorer in a real browser: JupyterLab 4 and Voila, Debian's Chromium, real mouse.

The fixture notebook (explorer.ipynb + scene.py) builds a small model whose "sick"
probability rises with the nodule concept's scores, shows the explorer with nodule's
heatmap, and prints where nodule's strongest region is (canvas pixels). The tests draw a
NEGATIVE box over it with the mouse and check what the page shows.
"""
from __future__ import annotations

import re
import time

import numpy as np
import pytest

from . import harness

pytestmark = pytest.mark.browser
NEGATIVE_RGB = np.array([0xD5, 0x5E, 0x00])
TIMEOUT = 180_000  # ms: kernel start and the first torch import are slow on a busy 2-core box


def displayed_probs(page) -> dict[str, tuple[float, float]]:
    """class -> (before, after) as the prediction chart shows them."""
    probs = {}
    for row in page.locator(".csr-prediction .csr-class").all():
        name = row.get_attribute("data-class")
        before, after = re.findall(r"\d\.\d{3}", row.locator(".csr-prob").inner_text())
        probs[name] = (float(before), float(after))
    return probs


def wait_for_text_change(page, selector: str, old: str, timeout: float = 30_000) -> str:
    page.wait_for_function(
        "([selector, old]) => { const e = document.querySelector(selector); return e && e.innerText !== old; }",
        arg=[selector, old], timeout=timeout,
    )
    return page.locator(selector).inner_text()


def wait_for_pixels(page, condition, timeout: float = 20.0):
    """Poll the displayed canvas until ``condition(pixels)`` holds and the picture has
    settled (unchanged 0.3 s later: no half-drawn frame); returns the pixels."""
    deadline = time.monotonic() + timeout
    while True:
        pixels = harness.canvas_pixels(page)
        if condition(pixels):
            time.sleep(0.3)
            settled = harness.canvas_pixels(page)
            if np.array_equal(settled, pixels):
                return pixels
        if time.monotonic() > deadline:
            harness.ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(harness.ARTIFACTS / "failed-canvas.png"), full_page=True)
            np.save(harness.ARTIFACTS / "failed-canvas.npy", pixels)
            raise AssertionError("the canvas never showed the expected change (see test-artifacts/failed-canvas.png)")
        time.sleep(0.1)


def has_negative_edge(pixels, box, edge: str = "y0") -> bool:
    """A dashed negative-box outline runs along the box's top (or bottom) edge; the box
    snaps outwards to whole image pixels, so the line may sit a pixel or two off."""
    x0, x1, y = int(box["x0"]), int(box["x1"]), int(round(box[edge]))
    band = pixels[max(0, y - 3) : y + 3, x0:x1, :3].reshape(-1, 3).astype(int)
    return bool((np.abs(band - NEGATIVE_RGB).max(axis=1) <= 40).sum() >= 5)


def exercise(page, artifacts, name: str) -> None:
    """Negative box over the strongest region, then a concept toggle; assert what is shown."""
    scene = harness.scene_line(page, timeout=TIMEOUT)
    box = scene["box"]
    page.locator(".csr-canvas").wait_for(timeout=TIMEOUT)
    page.wait_for_function("() => document.querySelector('.csr-prediction .csr-class')", timeout=TIMEOUT)
    before_probs = displayed_probs(page)
    assert before_probs["sick"][1] == pytest.approx(scene["probs"][1], abs=0.0011)
    # the image and heatmap are on the canvas (not blank)
    before = wait_for_pixels(page, lambda p: p[..., 3].min() == 255 and p[..., :3].std() > 5)

    page.locator(".csr-mode button", has_text="negative").click()
    old_text = page.locator(".csr-prediction").inner_text()
    (x0, y0), (x1, y1) = harness.to_page(page, (box["x0"], box["y0"])), harness.to_page(page, (box["x1"], box["y1"]))
    page.mouse.move(x0, y0)
    page.mouse.down()
    page.mouse.move(x1, y1, steps=12)  # faster than the rubber band's frame rate
    # the rubber band reaches the mouse's last position (the trailing frame, on the kernel's loop)
    wait_for_pixels(page, lambda p: has_negative_edge(p, box, "y1"))
    assert page.locator(".csr-prediction").inner_text() == old_text  # nothing computed while dragging
    page.mouse.up()
    wait_for_text_change(page, ".csr-prediction", old_text)
    after_probs = displayed_probs(page)
    # the model's answer as displayed: nodule's best match is hidden, so "sick" drops
    assert after_probs["sick"][1] < before_probs["sick"][1] - 0.002
    assert after_probs["sick"][0] == before_probs["sick"][1]  # the grey "before" bars stay

    inner = (slice(int(box["y0"]) + 5, int(box["y1"]) - 4), slice(int(box["x0"]) + 5, int(box["x1"]) - 4))
    far = (slice(-60, -5), slice(-80, -5))  # the opposite corner, cells away from the box

    def changed(pixels):
        return np.abs(pixels[inner].astype(int) - before[inner].astype(int)).mean() > 3 and has_negative_edge(pixels, box)

    after = wait_for_pixels(page, changed)
    # inside the negative box the heatmap faded out; far from it nothing moved
    assert np.abs(after[far].astype(int) - before[far].astype(int)).max() <= 2

    # reject a concept with its checkbox: "tb" depends on cavity only
    old_text = page.locator(".csr-prediction").inner_text()
    page.locator(".csr-concept-toggle", has_text="cavity").locator("input").click()
    wait_for_text_change(page, ".csr-prediction", old_text)
    rejected_probs = displayed_probs(page)
    assert rejected_probs["tb"][1] != after_probs["tb"][1]
    assert "rejected" in page.locator(".csr-concept-row", has_text="cavity").inner_text()
    page.screenshot(path=str(artifacts / f"{name}-explorer.png"), full_page=True)
    return box


def test_explorer_in_jupyterlab(tmp_path, browser_context, artifacts):
    root = tmp_path / "root"
    harness.prepare_root(root)
    errors = []
    with harness.jupyter_lab(root) as (url, token, log):
        page = browser_context.new_page()
        page.on("pageerror", lambda error: errors.append(str(error)))
        harness.open_notebook_in_lab(page, url, token, "explorer.ipynb", timeout=TIMEOUT)
        box = exercise(page, artifacts, "jupyterlab")

        # a page reload: the widgets come back from the kernel and redraw on client_ready
        page.evaluate("() => window.jupyterapp.commands.execute('docmanager:save')")
        page.wait_for_function("() => !window.jupyterapp.shell.currentWidget.context.model.dirty", timeout=30_000)
        page.reload()
        page.locator(".csr-canvas").wait_for(timeout=TIMEOUT)
        wait_for_pixels(page, lambda p: p[..., 3].min() == 255 and p[..., :3].std() > 5 and has_negative_edge(p, box), timeout=60)
        assert "rejected" in page.locator(".csr-concept-row", has_text="cavity").inner_text()
        page.screenshot(path=str(artifacts / "jupyterlab-explorer-reloaded.png"), full_page=True)
    canvas_errors = [e for e in errors if "canvas" in e.lower() or "ipycanvas" in e.lower()]
    assert not canvas_errors, canvas_errors


def test_explorer_in_voila(tmp_path, browser_context, artifacts):
    root = tmp_path / "root"
    harness.prepare_root(root)
    errors = []
    with harness.voila(root, "explorer.ipynb") as (url, log):
        page = browser_context.new_page()
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(url, timeout=TIMEOUT)
        exercise(page, artifacts, "voila")
    assert not [e for e in errors if "canvas" in e.lower()], errors
