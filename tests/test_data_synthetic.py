"""SyntheticCXR: determinism, exact boxes and masks, the label rule, the shortcut."""
import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from csr_widgets.data import SyntheticCXR, collate
from csr_widgets.data.synthetic import CLASSES, label_of, shortcut_rates

CONCEPTS = ["nodule", "consolidation", "cavity", "effusion", "pneumothorax", "cardiomegaly"]


def test_names_and_item_format():
    data = SyntheticCXR(n=5, seed=0, image_size=64)
    assert data.concepts == CONCEPTS
    assert data.classes == ["healthy", "sick", "tb"]
    item = data[1]
    assert set(item) == {"image", "concepts", "label", "boxes", "shortcut_box", "id"}
    assert item["image"].dtype == torch.float32 and item["image"].shape == (1, 64, 64)
    assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0
    assert item["concepts"].dtype == torch.float32 and isinstance(item["label"], int)
    assert item["shortcut_box"] is None and item["id"] == "synthetic-train-0-1"
    for name, *coords in item["boxes"]:
        assert name in CONCEPTS and all(isinstance(c, float) and c == int(c) for c in coords)
    rgb = SyntheticCXR(n=5, seed=0, image_size=64, channels=3)[1]["image"]
    assert rgb.shape == (3, 64, 64) and torch.equal(rgb[2], item["image"][0])


def test_deterministic_per_seed_and_index_without_global_rng():
    np.random.seed(1)
    torch.manual_seed(1)
    state = np.random.get_state()[1].copy()
    a = SyntheticCXR(n=20, seed=7, image_size=64)
    b = SyntheticCXR(n=20, seed=7, image_size=64)
    for index in (0, 13, 19):
        x, y = a[index], b[index]
        assert torch.equal(x["image"], y["image"]) and x["boxes"] == y["boxes"] and x["label"] == y["label"]
    assert torch.equal(a[13]["image"], a[13]["image"])  # order of access does not matter
    assert np.array_equal(np.random.get_state()[1], state)  # the global RNG was not touched
    assert not torch.equal(a[3]["image"], SyntheticCXR(n=20, seed=8, image_size=64)[3]["image"])
    assert not torch.equal(a[3]["image"], SyntheticCXR(n=20, seed=7, image_size=64, split="test")[3]["image"])
    assert torch.equal(a[-1]["image"], a[19]["image"])


def test_boxes_are_tight_boxes_of_the_masks_and_match_the_concepts():
    data = SyntheticCXR(n=30, seed=1, image_size=96, masks=True)
    seen = set()
    for index in range(len(data)):
        item = data[index]
        masks = item["masks"]
        assert masks.shape == (6, 96, 96) and masks.dtype == torch.bool
        names = {name for name, *_ in item["boxes"]}
        expected = [float(name in names) for name in CONCEPTS]
        assert item["concepts"].tolist() == expected
        assert masks.flatten(1).any(dim=1).float().tolist() == expected
        covered = torch.zeros_like(masks)
        for name, x0, y0, x1, y1 in item["boxes"]:
            x0, y0, x1, y1 = int(x0), int(y0), int(x1), int(y1)
            assert 0 <= x0 < x1 <= 96 and 0 <= y0 < y1 <= 96
            inside = masks[CONCEPTS.index(name), y0:y1, x0:x1]
            # tight: every edge row and column of the box holds a mask pixel
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
            covered[CONCEPTS.index(name), y0:y1, x0:x1] = True
            seen.add(name)
        assert not (masks & ~covered).any()  # no mask pixel outside its concept's boxes
    assert seen == set(CONCEPTS)


def test_nodules_are_small_and_the_scene_is_the_same_at_every_size():
    small = SyntheticCXR(n=30, seed=2, image_size=64)
    large = small.replace(image_size=256)
    widths = []
    for index in range(30):
        a, b = small[index], large[index]
        assert a["label"] == b["label"] and torch.equal(a["concepts"], b["concepts"])
        assert [n for n, *_ in a["boxes"]] == [n for n, *_ in b["boxes"]]
        for (_, *ca), (name, *cb) in zip(a["boxes"], b["boxes"]):
            assert np.allclose(np.array(ca) * 4, cb, atol=6)  # same geometry, rounding at 64 px
            if name == "nodule":
                widths.append((cb[2] - cb[0]) / 256)
    assert widths and max(widths) < 0.10


