"""Metrics on hand-made cases with known answers, and the Pointing Game against loops."""
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score

from csr_widgets.evaluation import metrics
from csr_widgets.model import FeatureGrid


# --------------------------------------------------------------------------- classification
def test_f1_accuracy_and_confusion_by_hand():
    labels = [0, 0, 1, 1, 2]
    predictions = [0, 1, 1, 1, 0]
    # class 0: tp 1, fp 1, fn 1 -> F1 1/2; class 1: tp 2, fp 1, fn 0 -> P 2/3, R 1, F1 0.8;
    # class 2: tp 0 -> F1 0; class 3 never occurs -> no F1 at all.
    per_class = metrics.per_class_f1(labels, predictions, num_classes=4)
    np.testing.assert_allclose(per_class[:3], [0.5, 0.8, 0.0])
    assert np.isnan(per_class[3])
    assert metrics.macro_f1(labels, predictions, num_classes=4) == pytest.approx(1.3 / 3)
    assert metrics.macro_f1(torch.tensor(labels), torch.tensor(predictions)) == pytest.approx(1.3 / 3)
    assert metrics.accuracy(labels, predictions) == pytest.approx(3 / 5)
    np.testing.assert_array_equal(
        metrics.confusion_matrix(labels, predictions, 3),
        [[1, 1, 0],
         [0, 2, 0],
         [1, 0, 0]],
    )
    # a class that is predicted but never true counts (F1 0), as in scikit-learn's macro
    assert metrics.macro_f1([0, 0], [0, 1]) == pytest.approx(f1_score([0, 0], [0, 1], average="macro", zero_division=0))
    assert metrics.macro_f1([0, 0], [0, 1]) == pytest.approx((2 / 3 + 0) / 2)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        metrics.macro_f1([0, 2], [0, 1], num_classes=2)


def test_concept_auc_by_hand_with_single_class_and_unknown_labels():
    concepts = np.array([[0, 1, 1],
                         [0, 1, np.nan],
                         [1, 1, 0],
                         [1, 1, 0]])
    scores = np.array([[0.1, 0.3, 0.9],
                       [0.4, 0.2, 0.0],
                       [0.35, 0.9, 0.2],
                       [0.8, 0.1, 0.95]])
    auc = metrics.concept_auc(concepts, scores)
    # concept 0: positives {0.35, 0.8} vs negatives {0.1, 0.4}: 3 of 4 pairs ordered -> 0.75
    assert auc[0] == pytest.approx(0.75)
    # concept 1: a single class present -> no AUC
    assert np.isnan(auc[1])
    # concept 2: the unknown row is left out; 0.9 beats 0.2, loses to 0.95 -> 0.5
    assert auc[2] == pytest.approx(0.5)
    # the mean over concepts (training's stage-1 score, Table 1's "concept AUC") leaves concept 1 out
    assert metrics.mean_auc(auc) == pytest.approx(0.625)
    assert np.isnan(metrics.mean_auc([np.nan, np.nan]))


# --------------------------------------------------------------------------- boxes and points
def test_argmax_ties_go_to_the_first_maximum_in_row_major_order():
    maps = torch.zeros(2, 3, 4)
    maps[0, 1, 3] = maps[0, 2, 0] = 5.0  # (1, 3) comes before (2, 0) in row-major order
    maps[1] = 7.0  # a flat map points at (0, 0)
    np.testing.assert_array_equal(metrics.argmax_points(maps).numpy(), [[1, 3], [0, 0]])


def test_box_pixels_use_pixel_centres_and_ignore_empty_boxes():
    assert metrics.box_pixels((2, 3, 5, 7), 32, 32) == (3, 6, 2, 4)  # x1, y1 exclusive
    assert metrics.box_pixels((2.5, 0, 3.4, 1), 32, 32) == (0, 0, 2, 2)  # holds the centre 2.5
    assert metrics.box_pixels((2.6, 0, 3.4, 1), 32, 32) is None  # sub-pixel, no centre inside
    assert metrics.box_pixels((3, 3, 3, 9), 32, 32) is None  # zero width
    assert metrics.box_pixels((40, 40, 50, 50), 32, 32) is None  # outside the image
    assert metrics.box_pixels((-5, -5, 3, 40), 32, 32) == (0, 31, 0, 2)  # clipped


