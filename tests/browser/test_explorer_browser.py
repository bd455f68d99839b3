"""CSRExplorer in a real browser: JupyterLab 4, Notebook 7 and Voila, Debian's Chromium,
real mouse and keyboard.

The fixture notebook (explorer.ipynb + scene.py) builds a small model whose "sick"
probability rises with the nodule concept's scores, shows the explorer with nodule's
heatmap, then the bundled model on an image unlike its training images, and prints where
nodule's strongest region is (canvas pixels). Each front end is checked at 1400 and 1000
px wide windows (JupyterLab with its file browser open): nothing overlaps or is cut, the
panel goes below the image when narrow; keys work after pointing at the image, with no
click, and never reach the notebook; the legend is there; the out-of-distribution image
says so; a NEGATIVE box drawn with the mouse over the strongest region changes what the
page shows. Screenshots go to test-artifacts/<front end>-<width>.png.
"""
from __future__ import annotations

import re
import time
from contextlib import contextmanager

import numpy as np
import pytest
from playwright.sync_api import expect

from csr_widgets.widgets.charts import OOD_WARNING

from . import harness

pytestmark = pytest.mark.browser
NEGATIVE_RGB = np.array([0xD5, 0x5E, 0x00])
TIMEOUT = 180_000  # ms: kernel start and the first torch import are slow on a busy 2-core box
MAIN = ".csr-test-main"
CANVAS = f"{MAIN} .csr-canvas"
PREDICTION = f"{MAIN} .csr-prediction"
WIDTHS = (1400, 1000)
PANEL_MIN = 280  # px, stylesheet.py: .csr-panel min-width

LAYOUT = """(root) => {
    const rect = e => { const b = e.getBoundingClientRect(); return [b.left, b.top, b.right, b.bottom]; };
    const shown = e => e.offsetParent !== null && e.getBoundingClientRect().width > 0;
    const name = e => (e.className || e.tagName).toString().slice(0, 40) + ' "' + (e.innerText || e.value || '').slice(0, 30) + '"';
    const leaves = [...root.querySelectorAll(
        'button, select, canvas.csr-canvas, input[type=checkbox], .widget-readout, .ui-slider, .widget-label, .widget-html-content')].filter(shown);
    const overlaps = [];
    for (let i = 0; i < leaves.length; i++) for (let j = i + 1; j < leaves.length; j++) {
        const [a, b] = [rect(leaves[i]), rect(leaves[j])];
        const w = Math.min(a[2], b[2]) - Math.max(a[0], b[0]), h = Math.min(a[3], b[3]) - Math.max(a[1], b[1]);
        if (w > 1 && h > 1 && !leaves[i].contains(leaves[j]) && !leaves[j].contains(leaves[i])) overlaps.push(name(leaves[i]) + ' x ' + name(leaves[j]));
    }
    const box = rect(root);
    const cut = leaves.filter(e => e.tagName !== 'SELECT' && e.tagName !== 'CANVAS' && e.scrollWidth > e.clientWidth + 1).map(name);
    const outside = leaves.filter(e => { const r = rect(e); return r[0] < box[0] - 1 || r[2] > box[2] + 1 || r[2] > window.innerWidth; }).map(name);
    const part = s => { const e = root.querySelector(s); return e ? rect(e) : null; };
    const canvas = root.querySelector('.csr-canvas');
    return {overlaps, cut, outside, root: box, overflow: root.scrollWidth - root.clientWidth,
            canvas: part('.csr-canvas'), panel: part('.csr-panel'), toolbar: part('.csr-toolbar'),
            controls: part('.csr-view-controls'), canvasPixels: canvas ? [canvas.width, canvas.height] : null};
}"""


def displayed_probs(page) -> dict[str, tuple[float, float]]:
    """class -> (before, after) as the prediction chart shows them."""
    probs = {}
    for row in page.locator(f"{PREDICTION} .csr-class").all():
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
        pixels = harness.canvas_pixels(page, CANVAS)
        if condition(pixels):
            time.sleep(0.3)
            settled = harness.canvas_pixels(page, CANVAS)
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


def wait_for_tool(page, words: str, timeout: float = 10_000) -> None:
    """Until the active tool button (the one marked active) reads ``words``."""
    page.wait_for_function(
        "([s, words]) => { const e = document.querySelector(s); return e !== null && e.innerText.includes(words); }",
        arg=[f"{MAIN} .csr-mode .mod-active", words], timeout=timeout,
    )


def check_nothing_overlaps(page, root: str) -> dict:
    """No two controls of the widget overlap, no text is cut, nothing sticks out of it."""
    layout = page.evaluate(LAYOUT, page.locator(root).element_handle())
    assert not layout["overlaps"], (root, layout["overlaps"])
    assert not layout["cut"], (root, layout["cut"])
    assert not layout["outside"] and layout["overflow"] <= 1, (root, layout["outside"], layout["overflow"])
    return layout


