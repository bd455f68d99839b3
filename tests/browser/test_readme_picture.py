"""The README's picture, taken by a real browser: the bundled model in Voila with a concept
box on a nodule. Saved as test-artifacts/readme-explorer.png (docs/images/explorer.png is
a copy of it)."""
from __future__ import annotations

import time

from playwright.sync_api import expect

from . import harness

ROOT = ".csr-readme"


def test_the_readme_picture(tmp_path, browser_context, artifacts):
    root = tmp_path / "root"
    harness.prepare_root(root, harness.HERE / "readme.ipynb")
    with harness.voila(root, "readme.ipynb") as (url, _):
        page = browser_context.new_page()
        page.set_viewport_size({"width": 1100, "height": 900})
        page.goto(url, timeout=180_000)
        explorer = page.locator(ROOT)
        expect(explorer.locator(".csr-prediction")).to_contain_text("Prediction:", timeout=180_000)
        # the canvas has drawn the film (not a blank or half-drawn page)
        deadline = time.monotonic() + 120
        while harness.canvas_pixels(page, f"{ROOT} .csr-canvas")[..., :3].std() < 5:
            assert time.monotonic() < deadline, "the explorer's canvas stayed blank"
            time.sleep(0.5)
        # the picture shows what the README says: the nodule's heatmap and a box that was drawn
        # (undo is enabled only after a change; the fixture's one change is the box)
        expect(explorer.locator("select").first).to_have_value("nodule")
        expect(explorer.locator("button", has_text="undo")).to_be_enabled()
        expect(explorer.locator("button", has_text="redo")).to_be_disabled()
        explorer.screenshot(path=str(artifacts / "readme-explorer.png"))
        assert (artifacts / "readme-explorer.png").stat().st_size > 20_000
