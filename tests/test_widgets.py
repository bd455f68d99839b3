"""CSRExplorer, headless: built on the default dummy comm, driven by synthetic frontend
messages (the same dicts ipycanvas's JavaScript sends) and by setting its state."""
from __future__ import annotations

import base64
import copy
import io
import json
import time
import tracemalloc

import numpy as np
import pytest
import torch
from ipycanvas.canvas import COMMANDS
from PIL import Image

from csr_widgets import Box, CSRConfig, CSRModel, Interaction
from csr_widgets.model import FeatureGrid
from csr_widgets.widgets import CSRExplorer, render
from csr_widgets._inference import single_threaded
from csr_widgets.widgets.image import read_image

COMMAND_NAMES = {v: k for k, v in COMMANDS.items()}
CONCEPTS = ["nodule", "effusion", "cavity"]
CLASSES = ["healthy", "sick", "tb"]


def make_model(seed: int = 0, image_size: int = 128) -> CSRModel:
    torch.manual_seed(seed)
    config = CSRConfig(
        concepts=CONCEPTS, classes=CLASSES, backbone="resnet18", feature_stage=2, image_size=image_size,
        in_channels=1, prototypes_per_concept=4, embedding_dim=16,
        cell_offset=0.0,  # a resnet's, known: skips measuring it (a slow gradient probe)
    )
    model = CSRModel(config).eval()
    # A hand-set head: "sick" rises with nodule's scores, "tb" with cavity's; the scores are
    # standardised around their typical value, so a box moving them moves the prediction.
    with torch.no_grad():
        weight = torch.zeros(3, 3, 4)
        weight[1, 0] = 1.0
        weight[2, 2] = 1.0
        weight[0, 1] = 0.5
        model.task_head.linear.weight.copy_(weight.view(3, -1))
        model.task_head.linear.bias.zero_()
        model.task_head.score_mean.fill_(0.3)
        model.task_head.score_std.fill_(0.1)
        model.absent_baseline.fill_(0.05)
    return model


