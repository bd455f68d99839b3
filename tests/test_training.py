"""Training: losses by hand, the stage table, re-seeding, a real (tiny) run, atlas, resume."""
import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch.nn import functional as F
from torch.utils.data import Dataset

from csr_widgets import CSRConfig, CSRModel
from csr_widgets.evaluation.atlas import Atlas, build_atlas
from csr_widgets.training import STAGES, TrainingPlan, set_stage, train
from csr_widgets.training.losses import box_loss, local_concept_vectors, prototype_loss
from csr_widgets.training.features import cache_features
from csr_widgets.training.fitting import _reseed, box_cells, concept_validation, refit_task_head, train_concepts, train_prototypes


class Squares(Dataset):
    """A toy with an obvious answer: concept "bright" is a white square, "dark" a black one
    on grey; the label is "bright" present. Boxes are exact."""

    concepts = ["bright", "dark"]
    classes = ["no", "yes"]

    def __init__(self, n: int, seed: int = 0, size: int = 48):
        self.n, self.seed, self.size = n, seed, size

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        rng = np.random.default_rng([self.seed, index])
        image = np.full((1, self.size, self.size), 0.5, np.float32)
        present = rng.integers(0, 2, 2)
        boxes = []
        for k, value in enumerate((1.0, 0.0)):
            if present[k]:
                x, y = rng.integers(0, self.size - 10, 2)
                image[0, y : y + 10, x : x + 10] = value
                boxes.append((self.concepts[k], float(x), float(y), float(x + 10), float(y + 10)))
        return {"image": torch.from_numpy(image), "concepts": torch.tensor(present, dtype=torch.float32),
                "label": int(present[0]), "boxes": boxes}


def toy_model(seed: int = 0) -> CSRModel:
    torch.manual_seed(seed)
    config = CSRConfig(concepts=Squares.concepts, classes=Squares.classes, backbone="resnet18", feature_stage=1,
                       image_size=48, prototypes_per_concept=3, embedding_dim=8, gamma=10.0)
    return CSRModel(config)