def _peaked(points, H=64, W=64):
    """(1, K, H, W) saliency with a single maximum at each (y, x)."""
    saliency = torch.zeros(1, len(points), H, W)
    for k, (y, x) in enumerate(points):
        saliency[0, k, y, x] = 1.0
    return saliency


def test_pointing_tolerance_at_the_border():
    box = ("a", 10, 10, 20, 20)  # pixels 10..19
    cases = {
        (15, 19): (True, True),    # last pixel inside: x1 is exclusive
        (15, 20): (False, True),   # first pixel outside, 1 px away
        (15, 34): (False, True),   # exactly 15 px to the right of pixel 19
        (15, 35): (False, False),  # 16 px
        (28, 31): (False, True),   # dy 9, dx 12: exactly 15 px on a diagonal
        (29, 31): (False, False),  # dy 10, dx 12: 15.6 px
        (9, 9): (False, True),     # diagonal neighbour of the corner: sqrt(2)
    }
    for point, expected in cases.items():
        pointing = metrics.point_concepts(_peaked([point]), [[box]], ["a"])
        assert tuple(pointing.points[0, 0]) == point
        assert (pointing.hits(0)[0, 0] == 1, pointing.hits(15)[0, 0] == 1) == expected, point
    # a box of another concept is not a target
    other = metrics.point_concepts(_peaked([(15, 15)]), [[box]], ["b"])
    assert np.isnan(other.distance[0, 0]) and np.isnan(other.hits(15)[0, 0])


def test_tied_maxima_are_not_an_any_hit():
    saliency = torch.zeros(1, 1, 32, 32)
    saliency[0, 0, 2, 30] = saliency[0, 0, 20, 5] = 1.0  # tied: (2, 30) comes first
    on_second = metrics.point_concepts(saliency, [[("a", 0, 16, 10, 26)]], ["a"])  # holds (20, 5) only
    on_first = metrics.point_concepts(saliency, [[("a", 28, 0, 32, 4)]], ["a"])  # holds (2, 30)
    assert on_second.hits(0)[0, 0] == 0.0
    assert on_first.hits(0)[0, 0] == 1.0


def test_concept_points_are_the_sub_cell_peaks_of_the_best_active_prototype():
    grid = FeatureGrid(channels=1, stride=8, offset=0.0)
    maps = torch.zeros(1, 2, 2, 4, 4)  # (B, K, M, h, w)
    maps[0, 0, 0, 1, 1:4] = torch.tensor([0.2, 0.9, 0.6])  # prototype 0: peak at cell (1, 2)
    maps[0, 0, 1, 3, 0] = 0.95  # prototype 1: higher, at a corner
    mask = torch.tensor([[True, False], [False, False]])  # prototype 1 pruned; concept 1 dead
    points = metrics.concept_points(maps, grid, (32, 32), mask)
    # x: 2 + (0.2 - 0.6) / (2 (0.2 - 1.8 + 0.6)) = 2.2 cells = 17.6 px -> pixel 18; y: the row's centre
    assert points[0, 0].tolist() == [8.0, 18.0] and torch.isnan(points[0, 1]).all()
    assert metrics.concept_points(maps, grid, (32, 32))[0, 0].tolist() == [24.0, 0.0]  # nothing pruned
    # the pointing game scores these points; the upsampled saliency's argmax stays on a cell centre
    saliency = metrics.concept_saliency(maps, grid, (32, 32), mask)
    box = [[("a", 17, 4, 24, 12)]]  # holds pixel x 18 but not the cell centre x 16
    assert metrics.point_concepts(saliency[:, :1], box, ["a"], points=points[:, :1]).hits(0)[0, 0] == 1.0
    assert metrics.point_concepts(saliency[:, :1], box, ["a"]).hits(0)[0, 0] == 0.0