@pytest.fixture(scope="module")
def model() -> CSRModel:
    return make_model()


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    """A 160 x 240 (H x W) 8-bit image: a non-square aspect ratio on purpose."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:160, 0:240]
    blob = 200 * np.exp(-((x - 70) ** 2 + (y - 60) ** 2) / 300.0)
    return np.clip(40 + blob + rng.normal(0, 10, (160, 240)), 0, 255).astype(np.uint8)


@pytest.fixture
def messages(monkeypatch):
    """Every canvas command batch sent to the browser, decoded: a list of
    (canvas model id, command name, args, [buffers])."""
    from ipycanvas.canvas import _CANVAS_MANAGER

    sent = []
    state = {"canvas": None}

    def capture(content, buffers=None):
        commands = json.loads(bytes(buffers[0]))
        if commands and isinstance(commands[0], int):
            commands = [commands]
        rest = list(buffers[1:])
        for command in commands:
            name = COMMAND_NAMES[command[0]]
            if name == "switchCanvas":
                state["canvas"] = command[1][0].replace("IPY_MODEL_", "")
                continue
            count = command[2] if len(command) > 2 else 0
            taken, rest[:count] = rest[:count], []
            sent.append((state["canvas"], name, command[1], [bytes(b) for b in taken]))

    monkeypatch.setattr(_CANVAS_MANAGER, "send", capture)
    monkeypatch.setattr(_CANVAS_MANAGER, "_current_canvas", None)
    return sent


def event(ex: CSRExplorer, name: str, x: float = 0.0, y: float = 0.0, **extra) -> None:
    """A frontend event as the MultiCanvas view sends it (a custom comm message)."""
    content = {"event": name, "x": x, "y": y, **extra}
    ex.canvas._handle_msg({"content": {"data": {"method": "custom", "content": content}}, "buffers": []})


def drag(ex: CSRExplorer, start, end, steps: int = 5) -> None:
    event(ex, "mouse_down", *start)
    for t in np.linspace(0, 1, steps):
        event(ex, "mouse_move", start[0] + t * (end[0] - start[0]), start[1] + t * (end[1] - start[1]))
    event(ex, "mouse_up", *end)


def key(ex: CSRExplorer, name: str, shift=False, ctrl=False, meta=False) -> None:
    content = {"event": "key_down", "key": name, "shift_key": shift, "ctrl_key": ctrl, "meta_key": meta}
    ex.canvas._handle_msg({"content": {"data": {"method": "custom", "content": content}}, "buffers": []})


def direct(ex: CSRExplorer, boxes=(), rejected=(), alpha=None):
    """What the model itself answers for boxes given in model-input pixels."""
    with torch.inference_mode():
        return ex.model.reason(ex.encoding, Interaction(boxes=tuple(boxes), rejected=frozenset(rejected), alpha=alpha))


def assert_same_result(a, b) -> None:
    for name in ("similarity_maps", "importance_map", "scores", "logits", "probs", "contributions", "needs_review"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def png_array(buffer: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(buffer))
    assert image.format == "PNG" and image.mode == "RGBA", (image.format, image.mode)
    return np.asarray(image)


# ---------------------------------------------------------------------------- geometry


def test_image_shown_at_its_aspect_ratio_and_encoded_once(model, image):
    counter = {"encode": 0}
    original = model.encode

    def counting(images):
        counter["encode"] += 1
        return original(images)

    model.encode = counting
    try:
        ex = CSRExplorer(model, image, display_size=480)
        ex.boxes = [Box(10, 10, 50, 50)]
        ex.rejected = {"cavity"}
        ex.undo()
    finally:
        del model.encode
    assert counter["encode"] == 1
    assert ex.geometry.image_size == (160, 240)
    assert ex.geometry.canvas_size == (320, 480)  # 2x, aspect kept
    assert ex.geometry.model_size == (128, 128)
    assert (ex.canvas.width, ex.canvas.height) == (480, 320)
    assert ex.encoding.image_size == (128, 128)


def test_a_drag_becomes_the_exact_box_the_model_sees(model, image):
    ex = CSRExplorer(model, image, display_size=480)  # canvas = 2 x image pixels
    ex.mode = "negative"
    drag(ex, (41.0, 30.6), (140.2, 99.0))
    # canvas -> image: halve, snap outwards to whole pixels: x 20.5..70.1 -> 20..71, y 15.3..49.5 -> 15..50
    assert ex.boxes == [Box(20, 15, 71, 50, positive=False)]
    # image (240 x 160) -> model (128 x 128): x * 128/240, y * 128/160
    expected = Box(20 * 128 / 240, 15 * 0.8, 71 * 128 / 240, 50 * 0.8, positive=False)
    assert ex.geometry.box_to_model(ex.boxes[0]) == expected
    assert_same_result(ex.result, direct(ex, [expected]))


def test_drag_in_any_direction_and_clicks_do_not_make_boxes(model, image):
    ex = CSRExplorer(model, image, display_size=240)  # canvas = image pixels
    drag(ex, (100, 80), (60, 40))  # up-left
    assert ex.boxes == [Box(60, 40, 100, 80)]
    drag(ex, (10, 10), (11, 11))  # a click, not a box
    assert len(ex.boxes) == 1
    drag(ex, (200, 150), (400, 400))  # leaves the image: clipped to it
    assert ex.boxes[-1] == Box(200, 150, 240, 160)


# ---------------------------------------------------------------------------- the model's answer


def strongest_cell_box(ex: CSRExplorer, concept: str) -> Box:
    """The image-pixel box around the strongest feature cell of a concept's map."""
    k = ex.model.concepts.index(concept)
    cells = ex.baseline.similarity_maps[0, k].amax(0)
    i, j = divmod(int(cells.argmax()), cells.shape[-1])
    grid = ex.model.grid
    cy, cx = grid.offset + grid.stride * i, grid.offset + grid.stride * j  # model pixels
    H, W = ex.image_size
    sy, sx = H / 128, W / 128
    half = grid.stride * 1.5
    return Box(max(0, (cx - half) * sx), max(0, (cy - half) * sy), min(W, (cx + half + 1) * sx), min(H, (cy + half + 1) * sy), positive=False)


