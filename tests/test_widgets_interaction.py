"""CSRExplorer, headless, as a clinician meets it: live drag, concept boxes and their
cells, "check next", keys and focus, honest confidence, the legend, inputs it refuses.

Driven like tests/test_widgets.py: synthetic frontend messages into the canvas, Python
setters, and the canvas commands captured on their way to the browser."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from PIL import Image

from csr_widgets import Box
from csr_widgets.model import rank_questions
from csr_widgets.model.interaction import footprint
from csr_widgets.widgets import CSRExplorer, charts, render
from csr_widgets.widgets.pointer import KEYMAP

from .test_widgets import assert_same_result, direct, event, image, key, messages, model  # noqa: F401 (fixtures)


def commands(messages, name: str, layer=None) -> list:
    return [args for canvas, n, args, _ in messages if n == name and (layer is None or canvas == layer.model_id)]


# ---------------------------------------------------------------------------- live drag


def test_while_dragging_the_answer_follows_the_box_and_mouse_up_is_exact(model, image, messages):
    ex = CSRExplorer(model, image, concept="nodule", display_size=240, frame_interval=0.0)  # a frame per move
    ex.mode = "negative"
    sick = ex.model.classes.index("sick")
    event(ex, "mouse_down", 20, 20)
    for end in ((60, 50), (90, 80), (130, 100)):
        event(ex, "mouse_move", *end)
        live = Box(20, 20, *end, positive=False)  # canvas = image pixels here
        # the model's answer for the box as it is now, shown before anything is committed
        assert_same_result(ex.result, direct(ex, [ex.geometry.box_to_model(live)]))
        assert f"{ex.result.probs[0, sick].item():.3f}" in ex.panel.prediction.value
        assert ex.boxes == [] and not ex.can_undo
    event(ex, "mouse_up", 131, 101)  # the exact final position, not the last frame's
    assert ex.boxes == [Box(20, 20, 131, 101, positive=False)]
    assert_same_result(ex.result, direct(ex, [ex.geometry.box_to_model(ex.boxes[0])]))
    # the live box was on the top layer; after mouse-up it is gone from there
    assert commands(messages, "clear", ex.canvas[3])
    assert ex._keys["live"] in (None, [])


def test_escape_cancels_a_drag_and_restores_the_answer(model, image):
    ex = CSRExplorer(model, image, display_size=240, frame_interval=0.0)
    before = ex.result
    event(ex, "mouse_down", 10, 10)
    event(ex, "mouse_move", 120, 90)
    assert not torch.equal(ex.result.probs, before.probs)
    key(ex, "Escape")
    assert ex.boxes == [] and ex._drag is None
    assert_same_result(ex.result, before)
    event(ex, "mouse_up", 120, 90)  # the release after Escape does nothing
    assert ex.boxes == []


def test_moving_a_box_live(model, image):
    ex = CSRExplorer(model, image, display_size=240, frame_interval=0.0)
    ex.boxes = [Box(20, 20, 60, 60, positive=False)]
    key(ex, "s")
    event(ex, "mouse_down", 30, 30)
    event(ex, "mouse_move", 80, 50)
    assert_same_result(ex.result, direct(ex, [ex.geometry.box_to_model(Box(70, 40, 110, 80, positive=False))]))
    assert ex.boxes == [Box(20, 20, 60, 60, positive=False)]  # not committed yet
    event(ex, "mouse_up", 80, 50)
    assert ex.boxes == [Box(70, 40, 110, 80, positive=False)]
    ex.undo()
    assert ex.boxes == [Box(20, 20, 60, 60, positive=False)]


# ---------------------------------------------------------------------------- concept boxes, cells


def test_new_boxes_act_on_all_concepts_or_on_the_heatmaps_concept(model, image, messages):
    ex = CSRExplorer(model, image, concept="effusion", display_size=240)
    assert ex.target == "all" and ex._target.options[1][0] == "effusion only (c)"
    key(ex, "c")
    assert ex.target == "shown" and ex._target.value == "shown"
    event(ex, "mouse_down", 10, 10), event(ex, "mouse_up", 50, 40)
    assert ex.boxes == [Box(10, 10, 50, 40, concept="effusion")]
    assert_same_result(ex.result, direct(ex, [ex.geometry.box_to_model(ex.boxes[0])]))
    ex.concept = "cavity"  # the choice follows the heatmap shown
    assert ex._target.options[1][0] == "cavity only (c)"
    key(ex, "n")
    event(ex, "mouse_down", 100, 50), event(ex, "mouse_up", 150, 90)
    assert ex.boxes[-1] == Box(100, 50, 150, 90, positive=False, concept="cavity")
    key(ex, "a")
    event(ex, "mouse_down", 160, 100), event(ex, "mouse_up", 200, 140)
    assert ex.boxes[-1].concept is None
    labels = [args[0] for args in commands(messages, "fillText", ex.canvas[2])]
    assert {"+ effusion", "\u2212 cavity", "\u2212 all concepts"} <= set(labels)
    ex.concept = None  # no heatmap: a "shown" box acts on all concepts
    ex.target = "shown"
    assert ex.view.box_concept is None and ex._target.options[1][0] == "the heatmap's concept (c)"


def test_the_cells_drawn_under_a_box_are_the_cells_the_model_uses(model, image, messages):
    # 240 x 160 image shown at 240 x 160, model input 128 x 128, stride 8 (16 x 16 cells,
    # cell j centred on model pixel 8j: cell 0 owns model pixels [0, 4), cell 1 [4, 12), ...)
    ex = CSRExplorer(model, image, display_size=240)
    messages.clear()
    ex.boxes = [Box(0, 0, 10, 10, positive=False)]
    # by hand: image x [0, 10) -> model [0, 5.33): pixels 0..5, owners 0..1; y [0, 10) -> [0, 8): owners 0..1
    # cells 0..1 span model pixels [0, 12) -> canvas x 12 * 240/128 = 22.5, y 12 * 160/128 = 15
    fills = commands(messages, "fillRect", ex.canvas[2])
    assert fills[0] == [0.0, 0.0, 22.5, 15.0]
    lines = commands(messages, "strokeLine", ex.canvas[2])
    assert [7.5, 0.0, 7.5, 15.0] in lines and [0.0, 5.0, 22.5, 5.0] in lines  # the border between cells 0 and 1
    # and the model acts exactly there: A = 0 on those 2 x 2 cells, 1 everywhere else
    importance = ex.result.importance_map[0]
    assert (importance[:2, :2] == 0).all() and importance.sum() == importance.numel() - 4
    rows, cols = footprint(ex.geometry.box_to_model(ex.boxes[0]), 128, 128, model.grid, (16, 16))
    assert (rows, cols) == (slice(0, 2), slice(0, 2))


# ---------------------------------------------------------------------------- check next


def test_check_next_is_the_top_ranked_question_and_an_answer_is_undoable(model, image):
    ex = CSRExplorer(model, image)
    ranked = rank_questions(model, ex.encoding)
    assert (ex.question.kind, ex.question.concept) == (ranked[0].kind, ranked[0].concept)
    assert "Check next:" in ex.panel.question.value and ex.panel.yes.layout.display != "none"
    first = ex.question
    ex.panel.no.click()  # the "no" button, as the browser clicks it
    if first.kind == "present":
        assert first.concept in ex.rejected
    assert (first.kind, first.concept) in ex.state.answered
    assert ex.question is None or (ex.question.kind, ex.question.concept) != (first.kind, first.concept)
    ex.undo()
    assert ex.rejected == set() and ex.boxes == [] and ex.question == first


def test_when_no_answer_would_matter_check_next_says_so(model, image):
    model = copy.deepcopy(model)  # the fixture is shared by the module
    ex = CSRExplorer(model, image)
    with torch.no_grad():  # a head that ignores every concept: nothing a clinician says can move it
        model.task_head.linear.weight.zero_()
    ex.refresh()
    ex.rejected = {"nodule"}  # a new state: ranked again, on the silent head
    assert ex.question is None
    assert "No answer is likely to change the prediction" in ex.panel.question.value
    assert ex.panel.yes.layout.display == "none"


def test_with_every_concept_rejected_check_next_is_silent(model, image):
    """Nothing left to ask is not "nothing would matter": the line stays empty."""
    ex = CSRExplorer(model, image)
    ex.rejected = set(model.concepts)
    assert ex.question is None
    assert "Check next" not in ex.panel.question.value and ex.panel.yes.layout.display == "none"


def test_a_location_answer_is_a_concept_box_on_exactly_the_cell_asked_about(model, image):
    ex = CSRExplorer(model, image)
    question = next(q for q in rank_questions(model, ex.encoding) if q.kind == "location")
    ex._question = question  # as if it ranked first
    ex.answer(False)
    (box,) = ex.boxes
    assert (box.positive, box.concept) == (False, question.concept)
    model_box = ex.geometry.box_to_model(box)
    assert (model_box.x0, model_box.y0, model_box.x1, model_box.y1) == question.region  # exact, back and forth
    rows, cols = footprint(model_box, 128, 128, model.grid, (16, 16))
    assert rows.stop - rows.start == 1 and cols.stop - cols.start == 1
    assert_same_result(ex.result, direct(ex, [model_box]))


# ---------------------------------------------------------------------------- keys, focus


def test_every_binding_does_what_the_keymap_says(model, image):
    ex = CSRExplorer(model, image, concept="nodule", display_size=240)
    expected = {
        "tool:positive": lambda: ex.mode == "positive", "tool:negative": lambda: ex.mode == "negative",
        "tool:select": lambda: ex.mode == "select", "target:all": lambda: ex.target == "all",
        "target:shown": lambda: ex.target == "shown",
    }
    for binding in KEYMAP:
        if binding.action in expected:
            for name in binding.keys:
                ex.set_view(tool="select" if binding.action != "tool:select" else "positive",
                            target="shown" if binding.action == "target:all" else "all")
                key(ex, name)
                assert expected[binding.action](), (name, binding.action)
    ex.boxes = [Box(10, 10, 50, 50)]
    for name, ctrl, shift in (("z", False, False), ("z", True, False)):
        key(ex, name, ctrl=ctrl, shift=shift)
        assert ex.boxes == []
        ex.redo()
    for name, ctrl, shift in (("y", False, False), ("Z", False, True), ("y", True, False), ("Z", True, True)):
        ex.undo()
        key(ex, name, ctrl=ctrl, shift=shift)
        assert ex.boxes == [Box(10, 10, 50, 50)], (name, ctrl, shift)
    for name in ("Delete", "Backspace"):
        ex.selected = 0
        key(ex, name)
        assert ex.boxes == [] and ex.selected is None
        ex.undo()
    ex.selected = 0
    key(ex, "Escape")
    assert ex.selected is None
    state = ex.state
    for name in ("r", "u", "x", "Tab", "Enter"):  # not bound: nothing happens
        key(ex, name)
    key(ex, "c", ctrl=True)  # copy: the browser's
    assert ex.state == state


def test_pointing_at_the_image_gives_it_the_key_focus(model, image, monkeypatch):
    ex = CSRExplorer(model, image)
    sent = []
    monkeypatch.setattr(ex.canvas, "send", lambda content, buffers=None: sent.append(content))
    event(ex, "mouse_move", 5, 5)
    event(ex, "mouse_move", 6, 6)
    assert sent == [{"do": "focus"}]  # once per entry, not per move
    event(ex, "mouse_out", 600, 6)
    event(ex, "mouse_move", 7, 7)
    assert sent == [{"do": "focus"}] * 2
    # the page script: shortcuts suppressed inside the explorer, focus on hover and click
    # (what it does in a browser is tested in tests/browser)
    support = ex.children[0]
    assert "data-lm-suppress-shortcuts" in support._esm and "preventScroll" in support._esm
    assert ".csr-canvas:focus" in support._css
    hint = ex.children[2].children[0].children[-1].value
    assert "Point at the image to use keys" in hint and "<kbd>z</kbd> undo" in hint


# ---------------------------------------------------------------------------- confidence, legend


def test_out_of_distribution_overrides_confident(model, image):
    ood = copy.deepcopy(model)
    ood.novelty.threshold.fill_(0.0)  # everything is beyond the training images
    ex = CSRExplorer(ood, image)
    assert bool(ex.result.out_of_distribution[0])
    text = ex.panel.confidence.value
    assert charts.OOD_WARNING in text and "Confident" not in text and "Needs review" not in text
    assert "unlike the training images: do not trust this prediction" in ex._repr_mimebundle_()["text/plain"]
    assert "do not trust" in ex._summary_lines()[0]
    ex.boxes = [Box(0, 0, 100, 100, positive=False)]  # no interaction makes the image familiar
    assert charts.OOD_WARNING in ex.panel.confidence.value
    familiar = CSRExplorer(model, image)  # an uncalibrated model (threshold inf) flags nothing
    assert not bool(familiar.result.out_of_distribution[0])
    assert ("Confident" in familiar.panel.confidence.value) != bool(familiar.result.needs_review[0])


def test_the_legend_says_what_colours_scores_and_contributions_are(model, image):
    ex = CSRExplorer(model, image, concept="cavity", colormap="magma")
    k = model.concepts.index("cavity")
    vmax = float(ex.baseline.similarity_maps[0, k].amax(0).clamp(min=0).max())
    bar = ex.panel.colour_bar.value
    assert f"{vmax:.2f}" in bar and "cavity" in bar and "cosine similarity" in bar
    r, g, b, _ = render.colormap_lut("magma")[0]
    assert f"rgb({r},{g},{b})" in bar  # the bar shows the colormap in use
    predicted = ex.model.classes[int(ex.result.probs[0].argmax())]
    assert "<b>score</b>" in ex.panel.legend.value and f"<b>to {predicted}</b>" in ex.panel.legend.value
    ex.concept = None
    assert ex.panel.colour_bar.value == ""
    ex.rejected = {"nodule"}
    assert "csr-rejected" in ex.panel.rows["nodule"]._dom_classes
    assert "csr-rejected" not in ex.panel.rows["cavity"]._dom_classes
    ex.undo()
    assert "csr-rejected" not in ex.panel.rows["nodule"]._dom_classes


def test_the_layout_adapts_to_the_space(model, image):
    ex = CSRExplorer(model, image, display_size=480)
    layout = ex.canvas.layout
    assert (layout.width, layout.max_width, layout.height) == ("100%", "480px", "auto")  # scales down, never up
    style = ex.children[0]
    assert "flex-wrap: wrap" in style._css and style.layout.display == "none"
    assert {"csr-toolbar", "csr-main"} <= {c for child in ex.children for c in child._dom_classes}


# ---------------------------------------------------------------------------- inputs


@pytest.mark.parametrize(("size", "problem", "fix"), [
    ((1, 1), "smaller than this model's minimum of 16 px", "original image"),
    ((20, 20000), "aspect ratio beyond 10:1", "Crop the region of interest"),
    ((12, 100), "smaller than this model's minimum", "trained on 128x128"),
])
def test_images_the_model_cannot_read_are_refused_with_the_fix(model, tmp_path, size, problem, fix):
    path = tmp_path / "odd.png"
    Image.fromarray(np.full(size, 128, np.uint8)).save(path)
    with pytest.raises(ValueError, match=problem) as error:
        CSRExplorer(model, path)
    assert fix in str(error.value)


def test_the_bundled_model_flags_a_real_film_but_not_a_phantom():
    pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    from csr_widgets import SyntheticCXR, load_pretrained

    film = get_testdata_file("RG1_UNCR.dcm", download=False)
    if film is None:
        pytest.skip("pydicom-data (a dev extra) is not installed")
    model = load_pretrained("synthetic-cxr", device="cpu")
    real = CSRExplorer(model, film, questions=False)
    assert charts.OOD_WARNING in real.panel.confidence.value
    phantom = SyntheticCXR(n=4, split="test", image_size=model.config.image_size)[0]["image"]
    assert charts.OOD_WARNING not in CSRExplorer(model, phantom, questions=False).panel.confidence.value
    assert math.isfinite(real._distance_ratio()) and real._distance_ratio() > 1


def test_check_next_is_ranked_after_the_update_once_per_burst_of_changes(model, image, monkeypatch):
    import asyncio

    from csr_widgets.widgets import explorer as explorer_module

    ex = CSRExplorer(model, image)
    ranked = []
    original = explorer_module.rank_questions
    monkeypatch.setattr(explorer_module, "rank_questions", lambda *a, **k: ranked.append(1) or original(*a, **k))

    async def burst():
        for i in range(5):  # five changes in a row, as fast as a user can click
            ex.boxes = [Box(10 + i, 10, 60, 60, positive=False)]
        assert ranked == [] and ex._question_pending is not None  # the update did not wait for the ranking
        await asyncio.sleep(0.2)
        assert ranked == [1] and ex._question_pending is None  # one ranking, for the last state
        ex.undo(), ex.redo()
        await asyncio.sleep(0.2)
        assert ranked == [1]  # the undone state was left before its ranking; the redone one is cached

    asyncio.run(burst())
    assert "Check next:" in ex.panel.question.value


def test_only_the_layers_module_touches_ipycanvas_private_names():
    from pathlib import Path
    import re

    import csr_widgets

    private = re.compile(r"_canvas_manager|ipycanvas\.canvas import|COMMANDS\[|\._caching|_current_canvas")
    package = Path(csr_widgets.__file__).parent
    touching = sorted(str(path.relative_to(package)) for path in package.rglob("*.py") if private.search(path.read_text()))
    assert touching == ["widgets/layers.py"]