def test_empty_boxes_are_ignored_and_shortcut_landings_counted_apart():
    # concept a: only an empty box -> not evaluated; b: an empty box and a real one;
    # c: peaks on the shortcut box (a miss, counted as a shortcut landing).
    saliency = _peaked([(5, 5), (5, 5), (60, 60)])
    boxes = [[("a", 3, 3, 3, 9), ("b", 7, 7, 7.2, 8), ("b", 0, 0, 8, 8), ("c", 10, 10, 20, 20), ("unknown", 0, 0, 64, 64)]]
    pointing = metrics.point_concepts(saliency, boxes, ["a", "b", "c"], shortcut_boxes=[(56, 56, 64, 64)])
    assert np.isnan(pointing.distance[0, 0])
    assert pointing.distance[0, 1] == 0.0
    assert pointing.distance[0, 2] == pytest.approx(math.hypot(60 - 19, 60 - 19))
    np.testing.assert_array_equal(pointing.hits(0)[0], [np.nan, 1.0, 0.0])
    np.testing.assert_array_equal(pointing.on_shortcut(0)[0], [np.nan, 0.0, 1.0])
    table = metrics.pointing_game(pointing.distance, ["a", "b", "c"], 0, pointing.shortcut_distance)
    assert table.loc["a", "evaluated"] == 0 and np.isnan(table.loc["a", "pointing_game"])
    assert table.loc["overall", ["evaluated", "hits", "on_shortcut"]].tolist() == [2, 1, 1]
    assert table.loc["overall", "pointing_game"] == 0.5 and table.loc["overall", "shortcut_rate"] == 0.5
    energy = metrics.energy_pointing(saliency, boxes, ["a", "b", "c"])
    np.testing.assert_array_equal(energy[0], [np.nan, 1.0, 0.0])


def test_pointing_game_table_by_hand():
    distance = np.array([[0.0, np.nan],
                         [3.0, 20.0],
                         [np.nan, 15.0]])
    at0 = metrics.pointing_game(distance, ["a", "b"], 0)
    at15 = metrics.pointing_game(distance, ["a", "b"], 15)
    assert at0["evaluated"].tolist() == [2, 2, 4]
    np.testing.assert_allclose(at0["pointing_game"], [0.5, 0.0, 0.25])
    np.testing.assert_allclose(at15["pointing_game"], [1.0, 0.5, 0.75])
    with pytest.raises(ValueError):
        metrics.pointing_hits(distance, -1)


def test_energy_pointing_by_hand():
    saliency = torch.tensor([[[[4.0, 0, 0, 0],
                               [0, 2, 0, 0],
                               [0, 0, -5, 0],
                               [0, 0, 0, 2]],
                              [[-1.0, -1, -1, -1]] * 4]])
    energy = metrics.energy_pointing(saliency, [[("a", 0, 0, 2, 2), ("b", 0, 0, 2, 2)]], ["a", "b"])
    assert energy[0, 0] == pytest.approx(6 / 8)  # the negative -5 is no energy
    assert energy[0, 1] == 0.0  # no positive energy at all earns nothing


# --------------------------------------------------------------------------- saliency
def _bilinear_by_loops(cell_map: np.ndarray, grid: FeatureGrid, H: int, W: int) -> np.ndarray:
    """Straight from the convention: pixel p sits at cell coordinate (p - offset) / stride."""
    h, w = cell_map.shape

    def weights(p, cells):
        pos = min(max((p - grid.offset) / grid.stride, 0.0), cells - 1)
        lo = min(int(math.floor(pos)), max(cells - 2, 0))
        frac = pos - lo
        return [(lo, 1 - frac)] + ([(lo + 1, frac)] if cells > 1 else [])

    out = np.zeros((H, W))
    for y in range(H):
        for x in range(W):
            out[y, x] = sum(wy * wx * cell_map[i, j] for i, wy in weights(y, h) for j, wx in weights(x, w))
    return out