def test_a_negative_box_on_the_strongest_region_lowers_the_prediction_as_the_model_says(model, image):
    ex = CSRExplorer(model, image, concept="nodule")
    before = ex.result
    box = strongest_cell_box(ex, "nodule")
    ex.boxes = [box]
    after = ex.result
    assert_same_result(after, direct(ex, [ex.geometry.box_to_model(box)]))
    sick = CLASSES.index("sick")
    assert after.scores[0, 0].max() < before.scores[0, 0].max()  # nodule's best match is gone
    assert after.probs[0, sick] < before.probs[0, sick]
    assert after.contributions[0, sick, 0] < before.contributions[0, sick, 0]
    # the panel shows the new numbers
    assert f"{after.probs[0, sick].item():.3f}" in ex.panel.prediction.value
    assert f"{before.probs[0, sick].item():.3f}" in ex.panel.prediction.value  # "before" bars


def test_positive_box_and_alpha(model, image):
    ex = CSRExplorer(model, image)
    ex.boxes = [Box(30, 20, 90, 80)]
    ex.alpha = 0.5
    model_box = ex.geometry.box_to_model(Box(30, 20, 90, 80))
    assert_same_result(ex.result, direct(ex, [model_box], alpha=0.5))
    assert ex._alpha.value == 0.5
    ex._alpha.value = 0.1  # the slider, as the user moves it
    assert ex.alpha == 0.1
    assert_same_result(ex.result, direct(ex, [model_box], alpha=0.1))


def test_rejecting_from_python_equals_unticking(model, image):
    by_python = CSRExplorer(model, image)
    by_python.rejected = {"nodule"}
    by_click = CSRExplorer(model, image)
    by_click.panel.checks["nodule"].value = False  # the checkbox, as the browser sets it
    assert by_click.rejected == {"nodule"}
    assert_same_result(by_python.result, by_click.result)
    assert_same_result(by_python.result, direct(by_python, rejected={"nodule"}))
    assert by_python.panel.checks["nodule"].value is False  # the control shows the state
    assert "rejected" in by_python.panel.cells["nodule"].value
    # rejected concepts' scores become the absent baseline
    assert torch.allclose(by_python.result.scores[0, 0], model.absent_baseline[0])


def test_review_flag_is_shown_plainly(model, image):
    ex = CSRExplorer(model, image)
    probs = sorted(ex.result.probs[0].tolist(), reverse=True)
    needs = probs[0] - probs[1] < 0.3
    assert bool(ex.result.needs_review[0]) == needs
    assert ("Needs review" in ex.panel.confidence.value) == needs
    assert f"{probs[0] - probs[1]:.2f}" in ex.panel.confidence.value


# ---------------------------------------------------------------------------- undo / redo


def test_undo_restores_the_exact_previous_result_and_redo_returns(model, image):
    ex = CSRExplorer(model, image)
    results, states = [ex.result], [ex.to_dict()]
    ex.boxes = [Box(10, 10, 80, 70, positive=False)]
    results.append(ex.result), states.append(ex.to_dict())
    ex.rejected = {"effusion"}
    results.append(ex.result), states.append(ex.to_dict())
    drag(ex, (300, 200), (400, 300))
    results.append(ex.result), states.append(ex.to_dict())
    ex.alpha = 0.7
    results.append(ex.result), states.append(ex.to_dict())
    for i in range(len(results) - 2, -1, -1):
        assert ex.undo()
        assert_same_result(ex.result, results[i])
        assert ex.to_dict() == states[i]
    assert not ex.undo() and not ex.can_undo
    assert ex.panel.checks["effusion"].value is True
    for i in range(1, len(results)):
        assert ex.redo()
        assert_same_result(ex.result, results[i])
    assert not ex.redo()
    # a new change after an undo drops the redo branch
    ex.undo()
    ex.boxes = []
    assert not ex.can_redo


def test_undo_result_equals_a_fresh_computation(model, image):
    ex = CSRExplorer(model, image)
    ex.boxes = [Box(5, 5, 100, 100)]
    ex.boxes = [Box(5, 5, 100, 100), Box(120, 50, 200, 150, positive=False)]
    ex.undo()
    assert_same_result(ex.result, direct(ex, [ex.geometry.box_to_model(Box(5, 5, 100, 100))]))


