"""CSRExplorer in a real browser: mouse-up to the new heatmap and prediction drawn, and
updates per second while a box is dragged.

JupyterLab 4 on 127.0.0.1, Debian's Chromium driven by Playwright (tests/browser/harness.py),
CPU. For each model (--model bundled | paper | both):

1. mouse-up -> drawn: with the live preview off (``frame_interval`` set to an hour, so the
   release does the whole update: the worst case, when the pointer stopped between two
   frames), each iteration drags a NEGATIVE box over one of the shown concept's strongest
   regions and times, in the page, from the canvas's mouseup event to the moment both the
   canvas pixels inside the box and the prediction text have changed; then undoes it (z).
2. live drag: with the default ``frame_interval`` (1/60 s), a 60 Hz pointer (mouse events
   dispatched in the page) moves along a zigzag over the image for --drag-seconds; the page counts the frames in
   which the canvas changed (the live box, its cells and the heatmap follow the pointer)
   and the prediction text updates; both per second.

The bundled model is `load_pretrained("synthetic-cxr")` (else an untrained one of its
size); the paper-size model is an untrained resnet18 at 224 px with K=14, M=100, D=256
(as benchmarks/interaction.py). Targets (issue 10): >= 30 updates/s while dragging;
mouse-up to drawn <= 50 ms median at paper size with a stock server (--no-nodelay).

    python benchmarks/widget_latency.py [--model both] [--iterations 30] [--no-nodelay] [--json out.json]

--no-nodelay leaves Nagle's algorithm on for the kernel websocket (stock jupyter_server)
for comparison; by default the csr_widgets.widgets.server extension turns it off.
The kernel-side work (dummy comm, this process) of one update and one live frame is also
reported.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "browser"))

from tests.browser import harness  # noqa: E402

CANVAS = ".csr-canvas"
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

# Counts the display frames in which the canvas was redrawn while dragging: ipycanvas
# repaints the visible canvas (clearRect, then each layer) whenever a layer changed; a
# requestAnimationFrame loop counts the frames that saw a repaint (reading the pixels
# instead would itself load the page's main thread, which also runs the pointer).
LIVE_PROBE = """() => {
    const canvas = document.querySelector('.csr-canvas');
    const ctx = canvas.getContext('2d');  // the same context ipycanvas draws with
    const prediction = document.querySelector('.csr-prediction');
    const state = {frames: 0, texts: 0, painted: false, running: true};
    if (!ctx.csrCounting) {
        const clear = ctx.clearRect.bind(ctx);
        ctx.clearRect = (...args) => { if (window.csrLive) window.csrLive.painted = true; return clear(...args); };
        ctx.csrCounting = true;
    }
    window.csrLive = state;
    const observer = new MutationObserver(() => { state.texts += 1; });
    observer.observe(prediction, {subtree: true, childList: true, characterData: true});
    const frame = () => {
        if (!state.running) { observer.disconnect(); return; }
        if (state.painted) { state.frames += 1; state.painted = false; }
        requestAnimationFrame(frame);
    };
    requestAnimationFrame(frame);
}"""


def notebook_cells(kind: str) -> list[str]:
    return [
        "from scene import build_benchmark_explorer, strongest_regions\n"
        f"ex, model_name = build_benchmark_explorer({kind!r})\nex",
        "import json\nprint('SCENE ' + json.dumps({'boxes': strongest_regions(ex), 'model': model_name, "
        "'canvas': list(ex.geometry.canvas_size)}))",
    ]


def write_notebook(root: Path, kind: str) -> str:
    import nbformat

    notebook = nbformat.v4.new_notebook()
    notebook.metadata = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}
    notebook.cells = [nbformat.v4.new_code_cell(source) for source in notebook_cells(kind)]
    name = f"latency-{kind}.ipynb"
    nbformat.write(notebook, root / name)
    (root / "scene.py").write_text(harness.SCENE.read_text())
    return name


def run_in_kernel(page, code: str) -> None:
    """Execute code in the notebook's kernel (as a cell would), waiting for it to finish."""
    page.evaluate(
        """async (code) => {
            const kernel = window.jupyterapp.shell.currentWidget.sessionContext.session.kernel;
            await kernel.requestExecute({code}).done;
        }""",
        code,
    )