def test_film_settings_scale_the_patient_and_the_exposure_deterministically():
    plain = SyntheticCXR(n=6, seed=3, image_size=96, split="test")
    same = plain.replace(anatomy_scale=1.0, gamma=1.0, contrast=1.0)
    for index in range(6):  # the defaults change nothing
        assert torch.equal(plain[index]["image"], same[index]["image"])
    # magnification about the image centre: every box grows (or shrinks) about (48, 48)
    for zoom in (0.85, 1.15):
        scaled = plain.replace(anatomy_scale=zoom)
        for index in range(6):
            for (_, *a), (_, *b) in zip(plain[index]["boxes"], scaled[index]["boxes"]):
                centre = [(a[0] + a[2]) / 2 - 48, (a[1] + a[3]) / 2 - 48]
                moved = [(b[0] + b[2]) / 2 - 48, (b[1] + b[3]) / 2 - 48]
                assert moved == pytest.approx([zoom * c for c in centre], abs=1.5)
    # exposure by hand: pixels ** gamma, then contrast about the mean, clipped
    image = plain[2]["image"][0].numpy()
    exposed = plain.replace(gamma=0.7, contrast=1.2)[2]["image"][0].numpy()
    curved = image ** np.float32(0.7)
    np.testing.assert_allclose(exposed, np.clip(curved.mean() + 1.2 * (curved - curved.mean()), 0, 1), atol=1e-6)
    # ranges: one draw per item, within the range, the same at every access
    ranged = plain.replace(anatomy_scale=(0.85, 1.15), gamma=(0.7, 1.4), contrast=(0.8, 1.2))
    draws = [ranged.film_settings(i) for i in range(6)]
    assert draws == [ranged.film_settings(i) for i in range(6)] and len({d["gamma"] for d in draws}) == 6
    assert all(0.85 <= d["anatomy_scale"] <= 1.15 and 0.7 <= d["gamma"] <= 1.4 and 0.8 <= d["contrast"] <= 1.2 for d in draws)
    fixed = plain.replace(**draws[4])
    assert torch.equal(ranged[4]["image"], fixed[4]["image"]) and ranged[4]["boxes"] == fixed[4]["boxes"]


def test_a_corner_marker_keeps_its_size_when_the_patient_is_scaled():
    data = SyntheticCXR(n=40, seed=0, image_size=128, shortcut="marker", shortcut_correlation=0.0)
    index = next(i for i in range(40) if data[i]["shortcut_box"] is not None)
    for zoom in (0.85, 1.15):
        assert data.replace(anatomy_scale=zoom)[index]["shortcut_box"] == data[index]["shortcut_box"]


def test_label_rule_by_hand():
    zero = [0, 0, 0, 0, 0, 0]
    assert label_of(zero) == 0
    assert label_of([1, 0, 0, 0, 0, 0]) == 1  # nodule alone: sick
    assert label_of([0, 1, 0, 0, 0, 0]) == 1  # consolidation alone: sick
    assert label_of([1, 1, 0, 0, 0, 0]) == 2  # nodule + consolidation: tb
    assert label_of([0, 0, 1, 0, 0, 0]) == 2  # cavity: tb
    assert label_of([0, 0, 0, 1, 1, 1]) == 1  # effusion, pneumothorax, cardiomegaly: sick
    assert label_of(np.array([zero, [0, 0, 1, 1, 0, 0]])).tolist() == [0, 2]
    data = SyntheticCXR(n=300, seed=3, image_size=64)
    annotations = [data.annotate(i) for i in range(300)]
    for a in annotations:
        assert a["label"] == a["clean_label"] == label_of(a["concepts"])
    counts = np.bincount([a["label"] for a in annotations], minlength=3) / 300
    assert (counts > 0.25).all()  # every class reasonably frequent
    for index in (0, 1, 2, 3):
        item = data[index]
        assert item["label"] == label_of(item["concepts"].numpy()) == annotations[index]["label"]


def test_label_noise_flips_the_asked_fraction_to_other_classes():
    data = SyntheticCXR(n=4000, seed=4, image_size=64, label_noise=0.2)
    pairs = np.array([(a["label"], a["clean_label"]) for a in map(data.annotate, range(4000))])
    flipped = pairs[:, 0] != pairs[:, 1]
    assert abs(flipped.mean() - 0.2) < 4 * math.sqrt(0.2 * 0.8 / 4000)


def test_shortcut_rates_give_the_phi_by_hand():
    a, b = shortcut_rates(0.9, 1 / 3)
    assert a == pytest.approx(1 / 3 + 0.9 * 2 / 3) and b == pytest.approx(1 / 30)
    assert shortcut_rates(0.0, 0.25) == (0.25, 0.25)
    with pytest.raises(ValueError, match="not reachable"):
        shortcut_rates(-0.9, 1 / 3)


@pytest.mark.parametrize("correlation", [0.9, 0.0])  # the training and the decorrelated test split
def test_shortcut_correlation_measured_on_a_large_sample(correlation):
    n = 10000
    data = SyntheticCXR(n=n, seed=5, image_size=64, shortcut="marker", shortcut_correlation=correlation)
    rows = [data.annotate(i) for i in range(n)]
    shortcut = np.array([r["shortcut"] for r in rows], float)
    is_class = np.array([r["label"] == CLASSES.index("tb") for r in rows], float)
    phi = np.corrcoef(shortcut, is_class)[0, 1]
    assert abs(phi - correlation) < 4 * (1 - correlation**2) / math.sqrt(n) + 0.005


