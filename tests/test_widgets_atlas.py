"""AtlasExplorer with a constructed atlas and a small real dataset and refit."""
from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score
from torch.nn import functional as F

from csr_widgets import CSRConfig, CSRModel
from csr_widgets.widgets import AtlasExplorer, CSRExplorer
from csr_widgets.evaluation.atlas import atlas_entry

K, M = 3, 4


@pytest.fixture(scope="module")
def base_model() -> CSRModel:
    torch.manual_seed(0)
    config = CSRConfig(
        concepts=["nodule", "effusion", "cavity"], classes=["healthy", "sick"], backbone="resnet18", feature_stage=2,
        image_size=64, in_channels=1, prototypes_per_concept=M, embedding_dim=16,
        cell_offset=0.0,  # a resnet's, known: skips measuring it (a slow gradient probe)
    )
    model = CSRModel(config).eval()
    with torch.no_grad():
        model.task_head.linear.weight.normal_()
        model.task_head.score_mean.fill_(0.3)
        model.task_head.score_std.fill_(0.1)
    return model


@pytest.fixture
def model(base_model) -> CSRModel:
    return copy.deepcopy(base_model)  # each test may prune and refit its own copy


def make_items(n: int, seed: int) -> list[dict]:
    """Images whose label is whether a bright square is present: learnable by a refit."""
    generator = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        image = torch.rand(1, 64, 64, generator=generator) * 0.3
        label = i % 2
        if label:
            image[:, 20:40, 20:40] = 0.9
        items.append({"image": image, "concepts": torch.tensor([float(label), 1.0, 0.0]), "label": label, "boxes": []})
    return items


@pytest.fixture(scope="module")
def dataset():
    return make_items(12, 0)


@pytest.fixture(scope="module")
def validation():
    return make_items(8, 1)


class Atlas:
    """A constructed atlas: entry (k, m) is a crop of training image (k * M + m) % 12."""

    def __init__(self, dataset, missing=()):
        self.dataset, self.missing = dataset, set(missing)
        self.usage = np.arange(K * M).reshape(K, M)[:, ::-1].copy()

    def __getitem__(self, key):
        if key in self.missing:
            return None
        k, m = key
        index = (k * M + m) % len(self.dataset)
        image = self.dataset[index]["image"][0]
        crop = (image[8:40, 16:48].numpy() * 255).astype(np.uint8)
        return SimpleNamespace(crop=crop, source_index=index, location=(16, 8, 48, 40), similarity=0.5 + 0.01 * m)


def refit_head(model, dataset, progress=None, steps: int = 30):
    """A small real refit: the task head on the (masked) scores, by gradient descent."""
    images = torch.stack([item["image"] for item in dataset])
    labels = torch.tensor([item["label"] for item in dataset])
    with torch.no_grad():
        scores = model.reason(model.encode(images)).scores
        features = (model.task_head.standardise(scores) * model.prototype_mask).flatten(1)
    optimiser = torch.optim.Adam(model.task_head.linear.parameters(), lr=0.1)
    for step in range(steps):
        optimiser.zero_grad()
        F.cross_entropy(model.task_head.linear(features), labels).backward()
        optimiser.step()
        if progress is not None:
            progress((step + 1) / steps)


def test_usage_counts_and_sorting(model, dataset):
    atlas = Atlas(dataset)
    del atlas.usage  # an atlas without counts: the explorer counts them on the dataset
    ax = AtlasExplorer(model, atlas, dataset)
    # each image adds one count per present concept: nodule in 6 images, effusion in all 12
    assert ax.usage.shape == (K, M)
    assert ax.usage.sum(1).tolist() == [6, 12, 0]
    with torch.no_grad():
        best = model.reason(model.encode(torch.stack([d["image"] for d in dataset]))).scores.argmax(-1)
    assert ax.usage[1].tolist() == np.bincount(best[:, 1].numpy(), minlength=M).tolist()
    order = ax.order("effusion")
    assert [ax.usage[1, m] for m in order] == sorted(ax.usage[1], reverse=True)
    ax._sort.value = "weight"
    weights = model.task_head.linear.weight.detach().view(-1, K, M).abs().amax(0)
    assert ax.order("nodule") == sorted(range(M), key=lambda m: (-float(weights[0, m]), m))
    ax._sort.value = "index"
    assert ax.order(2) == list(range(M))


def test_usage_comes_from_the_atlas_when_it_has_counts(model, dataset):
    atlas = Atlas(dataset, missing={(0, 1)})
    np.testing.assert_array_equal(AtlasExplorer(model, atlas, dataset).usage, atlas.usage)  # no pass over the dataset
    ax = AtlasExplorer(model, atlas)
    np.testing.assert_array_equal(ax.usage, atlas.usage)
    assert ax.order(0) == [0, 1, 2, 3]  # usage reversed by construction: highest first
    # "apply" cannot refit without the training images, and says so
    assert ax._apply_button.disabled and "AtlasExplorer(model, atlas, dataset)" in ax._apply_button.tooltip
    assert "needs the training images" in ax._status.value
    assert ax.f1_start is None and "no validation" in ax._f1.value
    tile_image = ax._tiles[0, 1].children[0]
    assert tile_image.value == b""  # no entry: an empty tile, no error
    assert ax._tiles[0, 0].children[0].value[:4] == b"\x89PNG"


