"""The pure parts behind the widgets: rendering, geometry, session data."""
from __future__ import annotations

import io
import json
from dataclasses import replace

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

from csr_widgets import Box
from csr_widgets.model import FeatureGrid
from csr_widgets.widgets import render
from csr_widgets.widgets.geometry import ViewGeometry
from csr_widgets.widgets.overlay import BoxMark, Footprint
from csr_widgets.widgets.session import ExplorerState, History, ViewSettings, as_boxes, parse_session, session_dict

RESNET = FeatureGrid(channels=128, stride=8, offset=0.0)  # "same"-padded CNN, stride 8
PATCHES = FeatureGrid(channels=64, stride=16, offset=7.5)  # patchify stem / ViT


def test_colormap_lookup_matches_matplotlib():
    lut = render.colormap_lut("viridis")
    assert lut.shape == (256, 4) and lut.dtype == np.uint8
    expected = (np.asarray(matplotlib.colormaps["viridis"](np.linspace(0, 1, 256))) * 255 + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(lut, expected)
    with pytest.raises(ValueError, match="cividis"):
        render.colormap_lut("no-such-map")


def test_colorize_alpha_fades_with_value_and_opacity():
    values = np.array([[0.0, 0.5, 1.0]])
    faded = render.colorize(values, "cividis", opacity=1.0, fade=True)
    assert faded.dtype == np.uint8 and faded.shape == (1, 3, 4)
    assert list(faded[0, :, 3]) == [0, 128, 255]
    uniform = render.colorize(values, "cividis", opacity=0.5, fade=False)
    assert list(uniform[0, :, 3]) == [128, 128, 128]
    np.testing.assert_array_equal(faded[..., :3], uniform[..., :3])
    with pytest.raises(ValueError, match="opacity"):
        render.colorize(values, opacity=1.5)
    with pytest.raises(ValueError, match="2-D"):
        render.colorize(np.zeros(3))


def test_heatmap_maximum_lands_on_the_cell_centre():
    for grid in (RESNET, PATCHES):
        cells = np.zeros((8, 8), np.float32)
        cells[3, 5] = 1.0
        size = (grid.stride * 8, grid.stride * 8)
        rgba = render.heatmap_rgba(cells, grid, size, smooth=True)
        y, x = np.unravel_index(rgba[..., 3].argmax(), size)
        assert (y, x) == (round(grid.offset + grid.stride * 3), round(grid.offset + grid.stride * 5)) or (
            grid.offset % 1 and abs(y - (grid.offset + grid.stride * 3)) <= 0.5 and abs(x - (grid.offset + grid.stride * 5)) <= 0.5
        )


def test_upsample_is_the_grids_mapping():
    cells = np.random.default_rng(0).random((16, 16)).astype(np.float32)
    for smooth, mode in ((True, "bilinear"), (False, "nearest")):
        ours = render.upsample(cells, RESNET, (128, 128), smooth)
        theirs = RESNET.upsample(torch.from_numpy(cells), (128, 128), mode).numpy()
        np.testing.assert_allclose(ours, theirs, atol=1e-6)


def test_coarse_lattice_keeps_the_cells_where_they_are():
    grid, size = render.lattice(RESNET, (256, 256), max_side=128)
    assert size == (128, 128) and grid.stride == 4 and grid.offset == pytest.approx(-0.25)
    cells = np.random.default_rng(1).random((32, 32)).astype(np.float32)
    fine = render.upsample(cells, RESNET, (256, 256))
    coarse = render.upsample(cells, grid, size)
    # a lattice pixel is the average of its 2 x 2 model pixels (exact where bilinear is linear)
    pooled = fine.reshape(128, 2, 128, 2).mean(axis=(1, 3))
    np.testing.assert_allclose(coarse[2:-2, 2:-2], pooled[2:-2, 2:-2], atol=1e-5)
    # blocks: cell j covers model pixels [8j - 4, 8j + 4) -> lattice [4j - 2, 4j + 2)
    blocks = render.upsample(np.arange(32 * 32, dtype=np.float32).reshape(32, 32), grid, size, smooth=False)
    assert (blocks[2:6, 2:6] == 33).all() and (blocks[0:2, 0:2] == 0).all()
    # small inputs and sizes without a common divisor keep the grid as it is
    assert render.lattice(RESNET, (64, 64)) == (RESNET, (64, 64))
    assert render.lattice(RESNET, (127, 131), max_side=64) == (RESNET, (127, 131))


def test_select_map_takes_the_max_over_prototypes_or_one_prototype():
    maps = torch.rand(3, 4, 5, 6)
    np.testing.assert_array_equal(render.select_map(maps, 1), maps[1].amax(0).numpy())
    np.testing.assert_array_equal(render.select_map(maps, 2, 3), maps[2, 3].numpy())
    with pytest.raises(ValueError, match="concept"):
        render.select_map(maps, 5)
    with pytest.raises(ValueError, match="prototype"):
        render.select_map(maps, 0, 9)
    with pytest.raises(ValueError, match="K, M, h, w"):
        render.select_map(maps[0], 0)


def test_normalise_composite_and_png_are_lossless():
    assert render.normalise(np.array([0.0, 0.5, 2.0]), vmax=1.0).tolist() == [0.0, 0.5, 1.0]
    assert render.normalise(np.zeros(3)).tolist() == [0, 0, 0]
    base = np.full((4, 4, 4), 255, np.uint8)
    overlay = np.zeros((4, 4, 4), np.uint8)
    overlay[..., 3] = 255
    assert (render.composite(base, overlay, opacity=0.5)[..., 0] == 128).all()
    rgba = np.random.default_rng(2).integers(0, 256, (9, 7, 4)).astype(np.uint8)
    decoded = np.asarray(Image.open(io.BytesIO(render.encode_png(rgba, 1))))
    np.testing.assert_array_equal(decoded, rgba)


def test_crops_of_every_layout_become_rgba():
    for crop in (np.zeros((5, 6), np.uint8), np.zeros((5, 6, 3), np.uint8), np.zeros((5, 6, 1)), np.ones((3, 5, 6)) * 0.5):
        out = render.crop_rgba(crop)
        assert out.shape == (5, 6, 4) and out.dtype == np.uint8 and (out[..., 3] == 255).all()
    with pytest.raises(ValueError, match="crop"):
        render.crop_rgba(np.zeros((2, 3, 4, 5)))


def test_boxes_are_drawn_at_their_edges_over_their_cells():
    canvas = np.zeros((40, 30, 4), np.uint8)
    canvas[..., 3] = 255
    cells = Footprint((0.0, 0.0, 16.0, 16.0), (8.0,), (8.0,))
    drawn = render.draw_marks(canvas, [BoxMark((2, 23, 12, 30), True, "+ all concepts", None),
                                       BoxMark((20, 2, 28, 10), True, "+ all concepts", cells)], width=1)
    assert tuple(drawn[23, 5, :3]) == (0x00, 0x72, 0xB2)
    assert tuple(drawn[29, 5, :3]) == (0x00, 0x72, 0xB2)  # y1 = 30 exclusive: last row 29
    assert tuple(drawn[26, 6, :3]) == (0, 0, 0)  # inside stays untouched
    # the cells the second box acts on are shaded faintly: blue at CELL_FILL_ALPHA over black
    expected = np.array(render.POSITIVE_RGB) * render.CELL_FILL_ALPHA
    assert np.abs(drawn[12, 4, :3] - expected).max() <= 1
    assert tuple(drawn[36, 25, :3]) == (0, 0, 0)  # outside the cells: untouched


def test_geometry_maps_boxes_exactly():
    g = ViewGeometry.fit((300, 400), (224, 224), display_size=200)
    assert g.canvas_size == (150, 200)
    assert g.canvas_to_image(100, 75) == (200.0, 150.0)
    assert g.box_from_canvas(10, 20, 30.2, 40.6, positive=False) == Box(20, 40, 61, 82, positive=False)
    assert g.box_from_canvas(30, 40, 10, 20, positive=True) == Box(20, 40, 60, 80)
    assert g.box_from_canvas(-10, -10, -1, -1, positive=True) is None
    box = Box(0, 0, 400, 300)
    assert g.box_to_model(box) == Box(0, 0, 224, 224)
    assert g.box_to_canvas(Box(20, 40, 60, 80)) == (10.0, 20.0, 30.0, 40.0)
    with pytest.raises(ValueError, match="display_size"):
        ViewGeometry.fit((10, 10), (8, 8), display_size=4)


def test_view_changes_are_not_undo_steps_and_undo_keeps_the_view():
    h = History(ExplorerState())
    magma = ViewSettings(colormap="magma")
    assert h.push(ExplorerState(view=magma))  # shown differently...
    assert not h.can_undo  # ...but nothing to undo
    boxed = ExplorerState(boxes=(Box(1, 2, 3, 4),), view=magma)
    assert h.push(boxed)
    h.push(replace(boxed, view=ViewSettings(colormap="cividis", tool="negative")))
    assert h.undo() == ExplorerState(view=ViewSettings(colormap="cividis", tool="negative"))
    assert h.redo() == replace(boxed, view=ViewSettings(colormap="cividis", tool="negative"))
    assert ViewSettings(concept="nodule", target="shown").box_concept == "nodule"
    assert ViewSettings(concept="nodule").box_concept is None
    with pytest.raises(ValueError, match="tool"):
        ViewSettings(tool="lasso")
    with pytest.raises(ValueError, match="target"):
        ViewSettings(target="some")


def test_history_is_bounded_and_branches():
    h = History(ExplorerState(), limit=3)
    states = [ExplorerState(rejected=frozenset({str(i)})) for i in range(6)]
    for s in states:
        assert h.push(s)
    assert not h.push(states[-1])  # no change, no entry
    assert len(h) == 3
    assert h.undo() == states[4] and h.undo() == states[3] and h.undo() == states[2]
    assert h.undo() is None  # the oldest entries were dropped
    assert h.redo() == states[3]
    h.push(ExplorerState())
    assert not h.can_redo


def test_boxes_from_plain_data_and_sessions():
    assert as_boxes([(1, 2, 3, 4), {"x0": 1, "y0": 2, "x1": 3, "y1": 4, "positive": False}]) == (
        Box(1, 2, 3, 4), Box(1, 2, 3, 4, False))
    assert as_boxes(Box(1, 2, 3, 4)) == (Box(1, 2, 3, 4),)
    with pytest.raises(TypeError):
        as_boxes(5)
    with pytest.raises(ValueError, match="keys"):
        as_boxes([{"x": 1}])
    state = ExplorerState((Box(1, 2, 3, 4, False),), frozenset({"a"}), 0.4, frozenset({("present", "b")}),
                          ViewSettings(concept="a", colormap="magma", target="shown"))
    data = session_dict(state, (10, 20), ["a", "b"], ["x", "y"])
    assert parse_session(json.dumps(data), ["a", "b"], (10, 20)) == state
    older = {k: v for k, v in data.items() if k != "answered"}  # a /2 session saved before answers
    older["view"] = {"concept": "a", "retired_setting": 1}
    assert parse_session(older, ["a", "b"], (10, 20)) == ExplorerState(state.boxes, state.rejected, 0.4, view=ViewSettings(concept="a"))
    with pytest.raises(ValueError, match="unknown concepts \\['c'\\]"):
        parse_session({**data, "view": {"concept": "c"}}, ["a", "b"], (10, 20))
    with pytest.raises(ValueError, match="JSON"):
        parse_session("{not json", ["a", "b"], (10, 20))
    with pytest.raises(ValueError, match="unknown concepts"):
        parse_session({**data, "rejected": ["zzz"]}, ["a", "b"], (10, 20))


def test_the_server_extension_sets_tcp_nodelay_before_opening(monkeypatch):
    import asyncio

    from jupyter_server.services.kernels.websocket import KernelWebsocketHandler

    from csr_widgets.widgets import server

    calls = []

    async def original_open(self, kernel_id):
        calls.append(("open", kernel_id))

    monkeypatch.setattr(KernelWebsocketHandler, "open", original_open)
    monkeypatch.setattr(KernelWebsocketHandler, "_csr_widgets_nodelay", False, raising=False)
    assert server.set_nodelay_on_kernel_websockets()
    assert not server.set_nodelay_on_kernel_websockets()  # installed once
    handler = type("Handler", (), {"set_nodelay": lambda self, value: calls.append(("nodelay", value))})()
    asyncio.run(KernelWebsocketHandler.open(handler, "kernel-1"))
    assert calls == [("nodelay", True), ("open", "kernel-1")]
    assert server._jupyter_server_extension_points() == [{"module": "csr_widgets.widgets.server"}]