def check_layout(page, artifacts, name: str, width: int) -> dict:
    """At a window ``width`` px wide: nothing overlaps, is cut or sticks out (the explorer
    and the atlas explorer); the panel is beside the image when there is room for both,
    else below it."""
    page.set_viewport_size({"width": width, "height": 1700})
    time.sleep(1.0)  # the notebook re-lays out
    page.locator(".csr-atlas-explorer").scroll_into_view_if_needed()
    check_nothing_overlaps(page, ".csr-atlas-explorer")
    page.screenshot(path=str(artifacts / f"{name}-{width}-atlas.png"))
    page.locator(MAIN).scroll_into_view_if_needed()
    layout = check_nothing_overlaps(page, MAIN)
    page.screenshot(path=str(artifacts / f"{name}-{width}.png"))
    canvas, panel, toolbar, controls = layout["canvas"], layout["panel"], layout["toolbar"], layout["controls"]
    room = layout["root"][2] - layout["root"][0]
    if room >= layout["canvasPixels"][0] + PANEL_MIN + 12:
        assert panel[0] >= canvas[2] and panel[1] < canvas[3], f"the panel should be beside the image: {layout}"
    else:
        assert panel[1] >= canvas[3], f"the panel should be below the image at {room:.0f} px: {layout}"
    assert toolbar[3] <= canvas[1] + 1 and controls[1] >= max(canvas[3], panel[3]) - 1
    return layout


def check_keys(page, cell_types=None) -> None:
    """Pointing at the image, with no click, gives it the keys (with a visible focus
    ring); the keys it handles never reach the notebook (r would make a Raw cell)."""
    page.mouse.move(0, 0)
    page.locator(f"{MAIN} .csr-mode button", has_text="look here").click()  # keys must work after a click elsewhere too
    before = cell_types() if cell_types else None
    x, y = harness.to_page(page, (200, 150), CANVAS)
    page.mouse.move(x, y, steps=3)  # hover only
    page.wait_for_function("(s) => document.activeElement === document.querySelector(s)", arg=CANVAS, timeout=10_000)
    assert page.evaluate("(s) => getComputedStyle(document.querySelector(s)).outlineStyle", CANVAS) != "none"
    assert "keys active" in page.locator(f"{MAIN} .csr-hint").inner_text()
    page.keyboard.press("n")
    wait_for_tool(page, "not here")
    for unbound in ("r", "m", "y", "z"):  # notebook shortcuts in command mode; y/z are ours (redo/undo: nothing to do)
        page.keyboard.press(unbound)
    page.keyboard.press("s")
    wait_for_tool(page, "select")
    if cell_types:
        assert cell_types() == before, "a key pressed on the explorer reached the notebook"
    page.keyboard.press("n")
    wait_for_tool(page, "not here")


def exercise(page, artifacts, name: str, cell_types=None) -> dict:
    """Layout at both widths, keys, legend, the OOD warning; then a negative box over the
    strongest region and a concept toggle, and what the page shows after them."""
    scene = harness.scene_line(page, timeout=TIMEOUT)
    box = scene["box"]
    page.locator(CANVAS).wait_for(timeout=TIMEOUT)
    page.wait_for_function("(s) => document.querySelector(s)", arg=f"{PREDICTION} .csr-class", timeout=TIMEOUT)
    for width in WIDTHS:
        check_layout(page, artifacts, name, width)
    # the legend, and the out-of-distribution image's warning instead of "Confident"
    assert "Heatmap:" in page.locator(f"{MAIN} .csr-colour-bar").inner_text()
    assert "score" in page.locator(f"{MAIN} .csr-legend").inner_text()
    ood = page.locator(".csr-test-ood .csr-review-flag").inner_text()
    assert OOD_WARNING in ood and "Confident" not in ood
    page.set_viewport_size({"width": WIDTHS[0], "height": 1700})
    page.locator(MAIN).scroll_into_view_if_needed()

    before_probs = displayed_probs(page)
    assert before_probs["sick"][1] == pytest.approx(scene["probs"][1], abs=0.0011)
    before = wait_for_pixels(page, lambda p: p[..., 3].min() == 255 and p[..., :3].std() > 5)
    check_keys(page, cell_types)  # ends with the negative tool chosen by its key

    old_text = page.locator(PREDICTION).inner_text()
    (x0, y0), (x1, y1) = harness.to_page(page, (box["x0"], box["y0"]), CANVAS), harness.to_page(page, (box["x1"], box["y1"]), CANVAS)
    page.mouse.move(x0, y0)
    page.mouse.down()
    page.mouse.move(x1, y1, steps=12)
    # while dragging, the live box reaches the pointer and the prediction follows it
    wait_for_pixels(page, lambda p: has_negative_edge(p, box, "y1"))
    wait_for_text_change(page, PREDICTION, old_text)
    page.mouse.up()
    time.sleep(0.5)
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

    # reject a concept with its checkbox: "tb" depends on cavity only; the row greys out
    old_text = page.locator(PREDICTION).inner_text()
    page.locator(f"{MAIN} .csr-concept-toggle", has_text="cavity").locator("input").click()
    wait_for_text_change(page, PREDICTION, old_text)
    rejected_probs = displayed_probs(page)
    assert rejected_probs["tb"][1] != after_probs["tb"][1]
    row = page.locator(f"{MAIN} .csr-concept-row", has_text="cavity")
    expect(row).to_contain_text("rejected", timeout=10_000)
    expect(row).to_have_css("opacity", "0.45", timeout=10_000)  # greyed (page.py)
    # the click on the checkbox gave the keys back to the image: z undoes the rejection
    page.wait_for_function("(s) => document.activeElement === document.querySelector(s)", arg=CANVAS, timeout=10_000)
    old_text = page.locator(PREDICTION).inner_text()
    page.keyboard.press("z")
    wait_for_text_change(page, PREDICTION, old_text)
    expect(row).not_to_contain_text("rejected", timeout=10_000)  # the rows follow the prediction
    page.keyboard.press("y")
    expect(row).to_contain_text("rejected", timeout=10_000)
    page.screenshot(path=str(artifacts / f"{name}-explorer.png"), full_page=True)
    return box