def test_tiles_show_the_prototypes_similarity_on_its_source_image(model, dataset):
    ax = AtlasExplorer(model, Atlas(dataset), dataset, tile_size=32)
    positive = 0
    for k in range(K):
        for m in range(M):
            entry = atlas_entry(ax.atlas, k, m)
            heat = ax._source_heat(k, m, entry)
            with torch.no_grad():
                maps = model.encode(dataset[entry.source_index]["image"][None]).similarity_maps[0, k, m]
            full = model.grid.upsample(maps.clamp(min=0), (64, 64)).numpy()
            if full.max() > 0:
                positive += 1
                full /= full.max()  # scaled by the whole source map's maximum
            np.testing.assert_allclose(heat, full[8:40, 16:48], atol=1e-5)  # the crop's region, same grid
    assert positive > 0


def test_pruning_writes_the_mask_and_exports(model, dataset):
    ax = AtlasExplorer(model, Atlas(dataset))
    revisions = []
    ax.observe(lambda change: revisions.append(change["new"]), names="revision")
    ax._toggles[1, 2].value = False  # the "keep" box, as the browser unticks it
    assert not bool(model.prototype_mask[1, 2]) and int(model.prototype_mask.sum()) == K * M - 1
    assert revisions == [1]
    ax.set_pruned("cavity", 0)
    exported = ax.export_mask()
    assert exported["pruned"] == {"nodule": [], "effusion": [2], "cavity": [0]}
    assert ax._toggles[2, 0].value is False
    # a pruned prototype enters the head as 0: the prediction is what the model says with the mask
    image = dataset[0]["image"][None]
    with torch.no_grad():
        out = model(image)
        by_hand = ((out.scores - model.task_head.score_mean) / model.task_head.score_std) * model.prototype_mask
    torch.testing.assert_close(out.logits, model.task_head.linear(by_hand.flatten(1)))

    other = AtlasExplorer(copy.deepcopy(model), Atlas(dataset))
    other.load_mask(np.ones((K, M), bool))
    assert bool(other.model.prototype_mask.all())
    other.load_mask(json.dumps(exported))
    assert torch.equal(other.model.prototype_mask, model.prototype_mask)
    with pytest.raises(ValueError, match="shape"):
        other.load_mask(np.ones((2, 2), bool))
    with pytest.raises(ValueError, match="concepts"):
        other.load_mask({**exported, "concepts": ["a", "b", "c"]})
    with pytest.raises(ValueError, match="out of range"):
        other.load_mask({**exported, "pruned": {"nodule": [9]}})
    other._mask_text.value = "not a mask"
    other._load_clicked()
    assert "cannot load" in other._status.value


def test_save_and_load_mask_files(model, dataset, tmp_path):
    ax = AtlasExplorer(model, Atlas(dataset))
    ax.set_pruned(0, 3)
    ax.save_mask(tmp_path / "mask.json")
    ax.set_pruned(0, 3, pruned=False)
    ax.load_mask(tmp_path / "mask.json")
    assert not bool(model.prototype_mask[0, 3])


def test_apply_refits_with_progress_and_reports_f1(model, dataset, validation):
    calls = []

    def refit(model_, dataset_, progress):
        calls.append((model_, dataset_))
        refit_head(model_, dataset_, progress)

    ax = AtlasExplorer(model, Atlas(dataset), dataset, validation=validation, refit=refit)
    seen = []
    ax._progress.observe(lambda change: seen.append(change["new"]), names="value")
    ax.set_pruned("cavity", 1)
    before, after = ax.apply()
    assert calls == [(model, dataset)]
    assert seen[-1] == 1.0 and len(seen) >= 10  # the bar moved while refitting
    # F1 as sklearn computes it from the model's own predictions
    images = torch.stack([item["image"] for item in validation])
    with torch.no_grad():
        predicted = model(images).prediction.numpy()
    truth = [item["label"] for item in validation]
    assert after == pytest.approx(f1_score(truth, predicted, average="macro"))
    assert after >= before and after > 0.9  # the bright square is easy once refitted
    assert f"{before:.3f} &rarr; {after:.3f}" in ax._f1.value
    assert ax.revision >= 2