def test_keys_modes_delete_undo_redo(model, image):
    ex = CSRExplorer(model, image, display_size=240)
    key(ex, "n")
    assert ex.mode == "negative"
    drag(ex, (10, 10), (60, 60))
    assert ex.boxes == [Box(10, 10, 60, 60, positive=False)]
    key(ex, "p")
    drag(ex, (100, 10), (150, 60))
    assert ex.boxes[-1].positive
    event(ex, "mouse_down", 30, 30)  # click inside the first box: selects it
    event(ex, "mouse_up", 30, 30)
    assert ex.selected == 0
    key(ex, "Delete")
    assert ex.boxes == [Box(100, 10, 150, 60)]
    key(ex, "z", ctrl=True)
    assert len(ex.boxes) == 2
    key(ex, "y")
    assert len(ex.boxes) == 1
    key(ex, "z")
    key(ex, "z", shift=True)  # shift+z redoes too
    assert len(ex.boxes) == 1
    ex.clear()
    assert ex.boxes == [] and ex.can_undo


def test_select_and_move_a_box(model, image):
    ex = CSRExplorer(model, image, display_size=480)  # 2 canvas px per image px
    ex.boxes = [Box(20, 20, 60, 50, positive=False)]
    key(ex, "s")
    drag(ex, (80, 70), (120, 50))  # grab inside, move +40, -20 canvas px = +20, -10 image px
    assert ex.boxes == [Box(40, 10, 80, 40, positive=False)]
    assert_same_result(ex.result, direct(ex, [ex.geometry.box_to_model(ex.boxes[0])]))
    drag(ex, (100, 40), (-500, -500))  # moved past the edge: stays inside the image
    assert ex.boxes == [Box(0, 0, 40, 30, positive=False)]
    ex.undo()
    assert ex.boxes == [Box(40, 10, 80, 40, positive=False)]


def test_the_drag_finishes_when_the_mouse_leaves(model, image):
    ex = CSRExplorer(model, image, display_size=240)
    event(ex, "mouse_down", 10, 10)
    event(ex, "mouse_move", 50, 40)
    event(ex, "mouse_out", 260, 40)
    assert ex.boxes == [Box(10, 10, 50, 40)]


# ---------------------------------------------------------------------------- responsiveness


def test_a_mouse_move_flood_leaves_no_backlog(model, image, messages):
    ex = CSRExplorer(model, image)
    messages.clear()
    calls = ex.reason_count
    for _ in range(100):  # hovering without a button: nothing computed, nothing sent
        event(ex, "mouse_move", 50, 50)
    assert messages == [] and ex.reason_count == calls

    event(ex, "mouse_down", 10, 10)
    start = time.perf_counter()
    for i in range(10_000):
        event(ex, "mouse_move", 10 + (i % 300), 10 + (i % 200))
    elapsed = time.perf_counter() - start
    # latest wins: the model runs and the box layer is redrawn at most once per frame
    # interval while dragging, whatever the event rate
    live = ex.reason_count - calls
    frames = sum(1 for c, name, _, _ in messages if name == "clear" and c == ex.canvas[3].model_id)
    assert 1 <= live <= elapsed / ex.frame_interval + 2
    assert frames <= elapsed / ex.frame_interval + 2
    assert elapsed < 20.0, f"{elapsed:.1f} s for 10,000 moves"
    assert ex._frames.pending is None  # no loop here: nothing left queued
    event(ex, "mouse_up", 300, 200)
    assert ex.reason_count <= calls + live + 1  # the exact final state (unless a frame had it)
    assert_same_result(ex.result, direct(ex, [ex.geometry.box_to_model(ex.boxes[0])]))


def test_the_trailing_frame_is_scheduled_once_on_the_event_loop(model, image, messages):
    import asyncio

    ex = CSRExplorer(model, image, frame_interval=0.05)

    async def flood():
        event(ex, "mouse_down", 10, 10)
        for i in range(1000):
            event(ex, "mouse_move", 20 + i % 100, 30)
        assert ex._frames.pending is not None  # one trailing frame, not a thousand
        event(ex, "mouse_move", 77.0, 66.0)
        await asyncio.sleep(0.12)
        assert ex._frames.pending is None

    messages.clear()
    asyncio.run(flood())
    rects = [args for _, name, args, _ in messages if name == "strokeRect"]
    # the live box at the latest position: (10, 10)-(77, 66) snapped outwards to image pixels
    x0, y0, x1, y1 = ex.geometry.box_to_canvas(ex.geometry.box_from_canvas(10, 10, 77, 66, positive=True))
    assert (x0, y0) <= (10, 10) and (x1, y1) >= (77, 66)
    assert rects and rects[-1] == [x0, y0, x1 - x0, y1 - y0]
    assert ex.result.probs.tolist() == direct(ex, [ex.geometry.box_to_model(ex.geometry.box_from_canvas(10, 10, 77, 66, True))]).probs.tolist()