def lab_cell_types(page):
    return lambda: page.evaluate("() => window.jupyterapp.shell.currentWidget.content.widgets.map(c => c.model.type)")


@contextmanager
def opened(front_end: str, tmp_path, browser_context):
    """The fixture notebook run in a front end ("jupyterlab", "notebook7", "voila"); yields
    the page. Page errors that mention the canvas fail the test."""
    root = tmp_path / "root"
    harness.prepare_root(root)
    errors = []
    server = harness.voila(root, "explorer.ipynb") if front_end == "voila" else (
        harness.jupyter_lab(root) if front_end == "jupyterlab" else harness.notebook7(root))
    with server as served:
        page = browser_context.new_page()
        page.on("pageerror", lambda error: errors.append(str(error)))
        if front_end == "voila":
            page.goto(served[0], timeout=TIMEOUT)
        else:
            url, token, _ = served
            harness.open_notebook_in_lab(page, url, token, "explorer.ipynb", timeout=TIMEOUT,
                                         front_end="lab" if front_end == "jupyterlab" else "notebook")
        yield page
    canvas_errors = [e for e in errors if "canvas" in e.lower()]
    assert not canvas_errors, canvas_errors


def test_explorer_in_jupyterlab(tmp_path, browser_context, artifacts):
    with opened("jupyterlab", tmp_path, browser_context) as page:
        assert page.locator(".jp-FileBrowser").is_visible()  # the narrow case: file browser open
        box = exercise(page, artifacts, "jupyterlab", lab_cell_types(page))

        # a page reload: the widgets come back from the kernel and redraw on client_ready
        page.evaluate("() => window.jupyterapp.commands.execute('docmanager:save')")
        page.wait_for_function("() => !window.jupyterapp.shell.currentWidget.context.model.dirty", timeout=30_000)
        page.reload()
        page.locator(CANVAS).wait_for(timeout=TIMEOUT)
        wait_for_pixels(page, lambda p: p[..., 3].min() == 255 and p[..., :3].std() > 5 and has_negative_edge(p, box), timeout=60)
        assert "rejected" in page.locator(f"{MAIN} .csr-concept-row", has_text="cavity").inner_text()
        page.screenshot(path=str(artifacts / "jupyterlab-explorer-reloaded.png"), full_page=True)


def test_explorer_in_notebook7(tmp_path, browser_context, artifacts):
    with opened("notebook7", tmp_path, browser_context) as page:
        exercise(page, artifacts, "notebook7", lab_cell_types(page))


def test_explorer_in_voila(tmp_path, browser_context, artifacts):
    with opened("voila", tmp_path, browser_context) as page:
        exercise(page, artifacts, "voila")

        # a window narrower than the canvas: it shrinks, and the mouse still lands exactly
        page.set_viewport_size({"width": 420, "height": 1200})
        time.sleep(1.0)
        page.locator(CANVAS).scroll_into_view_if_needed()
        shown = page.locator(CANVAS).bounding_box()
        assert shown["width"] < 480 - 40
        target = {"x0": 300.0, "y0": 200.0, "x1": 420.0, "y1": 290.0}  # canvas pixels (480 x 320)
        page.keyboard.press("Escape")
        harness.drag(page, (target["x0"], target["y0"]), (target["x1"], target["y1"]), selector=CANVAS)
        wait_for_pixels(page, lambda p: has_negative_edge(p, target, "y0") and has_negative_edge(p, target, "y1"))
        page.screenshot(path=str(artifacts / "voila-420.png"), full_page=True)
