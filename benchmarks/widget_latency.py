"""CSRExplorer latency in a real browser: mouse-up -> new heatmap and prediction drawn.

JupyterLab 4 on 127.0.0.1, Debian's Chromium driven by Playwright (tests/browser/harness.py),
CPU. Each iteration drags a NEGATIVE box over one of the shown concept's strongest regions,
and times, in the page, from the canvas's mouseup event to the moment both the canvas
pixels inside the box (the heatmap fading there) and the prediction text have changed;
then undoes it (key "z"). Uses the bundled model (`load_pretrained("synthetic-cxr")`)
when installed, else an untrained model of the bundled size. Target: median <= 80 ms.

    python benchmarks/widget_latency.py [--iterations 30] [--no-nodelay] [--json out.json]

--no-nodelay leaves Nagle's algorithm on for the kernel websocket (stock jupyter_server)
for comparison; by default the csr_widgets.widgets.server extension turns it off.
The kernel-side work of one update (reason + heatmap + panel, dummy comm) is also reported.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "browser"))

from tests.browser import harness  # noqa: E402

PROBE = """([x, y, w, h]) => {
    const canvas = document.querySelector('.csr-canvas');
    const ctx = canvas.getContext('2d');
    const prediction = document.querySelector('.csr-prediction');
    const region = () => {
        const d = ctx.getImageData(x, y, w, h).data;
        let s = 0;
        for (let i = 0; i < d.length; i += 4) s += d[i] * 3 + d[i + 1] * 5 + d[i + 2] * 7 + (i % 97);
        return s;
    };
    const state = {up: null, text: null, canvas: null, base: region(), baseText: prediction.innerText};
    window.csrProbe = state;
    canvas.addEventListener('mouseup', () => { state.up = performance.now(); }, {capture: true, once: true});
    const observer = new MutationObserver(() => {
        if (state.up !== null && state.text === null && prediction.innerText !== state.baseText) {
            state.text = performance.now();
            observer.disconnect();
        }
    });
    observer.observe(prediction, {subtree: true, childList: true, characterData: true});
    // a 1-4 ms poll of the pixels (rAF would quantise to frames)
    const poll = () => {
        if (state.up !== null && state.canvas === null && region() !== state.base) state.canvas = performance.now();
        if (state.canvas === null) setTimeout(poll, 1);
    };
    poll();
}"""

NOTEBOOK_CELLS = [
    "from scene import build_benchmark_explorer, strongest_regions\n"
    "ex, model_name = build_benchmark_explorer()\nex",
    "import json\nprint('SCENE ' + json.dumps({'boxes': strongest_regions(ex), 'model': model_name, "
    "'canvas': list(ex.geometry.canvas_size)}))",
]


def write_notebook(root: Path) -> str:
    import nbformat

    notebook = nbformat.v4.new_notebook()
    notebook.metadata = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}
    notebook.cells = [nbformat.v4.new_code_cell(source) for source in NOTEBOOK_CELLS]
    nbformat.write(notebook, root / "latency.ipynb")
    (root / "scene.py").write_text(harness.SCENE.read_text())
    return "latency.ipynb"


def measure(page, box: dict, timeout: float = 5.0) -> tuple[float | None, float | None]:
    """One negative box: (mouse-up -> canvas changed, mouse-up -> prediction changed) in ms."""
    start, end = (box["x0"], box["y0"]), (box["x1"], box["y1"])
    (x0, y0), (x1, y1) = harness.to_page(page, start), harness.to_page(page, end)
    page.mouse.move(x0, y0)
    page.mouse.down()
    page.mouse.move(x1, y1, steps=8)
    time.sleep(0.3)  # the rubber band's last frame lands before the baseline snapshot
    inset = 5
    region = [int(box["x0"]) + inset, int(box["y0"]) + inset, max(1, int(box["x1"] - box["x0"]) - 2 * inset), max(1, int(box["y1"] - box["y0"]) - 2 * inset)]
    page.evaluate(PROBE, region)
    page.mouse.up()
    deadline = time.monotonic() + timeout
    state = None
    while time.monotonic() < deadline:
        state = page.evaluate("() => window.csrProbe")
        if state["canvas"] is not None and state["text"] is not None:
            break
        time.sleep(0.02)
    up = state["up"]
    canvas = None if state["canvas"] is None else state["canvas"] - up
    text = None if state["text"] is None else state["text"] - up
    return canvas, text


def undo(page, changed: bool) -> None:
    before = page.locator(".csr-prediction").inner_text()
    page.keyboard.press("z")  # the canvas has focus since the mouse-down
    if changed:
        page.wait_for_function("(old) => document.querySelector('.csr-prediction').innerText !== old", arg=before, timeout=10_000)
    time.sleep(0.3)


def kernel_side(repeats: int = 30) -> float:
    """Median ms of one update inside the kernel (reason + heatmap + panel), dummy comm."""
    from scene import build_benchmark_explorer, strongest_regions

    from csr_widgets import Box

    ex, _ = build_benchmark_explorer()
    regions = strongest_regions(ex)
    (ch, cw), (H, W) = ex.geometry.canvas_size, ex.image_size
    times = []
    for i in range(repeats):
        r, shift = regions[i % len(regions)], i // len(regions)  # a new box every time: no cache hits
        box = Box(int(r["x0"] * W / cw) + shift, int(r["y0"] * H / ch), int(r["x1"] * W / cw) + 1, int(r["y1"] * H / ch) + 1, positive=False)
        start = time.perf_counter()
        ex.boxes = [box]
        times.append((time.perf_counter() - start) * 1e3)
        ex.undo()
    return statistics.median(times)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-nodelay", action="store_true", help="leave Nagle's algorithm on (stock jupyter_server)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--verbose", action="store_true", help="print every drag's timings")
    args = parser.parse_args()
    reason = harness.missing_browser()
    if reason:
        sys.exit(f"cannot run the browser benchmark: {reason}")

    root = Path(tempfile.mkdtemp(prefix="csr-latency-"))
    name = write_notebook(root)
    latencies, canvas_only, text_only, misses = [], [], [], 0
    with harness.jupyter_lab(root, nodelay=not args.no_nodelay) as (url, token, _), harness.chromium() as context:
        page = context.new_page()
        harness.open_notebook_in_lab(page, url, token, name, timeout=240_000)
        scene = harness.scene_line(page, timeout=240_000)
        page.locator(".csr-canvas").wait_for()
        page.locator(".csr-mode button", has_text="negative").click()
        boxes = scene["boxes"]
        for i in range(args.warmup + args.iterations):
            canvas, text = measure(page, boxes[i % len(boxes)])
            if args.verbose:
                print(f"drag {i}: canvas {canvas} ms, prediction {text} ms", flush=True)
            if canvas is None or text is None:
                misses += 1  # the box changed nothing visible (kept out of the statistics)
            elif i >= args.warmup:
                latencies.append(max(canvas, text))
                canvas_only.append(canvas)
                text_only.append(text)
            undo(page, changed=text is not None)
    kernel_ms = kernel_side()
    result = {
        "model": scene["model"],
        "canvas": scene["canvas"],
        "nodelay": not args.no_nodelay,
        "iterations": len(latencies),
        "misses": misses,
        "median_ms": statistics.median(latencies),
        "p95_ms": percentile(latencies, 0.95),
        "median_canvas_ms": statistics.median(canvas_only),
        "median_prediction_ms": statistics.median(text_only),
        "kernel_update_ms": kernel_ms,
    }
    print(f"model: {result['model']}; canvas {result['canvas'][1]}x{result['canvas'][0]}; TCP_NODELAY: {result['nodelay']}")
    print(f"mouse-up -> heatmap and prediction drawn: median {result['median_ms']:.1f} ms, p95 {result['p95_ms']:.1f} ms "
          f"({result['iterations']} drags, {misses} without a visible change)")
    print(f"  canvas alone: median {result['median_canvas_ms']:.1f} ms; prediction text alone: {result['median_prediction_ms']:.1f} ms")
    print(f"  kernel-side work per update: median {kernel_ms:.1f} ms (target for the whole path: median <= 80 ms)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