def test_nothing_is_recomputed_or_resent_when_nothing_changed(model, image, messages):
    ex = CSRExplorer(model, image)
    ex.boxes = [Box(10, 10, 50, 50)]
    calls = ex.reason_count
    messages.clear()
    ex.boxes = [Box(10, 10, 50, 50)]  # the same state
    ex.rejected = set()
    assert ex.reason_count == calls and messages == []
    ex._opacity.value = 0.3  # opacity: a redraw of the layer, no new heatmap, no model
    names = [name for _, name, _, _ in messages]
    assert "drawImage" in names and "putImageData" not in names and ex.reason_count == calls
    messages.clear()
    ex._colormap.value = "cividis"  # colours: a new heatmap, still no model
    assert [name for _, name, _, _ in messages].count("putImageData") == 1 and ex.reason_count == calls
    ex.boxes = [Box(0, 0, 20, 20)]
    assert ex.reason_count == calls + 1
    ex.undo()  # back to a state computed before: answered from the cache
    ex.redo()
    assert ex.reason_count == calls + 1


def test_busy_state_is_visible_while_computing(model, image):
    ex = CSRExplorer(model, image)
    seen = []
    ex.observe(lambda change: seen.append(change["new"]), names="busy")
    ex.boxes = [Box(0, 0, 30, 30)]
    assert seen == [True, False]
    assert "csr-idle" in ex._busy.value


def test_memory_stays_flat_over_1000_interactions(model, image):
    ex = CSRExplorer(model, image, history_limit=50, display_size=240)
    actions = [
        lambda i: setattr(ex, "boxes", [Box(i % 100, i % 60, i % 100 + 40, i % 60 + 40, positive=bool(i % 2))]),
        lambda i: setattr(ex, "rejected", {CONCEPTS[i % 3]}),
        lambda i: drag(ex, (i % 200, 10), (i % 200 + 60, 90), steps=3),
        lambda i: ex.undo(),
        lambda i: setattr(ex, "alpha", (i % 10) / 10),
    ]
    for i in range(150):  # warm up: history and caches reach their bounds
        actions[i % len(actions)](i)
    tracemalloc.start()
    try:
        baseline = tracemalloc.take_snapshot()
        for i in range(150, 1150):
            actions[i % len(actions)](i)
        growth = sum(stat.size_diff for stat in tracemalloc.take_snapshot().compare_to(baseline, "filename"))
    finally:
        tracemalloc.stop()
    assert growth < 512 * 1024, f"{growth / 1024:.0f} KiB more after 1000 interactions"
    assert len(ex._history) <= 50 and len(ex._results) <= 16


# ---------------------------------------------------------------------------- what is sent


def test_the_heatmap_sent_is_the_expected_rgba_map(model, image, messages):
    ex = CSRExplorer(model, image, concept="cavity", colormap="cividis", opacity=0.4)
    messages.clear()
    ex.boxes = [Box(0, 0, 120, 80, positive=False)]
    heat_id = ex._layers.heat_source.model_id
    puts = [(c, args, bufs) for c, name, args, bufs in messages if name == "putImageData"]
    assert len(puts) == 1 and puts[0][0] == heat_id
    # the browser draws a "putImageData" over what is there: the hidden canvas is cleared first
    on_heat = [name for c, name, _, _ in messages if c == heat_id]
    assert on_heat == ["clear", "putImageData"]
    sent = png_array(puts[0][2][0])
    # independently: the cavity map (max over its prototypes), carried by the grid to the
    # 64 x 64 lattice (every 2nd model pixel: cell j sits on lattice coordinate (8j - 0.5) / 2)
    lattice = FeatureGrid(model.grid.channels, model.grid.stride / 2, (model.grid.offset - 0.5) / 2)
    k = CONCEPTS.index("cavity")
    cells = ex.result.similarity_maps[0, k].amax(0)
    vmax = float(ex.baseline.similarity_maps[0, k].amax(0).clamp(min=0).max())
    pixels = lattice.upsample(cells.clamp(min=0), (64, 64)).numpy()
    values = np.clip(pixels / vmax, 0, 1)
    lut = render.colormap_lut("cividis")
    expected = lut[(values * 255 + 0.5).astype(np.uint8)].copy()
    expected[..., 3] = (values * 255 + 0.5).astype(np.uint8)
    difference = np.abs(sent.astype(int) - expected.astype(int))
    assert difference.max() <= 1 and (difference > 0).mean() < 0.01  # float rounding at most
    assert sent.shape == (64, 64, 4)  # the small map, not the canvas
    # the masked region is transparent now: the box covers its cells
    assert sent[:20, :20, 3].max() == 0
    # and the overlay layer scales it over the whole canvas with the chosen opacity
    draws = [(c, args) for c, name, args, _ in messages if name == "drawImage"]
    assert draws[-1][0] == ex.canvas[1].model_id
    assert draws[-1][1][0] == f"IPY_MODEL_{heat_id}" and draws[-1][1][1:] == [0, 0, 512, 341]
    sets = [args for c, name, args, _ in messages if name == "set" and c == ex.canvas[1].model_id]
    assert [2, 0.4] in sets  # global_alpha = opacity


