"""Boxes on the feature grid: cells touched, the floor at "absent", concept boxes.

The small model has stride 8 and offset 0 on 64-px images: cell j is centred on pixel 8j
and owns the pixels nearest to it, so cell 0 owns pixels 0..3, cell j > 0 owns
8j - 4 .. 8j + 3, and ownership passes from cell j to j + 1 at pixel 8j + 4.
"""
import numpy as np
import pytest
import torch

from csr_widgets import Box, CSRModel, Interaction
from csr_widgets.model.interaction import cell_importance, footprint, touch_importance

from .conftest import small_config


def test_a_one_pixel_box_touches_exactly_the_cell_that_owns_the_pixel(model):
    grid = model.grid
    assert (grid.stride, grid.offset) == (8, 0.0)
    for x in range(64):
        rows, cols = footprint(Box(x, 30, x + 1, 31), 64, 64, grid, (8, 8))
        owner = min((x + 4) // 8, 7)  # nearest centre 8j, ties to the later cell
        assert (cols.start, cols.stop) == (owner, owner + 1)
        assert (rows.start, rows.stop) == (4, 5)  # pixel 30 is nearest to centre 32
    importance = touch_importance([Box(17, 30, 18, 31, positive=False)], 64, 64, 0.2, grid, (8, 8))
    expected = np.ones((8, 8), np.float32)
    expected[4, 2] = 0.0  # pixel 17 belongs to cell 2 (centre 16)
    np.testing.assert_array_equal(importance, expected)


def test_a_box_across_a_cell_border_touches_both_cells(model):
    # pixels 19 and 20 straddle the border between cell 2 (owns 12..19) and cell 3 (20..27)
    rows, cols = footprint(Box(19, 19, 21, 20), 64, 64, model.grid, (8, 8))
    assert (cols.start, cols.stop) == (2, 4)
    assert (rows.start, rows.stop) == (2, 3)
    # a fractional edge that overlaps pixel 19 by a hair still touches its owner
    rows, cols = footprint(Box(19.9, 0, 20.5, 1), 64, 64, model.grid, (8, 8))
    assert (cols.start, cols.stop) == (2, 4)
    # ... while an edge exactly on pixel 20's left side does not reach pixel 19
    rows, cols = footprint(Box(20, 0, 28, 1), 64, 64, model.grid, (8, 8))
    assert (cols.start, cols.stop) == (3, 4)


def test_touch_importance_by_hand(model):
    positive = Box(16, 16, 17, 17)  # cell (2, 2)
    negative = Box(15, 15, 25, 17, positive=False)  # rows: cell 2; cols: cells 2 and 3
    importance = touch_importance([positive, negative], 64, 64, 0.25, model.grid, (8, 8))
    expected = np.full((8, 8), 0.25, np.float32)  # alpha: a positive box exists
    expected[2, 2] = 1.0
    expected[2, 2:4] = 0.0  # negative wins where they overlap
    np.testing.assert_array_equal(importance, expected)
    # without a positive box, A is 1 outside the negative ones
    only_negative = touch_importance([negative], 64, 64, 0.25, model.grid, (8, 8))
    assert only_negative.min() == 0 and (only_negative == 1).sum() == 62


def test_reason_uses_the_touched_cells_and_the_area_reading_stays_available(images):
    box = Box(30, 30, 34, 34)  # 4 px inside cell 4 only (owns 28..35)
    touch = CSRModel(small_config()).eval()
    area = CSRModel(small_config(box_footprint="area")).eval()
    area.load_state_dict(touch.state_dict())
    a_touch = touch(images, Interaction(boxes=[box])).importance_map[0]
    a_area = area(images, Interaction(boxes=[box])).importance_map[0]
    assert a_touch[4, 4] == 1.0 and (a_touch == 1.0).sum() == 1
    # the paper's reading averages A over the cell's 64 pixels: 16 at 1, 48 at alpha
    assert a_area[4, 4].item() == pytest.approx((16 + 48 * 0.2) / 64)
    np.testing.assert_allclose(a_area.numpy(), cell_importance([box], 64, 64, 0.2, area.grid, (8, 8)))


def test_boxes_never_lower_a_score_below_the_absent_baseline(model, images):
    enc = model.encode(images)
    b = model.absent_baseline
    rng = np.random.default_rng(0)
    for _ in range(30):
        boxes = []
        for _ in range(rng.integers(1, 4)):
            x0, y0 = rng.integers(0, 60, 2)
            w, h = rng.integers(1, 40, 2)
            concept = [None, "nodule", "cavity"][rng.integers(3)]
            boxes.append(Box(int(x0), int(y0), int(x0 + w), int(y0 + h), positive=bool(rng.integers(2)), concept=concept))
        out = model.reason(enc, Interaction(boxes=boxes))
        assert (out.scores >= torch.minimum(enc.scores, b) - 1e-7).all()
        assert (out.scores <= enc.scores + 1e-7).all()  # A <= 1: boxes only ever take away


def test_a_whole_image_negative_box_rejects_every_concept_above_its_baseline(model, images):
    enc = model.encode(images[:1])
    s = enc.scores[0]  # (K, M)
    with torch.no_grad():
        b = model.absent_baseline
        b[0] = s[0] * 0.5  # nodule: every prototype above its baseline
        b[1] = s[1] + 0.5  # effusion: every prototype below it
        b[2] = s[2] * 0.25  # cavity: above
    boxed = model.reason(enc, Interaction(boxes=[Box(0, 0, 64, 64, positive=False)]))
    rejected = model.reason(enc, Interaction(rejected={"nodule", "cavity"}))
    torch.testing.assert_close(boxed.scores, rejected.scores)
    torch.testing.assert_close(boxed.logits, rejected.logits)
    # and per prototype it is min(s, b), whatever the mix
    with torch.no_grad():
        model.absent_baseline.uniform_(0.0, 0.3)
    boxed = model.reason(enc, Interaction(boxes=[Box(0, 0, 64, 64, positive=False)]))
    torch.testing.assert_close(boxed.scores, torch.minimum(enc.scores, model.absent_baseline))


def test_a_concept_box_leaves_every_other_concept_bit_identical(model, images):
    enc = model.encode(images)
    plain = model.reason(enc)
    for positive in (True, False):
        out = model.reason(enc, Interaction(boxes=[Box(8, 8, 30, 40, positive=positive, concept="effusion")]))
        k = model.concepts.index("effusion")
        others = [i for i in range(3) if i != k]
        assert torch.equal(out.similarity_maps[:, others], plain.similarity_maps[:, others])
        assert torch.equal(out.scores[:, others], plain.scores[:, others])
        assert torch.equal(out.contributions[..., others], plain.contributions[..., others])
        assert not torch.equal(out.similarity_maps[:, k], plain.similarity_maps[:, k])
        # A of the boxes for every concept stays 1: there are none; A_effusion carries the box
        assert torch.equal(out.importance_map, torch.ones_like(out.importance_map))
        assert out.concept_importance[:, others].eq(1).all()
        expected = touch_importance([Box(8, 8, 30, 40, positive=positive)], 64, 64, model.config.alpha, model.grid, (8, 8))
        np.testing.assert_array_equal(out.concept_importance[0, k].numpy(), expected)


def test_a_concept_box_combines_with_the_boxes_for_every_concept(model, images):
    shared = Box(0, 0, 10, 10)
    own = Box(40, 40, 50, 50, concept="nodule")
    out = model(images, Interaction(boxes=[shared, own]))
    k = model.concepts.index("nodule")
    alpha = model.config.alpha
    expected_shared = touch_importance([shared], 64, 64, alpha, model.grid, (8, 8))
    expected_own = touch_importance([shared, Box(40, 40, 50, 50)], 64, 64, alpha, model.grid, (8, 8))
    np.testing.assert_array_equal(out.importance_map[0].numpy(), expected_shared)
    np.testing.assert_array_equal(out.concept_importance[0, k].numpy(), expected_own)
    for other in (1, 2):
        np.testing.assert_array_equal(out.concept_importance[0, other].numpy(), expected_shared)


def test_the_papers_rules_behind_the_switches(images):
    paper = CSRModel(small_config(box_footprint="area", box_floor=False)).eval()
    with torch.no_grad():
        paper.absent_baseline.fill_(0.5)
    enc = paper.encode(images)
    box = Box(5, 5, 40, 30)
    out = paper.reason(enc, Interaction(boxes=[box]))
    importance = torch.from_numpy(cell_importance([box], 64, 64, 0.2, paper.grid, (8, 8)))
    expected = (enc.similarity_maps * importance).clamp(min=0).amax((-2, -1))
    torch.testing.assert_close(out.scores, expected)  # no floor: alpha takes scores below 0.5


def test_boxes_with_unknown_concepts_or_bad_values_are_refused(model, images):
    with pytest.raises(ValueError, match="Unknown concept names \\['tumour'\\]"):
        model(images, Interaction(boxes=[Box(0, 0, 5, 5, concept="tumour")]))
    with pytest.raises(ValueError, match="concept name or None"):
        Box(0, 0, 5, 5, concept="")
    with pytest.raises(ValueError, match="finite numbers"):
        Box(0, 0, True, 5)
    assert Box(np.int64(1), np.float32(2), 3, 4).x0 == 1  # numpy scalars are numbers too


def test_box_round_trips_with_its_concept():
    box = Box(1, 2, 3, 4, positive=False, concept="nodule")
    assert box.to_dict() == {"x0": 1, "y0": 2, "x1": 3, "y1": 4, "positive": False, "concept": "nodule"}
    assert box.scaled(2, 2).concept == "nodule" and box.clipped(2, 3).concept == "nodule"