def test_prototype_loss_matches_a_hand_computation():
    # 2 concepts x 2 prototypes in 2-D; one vector of concept 0
    prototypes = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[-1.0, 0.0], [0.6, 0.8]]])
    vector = torch.tensor([[0.8, 0.6]])
    lam, gamma, delta = 20.0, 2.0, 0.1
    cos = {(0, 0): 0.8, (0, 1): 0.6, (1, 0): -0.8, (1, 1): 0.96}

    def sim(k):
        weights = [math.exp(gamma * cos[(k, m)]) for m in (0, 1)]
        return sum(w * cos[(k, m)] for m, w in zip((0, 1), weights)) / sum(weights)

    logits = [lam * (sim(0) - delta), lam * sim(1)]
    expected = -logits[0] + math.log(sum(math.exp(v) for v in logits))
    loss = prototype_loss(vector, torch.tensor([0]), prototypes, lam, gamma, delta)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_local_concept_vectors_are_the_softmax_weighted_sums():
    torch.manual_seed(0)
    features, cams = torch.randn(2, 5, 3, 4), torch.randn(2, 3, 3, 4)
    vectors = local_concept_vectors(features, cams)
    for b in range(2):
        for k in range(3):
            weights = torch.exp(cams[b, k]) / torch.exp(cams[b, k]).sum()
            by_hand = sum(weights[i, j] * features[b, :, i, j] for i in range(3) for j in range(4))
            torch.testing.assert_close(vectors[b, k], by_hand)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_stage_table_decides_what_trains(stage):
    model = toy_model()
    params = set_stage(model, stage)
    trainable = {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(STAGES[stage][1])
    assert {id(p) for p in params} == {id(p) for p in model.parameters() if p.requires_grad}
    assert model.backbone.training == (stage == 1)  # a frozen backbone keeps its BN statistics


def test_reseeding_revives_dead_prototypes():
    model = toy_model()
    vectors = torch.randn(20, model.backbone.out_channels)
    concepts = torch.tensor([0] * 10 + [1] * 10)
    dead = torch.zeros(2, 3, dtype=torch.bool)
    dead[0, 2] = dead[1, 0] = True
    with torch.no_grad():
        model.prototypes[0, 2] = model.prototypes[1, 0] = torch.tensor([1.0] + [0.0] * 7)  # far from everything
        before = model.prototypes.clone()
        assert _reseed(model, dead, vectors, concepts, torch.Generator().manual_seed(0)) == 2
        projected = model.projector(vectors)
    # a revived prototype sits (up to the small noise) on a projected vector of its own concept
    for k, m in [(0, 2), (1, 0)]:
        own = projected[concepts == k] @ F.normalize(model.prototypes[k, m], dim=0)
        assert own.max() > 0.99
    alive = ~dead
    torch.testing.assert_close(model.prototypes[alive], before[alive])


def test_box_loss_matches_a_hand_computation_and_skips_unboxed_concepts():
    cams = torch.tensor([[[[0.0, 1.0], [2.0, 0.5]], [[3.0, 0.0], [0.0, 0.0]]]])  # (1, 2, 2, 2)
    cells = torch.zeros(1, 2, 2, 2, dtype=torch.bool)
    cells[0, 0, 1, :] = True  # concept 0 boxed on its bottom row; concept 1 has no box
    r = 2.0
    weights = [math.exp(r * v) for v in (0.0, 1.0, 2.0, 0.5)]
    expected = -math.log((weights[2] + weights[3]) / sum(weights))
    assert box_loss(cams, cells, r).item() == pytest.approx(expected, rel=1e-6)
    cams[0, 1] = torch.randn(2, 2)  # an unboxed concept's map does not count
    assert box_loss(cams, cells, r).item() == pytest.approx(expected, rel=1e-6)
    assert box_loss(cams, torch.zeros_like(cells), r).item() == 0.0


def test_box_cells_are_the_cells_whose_centres_lie_in_the_box():
    model = toy_model()  # stride 4 at 48 px: cell centres 0, 4, 8, ... (offset 0)
    assert (model.grid.stride, model.grid.offset) == (4, 0.0)
    boxes = [[("bright", 6.0, 13.0, 17.0, 14.0), ("elsewhere", 0.0, 0.0, 48.0, 48.0)], []]
    cells = box_cells(model, boxes, (48, 48), (12, 12))
    assert cells.shape == (2, 2, 12, 12) and not cells[1].any() and not cells[0, 1].any()
    rows, cols = cells[0, 0].nonzero(as_tuple=True)
    # x: pixels 6..16 hold the centres 8, 12, 16; y: pixel 13 alone holds none, so the cell
    # nearest it (centre 12) stands in
    assert sorted(set(cols.tolist())) == [2, 3, 4] and sorted(set(rows.tolist())) == [3]


def test_the_box_term_moves_stage_one_evidence_onto_the_boxes():
    shares = {}
    for weight in (0.0, 1.0):
        model = toy_model(seed=0)
        train_concepts(model, Squares(64), None, TrainingPlan(concept_epochs=3, batch_size=16, concept_box_weight=weight), progress=False)
        items = [Squares(32, seed=1)[i] for i in range(32)]
        with torch.no_grad():
            maps = model.encode(torch.stack([item["image"] for item in items])).concept_maps
        cells = box_cells(model, [item["boxes"] for item in items], (48, 48), tuple(maps.shape[-2:]))
        shares[weight] = math.exp(-box_loss(maps, cells, model.config.pooling_sharpness).item())
    assert shares[1.0] > shares[0.0] + 0.1, shares


def test_the_box_term_asks_for_boxes():
    class Unboxed(Squares):
        def __getitem__(self, index):
            return {key: value for key, value in super().__getitem__(index).items() if key != "boxes"}

    with pytest.raises(ValueError, match="concept_box_weight"):
        train_concepts(toy_model(), Unboxed(16), None, TrainingPlan(concept_epochs=1, batch_size=16, concept_box_weight=0.1), progress=False)


def test_stage_two_reports_usage_and_keeps_prototypes_alive():
    model = toy_model()
    cache = cache_features(model, Squares(40), progress=False)
    history = train_prototypes(model, cache, None, TrainingPlan(prototype_epochs=3), progress=False)
    assert [row["prototypes_in_use"] <= 6 for row in history] == [True] * 3
    assert history[-1]["prototypes_in_use"] >= 2


def test_short_training_beats_chance_and_points_at_the_squares():
    model = toy_model()
    plan = TrainingPlan(concept_epochs=4, prototype_epochs=10, task_epochs=30, batch_size=16, concept_lr=3e-3)
    train(model, Squares(240), Squares(60, seed=1), plan, progress=False)
    test = Squares(100, seed=2)
    batch = [test[i] for i in range(len(test))]
    images = torch.stack([item["image"] for item in batch])
    labels = torch.tensor([item["label"] for item in batch])
    with torch.no_grad():
        out = model(images)
    accuracy = (out.probs.argmax(-1) == labels).float().mean().item()
    assert accuracy > 0.8  # chance is about 0.5
    # the "bright" maps peak inside the bright square on most images that have one
    maps = model.grid.upsample(out.similarity_maps[:, 0].amax(1), (48, 48))
    hits = []
    for item, heat in zip(batch, maps):
        for name, x0, y0, x1, y1 in item["boxes"]:
            if name == "bright":
                y, x = divmod(int(heat.argmax()), 48)
                hits.append(x0 <= x < x1 and y0 <= y < y1)
    assert np.mean(hits) > 0.6


def test_stage_one_keeps_the_best_auc_epoch_and_breaks_ties_by_validation_loss():
    model, plan = toy_model(seed=0), TrainingPlan(concept_epochs=4, batch_size=16)
    history = pd.DataFrame(train_concepts(model, Squares(64), Squares(32, seed=1), plan, progress=False))
    best = history.sort_values(["val_concept_auc", "val_concept_loss"], ascending=[False, True]).iloc[0]
    # a tie to break here: the first epoch at the best AUC is not the one kept
    assert best["epoch"] > history.loc[history["val_concept_auc"].idxmax(), "epoch"]
    auc, loss = concept_validation(model, Squares(32, seed=1))
    assert (auc, loss) == pytest.approx((best["val_concept_auc"], best["val_concept_loss"]), abs=1e-6)


def test_training_is_deterministic_and_resumes(tmp_path):
    plan = TrainingPlan(concept_epochs=1, prototype_epochs=2, task_epochs=2, batch_size=16)
    first, second = toy_model(seed=0), toy_model(seed=0)
    recorded = train(first, Squares(48), None, plan, progress=False, out_dir=tmp_path / "a")
    train(second, Squares(48), None, plan, progress=False)
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name
    assert {p.name for p in (tmp_path / "a").iterdir()} >= {"stage1.safetensors", "stage2.safetensors", "stage3.safetensors", "model.safetensors"}
    resumed = toy_model(seed=5)  # other initial weights: everything must come from the files
    history = train(resumed, Squares(48), None, plan, progress=False, out_dir=tmp_path / "a")
    # nothing retrained, and the run's history is still all there (read back from the folder)
    assert history[["stage", "epoch"]].values.tolist() == recorded[["stage", "epoch"]].values.tolist()
    assert history["train_loss"].tolist() == pytest.approx(recorded["train_loss"].tolist())
    for (name, a), b in zip(first.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_resume_refuses_a_corrupt_or_foreign_stage_file(tmp_path):
    (tmp_path / "stage1.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="not a readable safetensors"):
        train(toy_model(), Squares(8), None, TrainingPlan(concept_epochs=1), progress=False, out_dir=tmp_path)
    other = CSRModel(CSRConfig(concepts=["a", "b"], classes=["x", "y"], feature_stage=1, image_size=48, prototypes_per_concept=5, embedding_dim=8))
    other.save(tmp_path / "stage1.safetensors")
    with pytest.raises(ValueError, match=r"shape of prototypes: checkpoint \(2, 5, 8\) != model \(2, 3, 8\)"):
        train(toy_model(), Squares(8), None, TrainingPlan(concept_epochs=1), progress=False, out_dir=tmp_path)


def test_datasets_with_other_names_are_refused():
    class Renamed(Squares):
        concepts = ["dark", "bright"]

    with pytest.raises(ValueError, match="concepts"):
        train(toy_model(), Renamed(4), None, TrainingPlan(concept_epochs=1), progress=False)


def test_refit_uses_the_prototype_mask():
    model = toy_model()
    cache = cache_features(model, Squares(40), progress=False)
    model.prototype_mask[0] = False  # prune every "bright" prototype
    refit_task_head(model, cache, epochs=2, progress=False)
    images = torch.stack([Squares(4)[i]["image"] for i in range(4)])
    with torch.no_grad():
        out = model(images)
    assert torch.count_nonzero(out.contributions[..., 0]) == 0  # pruned: no share of any logit


def test_refit_reports_progress_through_caching_and_epochs():
    model = toy_model()
    seen = []
    refit_task_head(model, Squares(40), Squares(20), epochs=25, progress=False, on_progress=seen.append)
    # 1 batch of caching per dataset (a quarter each), then the L-BFGS rounds over the other
    # half (10 iterations each, fewer when it reaches the optimum), ending at exactly 1
    assert seen[:2] == pytest.approx([0.25, 0.5])
    assert len(seen) >= 3 and seen[-1] == 1.0
    assert all(a < b for a, b in zip(seen, seen[1:]))


def test_atlas_links_each_prototype_to_its_best_match_and_round_trips(tmp_path):
    model = toy_model().eval()
    data = Squares(30)
    atlas = build_atlas(model, data, crop_size=16, progress=False)
    assert atlas.shape == (2, 3) and atlas.crops.shape == (2, 3, 16, 16)
    # Eq. 11 by brute force: best cosine among the vectors of each prototype's concept
    from csr_widgets.training.features import concept_vectors

    vectors, concepts, images = concept_vectors(model, cache_features(model, data, progress=False))
    with torch.no_grad():
        cos = model.projector(vectors) @ F.normalize(model.prototypes, dim=-1).view(6, -1).T
    for k in range(2):
        for m in range(3):
            own = cos[concepts == k, k * 3 + m]
            assert atlas.similarity[k, m].item() == pytest.approx(own.max().item(), abs=1e-5)
            assert atlas.image_index[k, m] == images[concepts == k][own.argmax()]
    assert atlas.usage.sum() == len(vectors)
    path = atlas.save(tmp_path / "model.atlas.safetensors")
    loaded = Atlas.load(path)
    for name in ("image_index", "location", "usage", "crops", "crop_boxes"):
        assert torch.equal(getattr(loaded, name), getattr(atlas, name))
    assert loaded.concepts == atlas.concepts
    loaded.check(model)
    (tmp_path / "bad.safetensors").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a readable atlas"):
        Atlas.load(tmp_path / "bad.safetensors")


def test_build_atlas_reads_the_model_in_eval_mode_and_leaves_its_mode():
    model = toy_model().train()
    data = Squares(12)
    atlas = build_atlas(model, data, crop_size=8, progress=False)
    assert all(m.training for m in model.modules())  # left as it came
    reference = build_atlas(model.eval(), data, crop_size=8, progress=False)
    # read with batch norm's running statistics, which a train-mode pass would have moved
    assert torch.equal(atlas.image_index, reference.image_index) and torch.equal(atlas.location, reference.location)
    torch.testing.assert_close(atlas.similarity, reference.similarity, equal_nan=True)


def test_task_head_reaches_the_optimum_of_its_convex_objective():
    # stage 3 against an independent solver of the same problem: scikit-learn's logistic
    # regression on the same standardised scores. Two classes: the softmax's two weight rows
    # are w/2 and -w/2 at the optimum, so task_l2 * ||W||^2 = (task_l2 / 2) ||w||^2, i.e.
    # C = 1 / (task_l2 * n) in scikit-learn's C * sum(loss) + ||w||^2 / 2.
    from sklearn.linear_model import LogisticRegression

    from csr_widgets.training.features import cached_scores
    from csr_widgets.training.fitting import train_task_head

    model = toy_model()
    model.config.concept_dropout = 0.0  # the rejection copy of the rows equals the rows
    cache = cache_features(model, Squares(40), progress=False)
    train_task_head(model, cache, None, TrainingPlan(task_epochs=300, task_l2=1e-2), progress=False)
    with torch.no_grad():
        scores = cached_scores(model, cache)
        probabilities = model.classify(scores)[1].softmax(-1)[:, 1]
        features = model.task_head.standardise(scores).flatten(1)
    reference = LogisticRegression(C=1 / (1e-2 * len(scores)), tol=1e-10, max_iter=10_000).fit(features.numpy(), cache.labels.numpy())
    assert 0.05 < probabilities.min() and probabilities.max() < 0.95  # a problem where the penalty matters
    np.testing.assert_allclose(probabilities.numpy(), reference.predict_proba(features.numpy())[:, 1], atol=1e-4)