def kernel_value(page, expression: str) -> str:
    """repr of a Python expression evaluated in the notebook's kernel."""
    return page.evaluate(
        """async (expression) => {
            const kernel = window.jupyterapp.shell.currentWidget.sessionContext.session.kernel;
            const reply = await kernel.requestExecute({code: '', silent: true, user_expressions: {v: expression}}).done;
            return reply.content.user_expressions.v.data['text/plain'];
        }""",
        expression,
    )


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


def undo(page) -> None:
    """Undo the one change made (key z: the image has the keys while the pointer is over
    it), until the undo button says there is nothing left to undo."""
    page.keyboard.press("z")
    page.locator(".csr-toolbar button", has_text="undo").wait_for(state="visible")
    page.wait_for_function("() => [...document.querySelectorAll('.csr-toolbar button')].find(b => b.innerText.includes('undo')).disabled",
                           timeout=10_000)
    time.sleep(0.3)


# A 60 Hz pointer inside the page: mouse events dispatched on the canvas on a timer, a
# zigzag across the image (Playwright's mouse waits for each event's round trip to the
# renderer, which is busy drawing: on this machine it managed only ~25 events/s).
DRIVER = """([x0, y0, seconds, rate]) => new Promise(resolve => {
    const canvas = document.querySelector('.csr-canvas');
    const rect = canvas.getBoundingClientRect();
    const sx = rect.width / canvas.width, sy = rect.height / canvas.height;
    const fire = (type, x, y) => canvas.dispatchEvent(new MouseEvent(type, {
        clientX: rect.left + x * sx, clientY: rect.top + y * sy, bubbles: true, buttons: type === 'mouseup' ? 0 : 1}));
    fire('mousedown', x0, y0);
    const start = performance.now();
    let events = 0, x = x0, y = y0;
    const timer = setInterval(() => {
        const t = (performance.now() - start) / 1000;
        if (t >= seconds) {
            clearInterval(timer);
            fire('mouseup', x, y);
            resolve({events, seconds: t});
            return;
        }
        const phase = t / 1.5;  // one sweep across the image every 1.5 s
        x = x0 + 40 + (canvas.width - x0 - 50) * Math.abs(Math.sin(Math.PI * phase));
        y = y0 + 40 + (canvas.height - y0 - 50) * Math.abs(Math.sin(Math.PI * phase * 0.7));
        fire('mousemove', x, y);
        events += 1;
    }, 1000 / rate);
})"""


def live_drag(page, box: dict, seconds: float, rate: float = 60.0) -> dict:
    """Drag a box corner along a zigzag for ``seconds`` at ``rate`` pointer events per second;
    the page counts the pictures the canvas showed and the prediction updates."""
    page.evaluate(LIVE_PROBE)
    reasoned = int(kernel_value(page, "ex.reason_count"))
    driven = page.evaluate(DRIVER, [box["x0"], box["y0"], seconds, rate])
    state = page.evaluate("() => { window.csrLive.running = false; return window.csrLive; }")
    reasoned = int(kernel_value(page, "ex.reason_count")) - reasoned - 1  # the mouse-up's exact update
    time.sleep(0.5)
    x, y = harness.to_page(page, (box["x0"] + 5, box["y0"] + 5))
    page.mouse.move(x, y)  # the keys go to the image under the pointer
    undo(page)
    elapsed = driven["seconds"]
    return {"seconds": elapsed, "pointer_events_per_s": driven["events"] / elapsed,
            "canvas_updates_per_s": state["frames"] / elapsed, "prediction_updates_per_s": state["texts"] / elapsed,
            "kernel_frames_per_s": reasoned / elapsed}