def test_decorrelated_test_split_is_fresh_and_shortcut_independent():
    train = SyntheticCXR(n=50, seed=6, image_size=64, shortcut="pacemaker", shortcut_correlation=1.0)
    labels = [train.annotate(i) for i in range(50)]
    assert all(a["shortcut"] == (a["label"] == 2) for a in labels)  # a perfect shortcut
    test = train.decorrelate(n=30)
    assert (test.split, len(test), test.shortcut_correlation, test.shortcut) == ("test", 30, 0.0, "pacemaker")
    assert not torch.equal(test[0]["image"], train[0]["image"])


def test_shortcut_is_drawn_in_its_box_and_nowhere_else():
    kwargs = dict(n=40, seed=8, image_size=128, shortcut_correlation=0.0)
    for kind in ("marker", "pacemaker"):
        with_shortcut = SyntheticCXR(shortcut=kind, **kwargs)
        without = SyntheticCXR(shortcut=None, **kwargs)
        drawn = 0
        for index in range(40):
            a, b = with_shortcut[index], without[index]
            assert a["boxes"] == b["boxes"] and b["shortcut_box"] is None
            if a["shortcut_box"] is None:
                assert torch.equal(a["image"], b["image"])
                continue
            drawn += 1
            x0, y0, x1, y1 = map(int, a["shortcut_box"])
            outside = torch.ones(128, 128, dtype=torch.bool)
            outside[y0:y1, x0:x1] = False
            assert torch.equal(a["image"][0][outside], b["image"][0][outside])
            assert a["image"][0, y0:y1, x0:x1].max() > 0.85  # metal is bright
        assert drawn >= 5


def test_lesion_controls():
    counted = SyntheticCXR(n=60, seed=9, image_size=64, lesions={"nodule": {"count": (3, 3)}})
    nodule_images = 0
    for index in range(60):
        nodules = [b for b in counted[index]["boxes"] if b[0] == "nodule"]
        assert len(nodules) in (0, 3)
        nodule_images += bool(nodules)
    assert nodule_images > 5
    never = SyntheticCXR(n=200, seed=9, image_size=64, lesions={"nodule": {"prevalence": 0.0}})
    assert not any(never.annotate(i)["concepts"][0] for i in range(200))
    easy = SyntheticCXR(n=80, seed=10, image_size=128, lesions={"nodule": {"prevalence": 1.0}})
    hard = easy.replace(difficulty=1.0)
    widths = {d: [] for d in ("easy", "hard")}
    for index in range(80):
        for key, data in (("easy", easy), ("hard", hard)):
            widths[key] += [b[3] - b[1] for b in data[index]["boxes"] if b[0] == "nodule"]
    # difficulty 1 shrinks lesions to 70 %
    assert np.mean(widths["hard"]) / np.mean(widths["easy"]) == pytest.approx(0.7, abs=0.08)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(shortcut="tattoo"), "shortcut"),
        (dict(shortcut="marker", shortcut_correlation=-0.9), "not reachable"),
        (dict(split="holdout"), "split"),
        (dict(image_size=16), "image_size"),
        (dict(lesions={"tumour": {}}), "unknown concept"),
        (dict(lesions={"nodule": {"colour": 1}}), "unknown fields"),
        (dict(lesions={"cardiomegaly": {"count": (1, 2)}}), "at most 1"),
        (dict(lesions={"cavity": {"prevalence": 0.0}, "nodule": {"prevalence": 0.0}}), "impossible"),
        (dict(label_noise=1.0), "label_noise"),
        (dict(channels=2), "channels"),
        (dict(gamma=0.0), "gamma"),
        (dict(anatomy_scale=(1.1, 0.9)), "anatomy_scale"),
        (dict(contrast=(-1, 1)), "contrast"),
    ],
)
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SyntheticCXR(n=4, **kwargs)


def test_index_out_of_range():
    with pytest.raises(IndexError):
        SyntheticCXR(n=4, image_size=64)[4]


def test_collate_for_a_dataloader():
    data = SyntheticCXR(n=6, seed=11, image_size=64, shortcut="marker", masks=True)
    batch = next(iter(DataLoader(data, batch_size=3, collate_fn=collate)))
    items = [data[i] for i in range(3)]
    assert batch["image"].shape == (3, 1, 64, 64) and torch.equal(batch["image"][2], items[2]["image"])
    assert batch["concepts"].shape == (3, 6) and batch["masks"].shape == (3, 6, 64, 64)
    assert batch["label"].dtype == torch.long and batch["label"].tolist() == [i["label"] for i in items]
    assert batch["boxes"] == [i["boxes"] for i in items]
    assert batch["shortcut_box"] == [i["shortcut_box"] for i in items] and len(batch["id"]) == 3
    with pytest.raises(ValueError, match="image_size"):
        collate([data[0], SyntheticCXR(n=1, image_size=32)[0]])