def test_cells_mode_sends_blocks_centred_on_the_cells(model, image, messages):
    ex = CSRExplorer(model, image, concept="nodule", smooth=False)
    sent = ex.heatmap  # 64 x 64: a lattice pixel is 2 x 2 model pixels
    assert (model.grid.stride, model.grid.offset) == (8, 0.0)
    # cell j is centred on model pixel 8j and covers model pixels [8j - 4, 8j + 4): lattice [4j - 2, 4j + 2)
    assert (sent[2:6, 2:6] == sent[2, 2]).all()  # cell (1, 1)
    assert (sent[0:2, 0:2] == sent[0, 0]).all()  # cell (0, 0): the half cell at the border
    assert (sent[58:64, 58:64] == sent[63, 63]).all()  # cell (15, 15): 8*15-4 = 116 -> lattice 58
    cells = ex.result.similarity_maps[0, 0].amax(0).numpy()
    assert np.unravel_index(sent[..., 3].argmax(), sent.shape[:2]) in {
        (y, x) for y in range(64) for x in range(64) if ((y * 2 + 4) // 8, (x * 2 + 4) // 8) == np.unravel_index(cells.argmax(), cells.shape)
    }


def test_every_image_sent_is_lossless_rgba(model, image, messages):
    ex = CSRExplorer(model, image)
    messages.clear()
    ex.redraw()
    puts = [bufs[0] for _, name, _, bufs in messages if name == "putImageData"]
    assert len(puts) == 2  # the image and the heatmap
    for buffer in puts:
        png_array(buffer)  # PNG, RGBA
    shown = png_array(puts[0])
    assert shown.shape == (341, 512, 4)


def test_client_ready_resets_the_canvas_manager_and_redraws(model, image, messages):
    from ipycanvas.canvas import _CANVAS_MANAGER

    ex = CSRExplorer(model, image)
    _CANVAS_MANAGER._current_canvas = ex.canvas[0]  # as left by earlier drawing
    messages.clear()
    ex.canvas[3]._handle_msg({"content": {"data": {"method": "custom", "content": {"event": "client_ready"}}}, "buffers": []})
    canvases = [c for c, name, _, _ in messages if name == "putImageData"]
    # the image layer gets its image again, though it was the manager's current canvas:
    # a switchCanvas was sent first (the capture records it as the canvas of the command)
    assert canvases == [ex.canvas[0].model_id, ex._layers.heat_source.model_id]


# ---------------------------------------------------------------------------- persistence, fallback


def test_json_round_trip_restores_the_session(model, image):
    ex = CSRExplorer(model, image, concept="effusion", smooth=False, opacity=0.3)
    ex.boxes = [Box(10, 10, 60, 50, positive=False), Box(100, 40, 200, 150), Box(20, 20, 40, 40, concept="nodule")]
    ex.rejected = {"cavity"}
    ex.alpha = 0.35
    text = ex.to_json()
    again = CSRExplorer.from_json(model, text, image)
    assert again.boxes == ex.boxes and again.rejected == ex.rejected and again.alpha == 0.35
    assert (again.concept, again._smooth.value, again._opacity.value) == ("effusion", False, 0.3)
    assert_same_result(again.result, ex.result)
    assert CSRExplorer.from_json(model, json.loads(text), image).boxes == ex.boxes
    with pytest.raises(ValueError, match="240x160"):
        CSRExplorer.from_json(model, text, image[:100])
    other = copy.deepcopy(model)
    other.config.concepts = ["a", "b", "c"]
    with pytest.raises(ValueError, match="concepts"):
        CSRExplorer.from_json(other, text, image)
    with pytest.raises(ValueError, match="format"):
        CSRExplorer.from_json(model, {"boxes": []}, image)


def test_a_session_saved_before_concept_boxes_still_loads(model, image):
    old = {  # written by csr_widgets 0.1.0, before boxes could name a concept
        "format": "csr_widgets.explorer/1", "image_size": [160, 240], "concepts": model.concepts,
        "classes": model.classes, "boxes": [{"x0": 10, "y0": 10, "x1": 60, "y1": 50, "positive": False}],
        "rejected": ["cavity"], "alpha": None, "view": {"concept": "nodule"},
    }
    ex = CSRExplorer.from_json(model, json.dumps(old), image)
    assert ex.boxes == [Box(10, 10, 60, 50, positive=False, concept=None)] and ex.rejected == {"cavity"}
    assert json.loads(ex.to_json())["boxes"][0]["concept"] is None
    with pytest.raises(ValueError, match="unknown concepts \\['tumour'\\]"):
        CSRExplorer.from_json(model, {**old, "boxes": [[1, 1, 9, 9, True, "tumour"]]}, image)


def test_a_concept_box_reaches_the_model_with_its_concept(model, image):
    ex = CSRExplorer(model, image)
    ex.boxes = [Box(30, 30, 90, 90, positive=False, concept="effusion")]
    expected = direct(ex, [ex.geometry.box_to_model(b) for b in ex.boxes])
    assert ex.geometry.box_to_model(ex.boxes[0]).concept == "effusion"
    assert_same_result(ex.result, expected)


def test_static_png_fallback(model, image):
    ex = CSRExplorer(model, image, display_size=240)
    ex.boxes = [Box(20, 20, 100, 80, positive=False)]
    bundle = ex._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    picture = png_array(base64.b64decode(bundle["image/png"]))
    assert picture.shape[1] == 240 and picture.shape[0] > 160  # the view plus a caption band
    assert tuple(picture[20, 60, :3]) == (0xD5, 0x5E, 0x00)  # the negative box's top edge
    assert "CSRExplorer" in bundle["text/plain"]
    assert png_array(ex.to_png(caption=False)).shape == (160, 240, 4)


# ---------------------------------------------------------------------------- input


def test_images_of_every_kind(model, tmp_path):
    rng = np.random.default_rng(1)
    grey16 = (rng.random((90, 70)) * 65535).astype(np.uint16)
    Image.fromarray(grey16).save(tmp_path / "a.png")
    Image.fromarray((rng.random((50, 80, 3)) * 255).astype(np.uint8)).save(tmp_path / "b.jpg")
    for source, size in [
        (tmp_path / "a.png", (90, 70)),  # 16-bit greyscale PNG
        (str(tmp_path / "b.jpg"), (50, 80)),  # RGB JPEG for a greyscale model
        (torch.rand(3, 64, 96), (64, 96)),
    ]:
        ex = CSRExplorer(model, source, display_size=100)
        assert ex.image_size == size
        assert ex.encoding.similarity_maps.shape[-2:] == (16, 16)
    for source, size in [(Image.open(tmp_path / "b.jpg"), (50, 80)), (rng.random((40, 30)), (40, 30))]:
        assert tuple(read_image(source).shape[-2:]) == size
    np.testing.assert_allclose(read_image(tmp_path / "a.png")[0].numpy(), grey16 / 65535.0, atol=1e-6)


def test_dicom_input(model, tmp_path):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = 48, 64
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    pixels = (np.arange(48 * 64).reshape(48, 64) % 4096).astype(np.uint16)
    ds.PixelData = pixels.tobytes()
    path = tmp_path / "x.dcm"
    ds.save_as(path, enforce_file_format=True)
    ex = CSRExplorer(model, path)
    assert ex.image_size == (48, 64)


def test_clear_errors_for_bad_input(model, image):
    with pytest.raises(TypeError, match="image"):
        CSRExplorer(model, [1, 2, 3])
    with pytest.raises(FileNotFoundError):
        CSRExplorer(model, "/no/such/image.png")
    with pytest.raises(ValueError):
        CSRExplorer(model, np.zeros((5, 20, 20, 2)))
    with pytest.raises(ValueError, match="NaN"):
        CSRExplorer(model, torch.full((1, 20, 20), float("nan")))
    with pytest.raises(TypeError, match="CSRModel"):
        CSRExplorer(object(), image)
    ex = CSRExplorer(model, image)
    with pytest.raises(ValueError, match="box"):
        ex.boxes = [(1, 2, 3)]
    with pytest.raises(ValueError, match="inverted"):
        ex.boxes = [(10, 10, 5, 5)]
    with pytest.raises(ValueError, match="outside"):
        ex.boxes = [Box(500, 500, 600, 600)]
    with pytest.raises(ValueError, match="Unknown concept"):
        ex.rejected = {"pacemaker"}
    with pytest.raises(ValueError, match="alpha"):
        ex.alpha = 2
    with pytest.raises(ValueError, match="mode"):
        ex.mode = "lasso"
    with pytest.raises(ValueError, match="colormap"):
        CSRExplorer(model, image, colormap="jet_typo")
    # boxes given as tuples and dicts are read as Box
    ex.boxes = [(1, 2, 30, 40, False), {"x0": 5, "y0": 5, "x1": 9, "y1": 9}]
    assert ex.boxes == [Box(1, 2, 30, 40, False), Box(5, 5, 9, 9)]
    assert ex.boxes != [] and ex.can_undo


def test_single_threaded_restores_the_thread_count():
    before = torch.get_num_threads()
    with single_threaded():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_runs_where_the_model_lives(image):
    model = make_model().cuda()
    ex = CSRExplorer(model, image)
    ex.boxes = [Box(10, 10, 60, 60, positive=False)]
    assert ex.encoding.similarity_maps.device.type == "cuda"
    assert ex.result.probs.device.type == "cuda"
    assert ex.heatmap.shape == (128, 128, 4)


def test_one_update_is_one_message_and_errors_do_not_stick(model, image, messages, monkeypatch):
    from ipycanvas.canvas import _CANVAS_MANAGER

    ex = CSRExplorer(model, image, display_size=240)
    batches = []
    original = _CANVAS_MANAGER.send
    monkeypatch.setattr(_CANVAS_MANAGER, "send", lambda content, buffers=None: (batches.append(1), original(content, buffers)))
    drag(ex, (10, 10), (80, 60), steps=1)
    batches.clear()
    event(ex, "mouse_up", 80, 60)  # no drag: nothing
    drag(ex, (100, 10), (160, 60), steps=0)
    assert len(batches) == 1  # rubber band cleared, heatmap, overlay, boxes: one message

    def broken(model_, maps):
        raise RuntimeError("hook failed")

    handle = model.register_similarity_hook(broken)
    try:
        with pytest.raises(RuntimeError):
            ex.boxes = [Box(0, 0, 10, 10)]
    finally:
        handle.remove()
    assert not _CANVAS_MANAGER._caching  # later drawing is not held back forever
    messages.clear()
    ex.redraw()
    assert any(name == "putImageData" for _, name, _, _ in messages)


def test_heatmap_choices(model, image):
    ex = CSRExplorer(model, image, concept=None)
    assert ex.heatmap is None and ex._concept.value == ""
    ex.concept = "effusion"
    ex.prototype = 2
    np.testing.assert_array_equal(ex.heatmap, render.heatmap_rgba(
        ex.result.similarity_maps[0, 1, 2].numpy(), *render.lattice(model.grid, (128, 128)),
        vmax=float(ex.baseline.similarity_maps[0, 1, 2].clamp(min=0).max())))
    assert ex._prototype.value == 2 and ex.prototype == 2
    ex.prototype = None
    assert ex._prototype.value == -1  # shown as "max over 4", not as an empty selection
    with pytest.raises(ValueError):
        ex.prototype = 7
    with pytest.raises(ValueError, match="Unknown concept"):
        ex.concept = "pacemaker"