def kernel_side(kind: str, repeats: int = 30) -> dict:
    """Median ms, in this process (dummy comm), of one committed update (reason, heatmap,
    panel, check next) and of one live frame while dragging."""
    import torch
    from scene import build_benchmark_explorer, strongest_regions

    from csr_widgets import Box
    from csr_widgets.model import rank_questions
    from csr_widgets._inference import single_threaded

    ex, _ = build_benchmark_explorer(kind)
    ex.questions = False  # "check next" is ranked after the update is drawn: timed on its own below
    regions = strongest_regions(ex)
    (ch, cw), (H, W) = ex.geometry.canvas_size, ex.image_size
    updates = []
    for i in range(repeats):
        r, shift = regions[i % len(regions)], i // len(regions)  # a new box every time: no cache hits
        box = Box(int(r["x0"] * W / cw) + shift, int(r["y0"] * H / ch), int(r["x1"] * W / cw) + 1, int(r["y1"] * H / ch) + 1, positive=False)
        start = time.perf_counter()
        ex.boxes = [box]
        updates.append((time.perf_counter() - start) * 1e3)
        ex.undo()
    ex.frame_interval = 0.0  # every move is a frame
    r = regions[0]
    ex._on_mouse_down(r["x0"], r["y0"])
    frames = []
    for i in range(repeats):
        start = time.perf_counter()
        ex._on_mouse_move(r["x1"] + i % 7, r["y1"] + i % 5)
        frames.append((time.perf_counter() - start) * 1e3)
    ranking = []
    for i in range(repeats):
        start = time.perf_counter()
        with torch.inference_mode(), single_threaded():  # as the explorer runs it
            rank_questions(ex.model, ex.encoding, ex.state.interaction(ex.geometry.box_to_model))
        ranking.append((time.perf_counter() - start) * 1e3)
    return {"kernel_update_ms": statistics.median(updates), "kernel_frame_ms": statistics.median(frames),
            "kernel_questions_ms": statistics.median(ranking)}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def benchmark(kind: str, args) -> dict:
    root = Path(tempfile.mkdtemp(prefix="csr-latency-"))
    name = write_notebook(root, kind)
    latencies, canvas_only, text_only, misses = [], [], [], 0
    with harness.jupyter_lab(root, nodelay=not args.no_nodelay) as (url, token, _), harness.chromium() as context:
        page = context.new_page()
        harness.open_notebook_in_lab(page, url, token, name, timeout=240_000)
        scene = harness.scene_line(page, timeout=240_000)
        page.locator(CANVAS).wait_for()
        page.locator(".csr-mode button", has_text="not here").click()
        boxes = scene["boxes"]
        run_in_kernel(page, "ex.frame_interval = 3600.0  # live preview off: the release does the whole update")
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
            undo(page)
        run_in_kernel(page, "ex.frame_interval = 1 / 60  # the default")
        live = [live_drag(page, boxes[i % len(boxes)], args.drag_seconds) for i in range(args.drags)]
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
        "live": live,
        "canvas_updates_per_s": statistics.median(d["canvas_updates_per_s"] for d in live),
        "prediction_updates_per_s": statistics.median(d["prediction_updates_per_s"] for d in live),
        "pointer_events_per_s": statistics.median(d["pointer_events_per_s"] for d in live),
        "kernel_frames_per_s": statistics.median(d["kernel_frames_per_s"] for d in live),
        **kernel_side(kind),
    }
    print(f"model: {result['model']}; canvas {result['canvas'][1]}x{result['canvas'][0]}; TCP_NODELAY: {result['nodelay']}")
    print(f"  mouse-up -> heatmap and prediction drawn (live preview off): median {result['median_ms']:.1f} ms, "
          f"p95 {result['p95_ms']:.1f} ms ({result['iterations']} drags, {misses} without a visible change)")
    print(f"    canvas alone: median {result['median_canvas_ms']:.1f} ms; prediction text alone: {result['median_prediction_ms']:.1f} ms")
    print(f"  while dragging ({result['pointer_events_per_s']:.0f} pointer events/s): {result['kernel_frames_per_s']:.1f} live "
          f"updates/s computed in the kernel, {result['canvas_updates_per_s']:.1f} canvas pictures/s shown, "
          f"{result['prediction_updates_per_s']:.1f} prediction text changes/s (median of {len(live)} drags)")
    print(f"  kernel-side work: {result['kernel_update_ms']:.1f} ms per update, {result['kernel_frame_ms']:.1f} ms per live frame, "
          f"{result['kernel_questions_ms']:.1f} ms to rank 'check next' (after the update is drawn; medians)")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("bundled", "paper", "both"), default="both")
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--drags", type=int, default=3, help="live drags per model")
    parser.add_argument("--drag-seconds", type=float, default=3.0)
    parser.add_argument("--no-nodelay", action="store_true", help="leave Nagle's algorithm on (stock jupyter_server)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--verbose", action="store_true", help="print every drag's timings")
    args = parser.parse_args()
    reason = harness.missing_browser()
    if reason:
        sys.exit(f"cannot run the browser benchmark: {reason}")
    kinds = ("bundled", "paper") if args.model == "both" else (args.model,)
    results = [benchmark(kind, args) for kind in kinds]
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