def test_apply_without_progress_and_failures_are_reported(model, dataset):
    ax = AtlasExplorer(model, Atlas(dataset), dataset, refit=lambda m, d: refit_head(m, d, steps=2))
    ax.apply()  # a refit without a progress parameter is called without one
    assert "F1 on the refit data" in ax._f1.value

    def broken(model_, dataset_, **kwargs):
        raise RuntimeError("diverged")

    ax = AtlasExplorer(model, Atlas(dataset), dataset, refit=broken)
    ax._apply_clicked()
    assert "refit failed" in ax._status.value and "diverged" in ax._status.value
    assert not ax._apply_button.disabled


def test_bad_arguments(model, dataset):
    with pytest.raises(TypeError, match="CSRModel"):
        AtlasExplorer(object(), Atlas(dataset))
    with pytest.raises(ValueError, match="sort"):
        AtlasExplorer(model, Atlas(dataset), sort="colour")
    with pytest.raises(ValueError, match="crop"):
        AtlasExplorer(model, {(0, 0): {"source_index": 1}, (0, 1): None})
    with pytest.raises(ValueError, match="dataset"):
        AtlasExplorer(model, Atlas(dataset)).apply()


def test_explorer_shows_the_atlas_crop_of_each_concepts_best_prototype(model, dataset):
    atlas = Atlas(dataset)
    ex = CSRExplorer(model, dataset[3]["image"], atlas=atlas, display_size=128)
    best = ex.result.scores[0].argmax(-1).tolist()
    from csr_widgets.widgets import render

    for k, name in enumerate(model.concepts):
        expected = render.encode_png(render.crop_rgba(atlas[k, best[k]].crop))
        assert ex.panel.crops[name].value == expected


def test_the_packages_atlas_and_default_refit(model, dataset):
    """csr_widgets.evaluation.atlas.Atlas (columns), and the default refit_task_head."""
    from csr_widgets.evaluation.atlas import Atlas as PackageAtlas

    image_index = torch.arange(K * M).view(K, M) % len(dataset)
    image_index[2] = -1  # cavity never present: no entries
    boxes = torch.tensor([16.0, 8.0, 48.0, 40.0]).expand(K, M, 4).clone()
    crops = torch.stack([torch.stack([(dataset[int(i) % 12]["image"][0, 8:40, 16:48] * 255).to(torch.uint8) for i in row]) for row in image_index.clamp(min=0)])
    atlas = PackageAtlas(
        image_index=image_index, location=boxes[..., :2] + 16, similarity=torch.full((K, M), 0.8),
        usage=torch.ones(K, M, dtype=torch.long), crop_boxes=boxes, crops=crops, concepts=list(model.concepts),
    )
    entry = atlas_entry(atlas, 1, 2)
    assert entry.source_index == 6 and entry.location == (16.0, 8.0, 48.0, 40.0) and entry.similarity == pytest.approx(0.8)
    np.testing.assert_array_equal(entry.crop, atlas.crop(1, 2))
    assert atlas_entry(atlas, 2, 0) is None
    ax = AtlasExplorer(model, atlas, dataset)
    assert ax._tiles[2, 0].children[0].value == b""
    ax.set_pruned("nodule", 0)
    before, after = ax.apply()  # csr_widgets.training.refit_task_head, for real
    assert ax._progress.value == 1.0 and after is not None
    assert ax._status.value == "refitted"


def test_tiles_say_what_they_mean_in_words(model, dataset):
    ax = AtlasExplorer(model, Atlas(dataset, missing={(0, 1)}))
    caption = ax._captions[1, 2].value
    weight = float(model.task_head.linear.weight.detach().view(-1, K, M).abs().amax(0)[1, 2])
    assert "prototype 2" in caption and f"best match in {ax.usage[1, 2]} training images" in caption
    assert f"head weight {weight:.2f}" in caption and "similarity" in caption and "image #" in caption
    assert "no training image shows its concept" in ax._captions[0, 1].value


def test_every_view_of_a_model_shows_its_mask(model, dataset):
    with torch.no_grad():
        model.prototype_mask[0, 2] = False  # pruned before any explorer opened
    first, second = AtlasExplorer(model, Atlas(dataset)), AtlasExplorer(model, Atlas(dataset))
    for ax in (first, second):
        assert ax._toggles[0, 2].value is False and "csr-pruned" in ax._tiles[0, 2]._dom_classes
        assert "pruned" in ax._captions[0, 2].value
    image = dataset[3]["image"]
    explorer = CSRExplorer(model, image, display_size=128, questions=False)
    before = explorer.result
    first._toggles[1, 1].value = False  # pruned in one explorer...
    assert second._toggles[1, 1].value is False and "csr-pruned" in second._tiles[1, 1]._dom_classes  # ...shown in the other
    assert explorer.result is not before  # and the live explorer reasons with the new mask
    with torch.no_grad():
        torch.testing.assert_close(explorer.result.logits, model(image[None]).logits)
    second.set_pruned(1, 1, pruned=False)
    assert first._toggles[1, 1].value is True and "csr-pruned" not in first._tiles[1, 1]._dom_classes