@pytest.mark.parametrize("offset", [0.0, 3.5])
def test_concept_saliency_is_max_over_active_prototypes_then_grid_upsampling(offset):
    grid = FeatureGrid(channels=1, stride=8, offset=offset)
    maps = torch.rand(2, 3, 4, 4, 5, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[1, [0, 2]] = False
    mask[2] = False  # every prototype of concept 2 pruned
    saliency = metrics.concept_saliency(maps, grid, (32, 40), mask)
    assert saliency.shape == (2, 3, 32, 40)
    for b in range(2):
        for k in range(2):
            best = maps[b, k][mask[k]].amax(0).numpy()
            np.testing.assert_allclose(saliency[b, k].numpy(), _bilinear_by_loops(best, grid, 32, 40), atol=1e-5)
    assert torch.isnan(saliency[:, 2]).all()
    pointing = metrics.point_concepts(saliency, [[("c2", 0, 0, 40, 32)]] * 2, ["c0", "c1", "c2"])
    assert np.isnan(pointing.distance[:, 2]).all()  # no map, no evaluation


# --------------------------------------------------------------------------- against loops
def _pointing_by_loops(saliency: np.ndarray, boxes, concepts, tolerance):
    """Independent Pointing Game: scan pixels for the first strict maximum, then every pixel
    of every box of the concept (pixel centre x + 0.5 in [x0, x1))."""
    B, K, H, W = saliency.shape
    hits = np.full((B, K), np.nan)
    for b in range(B):
        for k, name in enumerate(concepts):
            best, point = -np.inf, None
            for y in range(H):
                for x in range(W):
                    if saliency[b, k, y, x] > best:
                        best, point = saliency[b, k, y, x], (y, x)
            nearest = np.inf
            for concept, x0, y0, x1, y1 in boxes[b]:
                if concept != name:
                    continue
                for y in range(H):
                    for x in range(W):
                        if x0 <= x + 0.5 < x1 and y0 <= y + 0.5 < y1:
                            nearest = min(nearest, math.hypot(y - point[0], x - point[1]))
            if np.isfinite(nearest):
                hits[b, k] = float(nearest <= tolerance)
    return hits


def _energy_by_loops(saliency: np.ndarray, boxes, concepts):
    B, K, H, W = saliency.shape
    energy = np.full((B, K), np.nan)
    for b in range(B):
        for k, name in enumerate(concepts):
            inside = total = 0.0
            any_pixel = False
            for y in range(H):
                for x in range(W):
                    v = max(saliency[b, k, y, x], 0.0)
                    total += v
                    if any(c == name and x0 <= x + 0.5 < x1 and y0 <= y + 0.5 < y1 for c, x0, y0, x1, y1 in boxes[b]):
                        inside += v
                        any_pixel = True
            if any_pixel:
                energy[b, k] = inside / total if total > 0 else 0.0
    return energy


def test_pointing_game_matches_explicit_loops_on_random_maps():
    rng = np.random.default_rng(0)
    B, K, H, W = 5, 3, 20, 24
    concepts = ["a", "b", "c"]
    # small integers: many tied maxima, so the tie rule is exercised too
    saliency = rng.integers(-2, 4, size=(B, K, H, W)).astype(np.float32)
    boxes = []
    for _ in range(B):
        image_boxes = []
        for _ in range(rng.integers(0, 5)):
            x0, y0 = rng.uniform(-4, W), rng.uniform(-4, H)
            image_boxes.append((concepts[rng.integers(K)], x0, y0, x0 + rng.uniform(0.3, 9), y0 + rng.uniform(0.3, 9)))
        boxes.append(image_boxes)
    pointing = metrics.point_concepts(torch.from_numpy(saliency), boxes, concepts)
    assert (~np.isnan(pointing.distance)).sum() >= 4  # the seed gives a real number of evaluated pairs
    for tolerance in (0, 2, 5, 15):
        np.testing.assert_array_equal(pointing.hits(tolerance), _pointing_by_loops(saliency, boxes, concepts, tolerance))
    np.testing.assert_allclose(metrics.energy_pointing(torch.from_numpy(saliency), boxes, concepts),
                               _energy_by_loops(saliency, boxes, concepts), rtol=1e-6)
