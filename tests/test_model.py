"""The CSR model core, checked against hand computations."""
import numpy as np
import pytest
import torch
from torch.nn import functional as F

from csr_widgets import Box, CSRConfig, CSRModel, Interaction
from csr_widgets.model import FeatureGrid, importance_map

from .conftest import small_config


def test_reasoning_shapes_and_symbols(model, images):
    out = model(images)
    K, M, N = 3, 4, 3
    assert out.similarity_maps.shape == (2, K, M, 8, 8)  # 64 px / stride 8
    assert out.scores.shape == (2, K, M)
    assert out.concept_logits.shape == (2, K)
    assert out.logits.shape == out.probs.shape == (2, N)
    assert out.contributions.shape == (2, N, K)
    assert out.needs_review.dtype == torch.bool and out.needs_review.shape == (2,)


def test_prototype_equal_to_a_patch_has_similarity_and_score_one(model, images):
    with torch.no_grad():
        patches = model.project(model.features(images))  # (B, h, w, D)
        model.prototypes[1, 2] = patches[0, 3, 5]
        out = model(images)
    assert out.similarity_maps[0, 1, 2, 3, 5].item() == pytest.approx(1.0, abs=1e-5)
    assert out.scores[0, 1, 2].item() == pytest.approx(1.0, abs=1e-5)
    # and the score is the spatial max of the clamped map, computed by hand
    expected = out.similarity_maps.clamp(min=0).flatten(-2).max(-1).values
    torch.testing.assert_close(out.scores, expected)


def test_contributions_sum_to_logits_minus_bias(model, images):
    out = model(images, Interaction(boxes=[Box(0, 0, 30, 30)], rejected={"cavity"}))
    torch.testing.assert_close(out.contributions.sum(-1), out.logits - model.task_head.bias)
    # and each contribution is w_nkm * (s - mean) / std summed over m, by hand
    weight = model.task_head.linear.weight.view(3, 3, 4)
    standardised = (out.scores - model.task_head.score_mean) / model.task_head.score_std
    by_hand = (standardised[:, None] * weight[None]).sum(-1)
    torch.testing.assert_close(out.contributions, by_hand)
    torch.testing.assert_close(out.probs, out.logits.softmax(-1))


def test_encode_then_reason_equals_forward(model, images):
    interaction = Interaction(boxes=[Box(5, 5, 40, 30), Box(10, 10, 20, 20, positive=False)], rejected={"nodule"})
    direct = model(images, interaction)
    staged = model.reason(model.encode(images), interaction)
    for name in ("similarity_maps", "scores", "logits", "probs", "contributions", "needs_review"):
        torch.testing.assert_close(getattr(direct, name), getattr(staged, name))


def test_importance_map_positive_negative_and_overlap():
    positive = importance_map([Box(2, 1, 5, 3)], height=6, width=8, alpha=0.2)
    expected = np.full((6, 8), 0.2, np.float32)
    expected[1:3, 2:5] = 1.0
    np.testing.assert_array_equal(positive, expected)

    negative = importance_map([Box(2, 1, 5, 3, positive=False)], height=6, width=8, alpha=0.2)
    expected = np.ones((6, 8), np.float32)
    expected[1:3, 2:5] = 0.0
    np.testing.assert_array_equal(negative, expected)

    both = importance_map([Box(0, 0, 4, 4), Box(2, 2, 6, 6, positive=False)], height=6, width=8, alpha=0.5)
    expected = np.full((6, 8), 0.5, np.float32)
    expected[0:4, 0:4] = 1.0
    expected[2:6, 2:6] = 0.0  # negative wins where they overlap
    np.testing.assert_array_equal(both, expected)

    # a box edge inside a pixel covers that pixel fractionally
    half = importance_map([Box(0.5, 0, 2, 1)], height=1, width=3, alpha=0.0)
    np.testing.assert_allclose(half, [[0.5, 1.0, 0.0]])


def test_importance_is_area_averaged_onto_cells_around_their_centres(model):
    grid = model.grid  # stride 8, offset 0: cell j covers pixels [8j - 4, 8j + 4)
    assert (grid.stride, grid.offset) == (8, 0.0)
    pixels = torch.zeros(64, 64)
    pixels[:, 4:12] = 1.0  # exactly the pixels nearest to cell 1
    cells = grid.area_average(pixels, (8, 8))
    expected = torch.zeros(8, 8)
    expected[:, 1] = 1.0
    torch.testing.assert_close(cells, expected)
    # cell 0 only owns pixels 0..3 (its centre is pixel 0): half-filled means 0.5
    pixels = torch.zeros(64, 64)
    pixels[:, 0:2] = 1.0
    torch.testing.assert_close(grid.area_average(pixels, (8, 8))[0, 0], torch.tensor(0.5))


def test_upsampling_puts_cell_values_on_their_centre_pixels():
    grid = FeatureGrid(channels=1, stride=8, offset=0.0)
    cells = torch.arange(16.0).view(4, 4)
    pixels = grid.upsample(cells, (32, 32))
    for j in range(4):
        for i in range(4):
            assert pixels[8 * j, 8 * i] == cells[j, i]
    assert pixels[4, 0] == pytest.approx((cells[0, 0] + cells[1, 0]).item() / 2)  # halfway
    assert pixels[31, 31] == cells[3, 3]  # beyond the last centre: constant
    patchify = FeatureGrid(channels=1, stride=4, offset=1.5)
    up = patchify.upsample(torch.tensor([[0.0, 4.0]]), (1, 8))
    torch.testing.assert_close(up, torch.tensor([[0.0, 0.0, 0.5, 1.5, 2.5, 3.5, 4.0, 4.0]]))
    nearest = grid.upsample(cells, (32, 32), mode="nearest")
    assert nearest[3, 3] == cells[0, 0] and nearest[4, 4] == cells[1, 1] and nearest[19, 19] == cells[2, 2] and nearest[20, 20] == cells[3, 3]


def test_peaks_find_the_vertex_of_a_sampled_parabola_below_the_cell_size():
    grid = FeatureGrid(channels=1, stride=8, offset=0.0)
    # cells sample 1 - ((j - 2.3)^2 + (i - 3.6)^2) / 9 around (2.3, 3.6): a parabola along
    # each axis, so the three-point fit recovers the vertex exactly, in pixels 8 * cells
    j, i = torch.meshgrid(torch.arange(6.0), torch.arange(6.0), indexing="ij")
    maps = 1 - ((j - 2.3) ** 2 + (i - 3.6) ** 2) / 9
    torch.testing.assert_close(grid.peaks(maps), torch.tensor([8 * 2.3, 8 * 3.6]))
    torch.testing.assert_close(grid.peak_pixels(maps, (48, 48)), torch.tensor([18.0, 29.0]))  # 18.4, 28.8
    # by hand: left 0, centre 1, right 0.5 -> (0 - 0.5) / (2 (0 - 2 + 0.5)) = 1/6 of a cell
    by_hand = torch.zeros(1, 2, 5, 5)
    by_hand[0, 0, 2, 1:4] = torch.tensor([0.0, 1.0, 0.5])
    # edge cells and plateaus keep the centre; ties go to the first maximum (row-major)
    by_hand[0, 1, 0, 4] = by_hand[0, 1, 3, 0] = 1.0
    patchify = FeatureGrid(channels=1, stride=4, offset=1.5)
    torch.testing.assert_close(patchify.peaks(by_hand), torch.tensor([[[9.5, 1.5 + 4 * (2 + 1 / 6)], [1.5, 17.5]]]))
    assert grid.peaks(torch.ones(3, 3)).tolist() == [0.0, 0.0]
    # the fit never leaves the maximum's cell: at most half a cell off its centre
    noisy = torch.rand(64, 7, 7, generator=torch.Generator().manual_seed(0))
    cells = noisy.flatten(1).argmax(1)
    centres = torch.stack([cells // 7, cells % 7], -1) * 8.0
    assert (grid.peaks(noisy) - centres).abs().max() <= 4.0


def test_grid_probe_measures_known_offsets():
    resnet = CSRModel(small_config(image_size=64))
    assert resnet.grid.offset == 0.0  # "same" padding centres cell j on pixel 8j
    vit = CSRModel(small_config(backbone="vit_tiny_patch16_224", feature_stage=None, image_size=224))
    assert (vit.grid.stride, vit.grid.offset) == (16, 7.5)  # patch j spans pixels 16j..16j+15


def test_negative_box_over_whole_image_zeroes_every_score_without_the_floor(images):
    model = CSRModel(small_config(box_floor=False)).eval()
    out = model(images, Interaction(boxes=[Box(0, 0, 64, 64, positive=False)]))
    assert torch.count_nonzero(out.scores) == 0
    assert torch.count_nonzero(out.importance_map) == 0


def test_positive_box_over_whole_image_changes_nothing(model, images):
    plain = model(images)
    boxed = model(images, Interaction(boxes=[Box(0, 0, 64, 64)]))
    torch.testing.assert_close(boxed.scores, plain.scores)
    torch.testing.assert_close(boxed.logits, plain.logits)


def test_negative_box_removes_evidence_under_it_only(model, images):
    enc = model.encode(images)
    out = model.reason(enc, Interaction(boxes=[Box(0, 0, 28, 64, positive=False)]))  # cells 0..3 (centres 0..24)
    expected = enc.similarity_maps.clone()
    expected[..., :, 0:4] = 0  # pixels 0..27 are nearest to cells 0..3 -> A = 0 there, exactly
    torch.testing.assert_close(out.similarity_maps, expected)
    boxed = expected.clamp(min=0).amax((-2, -1))
    floor = torch.minimum(enc.scores, model.absent_baseline)  # never below "absent"
    torch.testing.assert_close(out.scores, torch.maximum(boxed, floor))


@pytest.mark.parametrize("strategy", ["baseline", "zero"])
def test_rejecting_a_concept_changes_only_its_contributions(images, strategy):
    model = CSRModel(small_config(rejection=strategy)).eval()
    with torch.no_grad():
        model.absent_baseline.uniform_(0.1, 0.3)
        model.task_head.linear.weight.normal_()
    plain = model(images)
    rejected = model(images, Interaction(rejected={"effusion"}))
    k = model.concepts.index("effusion")
    others = [i for i in range(3) if i != k]
    torch.testing.assert_close(rejected.contributions[..., others], plain.contributions[..., others])
    assert not torch.allclose(rejected.contributions[..., k], plain.contributions[..., k])
    replacement = model.absent_baseline[k] if strategy == "baseline" else torch.zeros(4)
    torch.testing.assert_close(rejected.scores[:, k], replacement.expand(2, -1))


def test_concept_mask_and_prototype_mask(model, images):
    enc = model.encode(images)
    rejected = model.reason(enc, Interaction(rejected={"cavity"}))
    model.concept_mask[model.concepts.index("cavity")] = False
    masked = model.reason(enc)
    torch.testing.assert_close(masked.logits, rejected.logits)
    model.concept_mask[:] = True
    model.prototype_mask[0, 1] = False
    pruned = model.reason(enc)
    weight = model.task_head.linear.weight.view(3, 3, 4)
    standardised = (pruned.scores - model.task_head.score_mean) / model.task_head.score_std
    standardised[:, 0, 1] = 0  # a pruned prototype enters H as exactly 0
    torch.testing.assert_close(pruned.logits, torch.einsum("bkm,nkm->bn", standardised, weight) + model.task_head.bias)


def test_per_image_interactions(model, images):
    enc = model.encode(images)
    pair = model.reason(enc, [Interaction(rejected={"nodule"}), Interaction()])
    torch.testing.assert_close(pair.logits[0], model.reason(enc[0], Interaction(rejected={"nodule"})).logits[0])
    torch.testing.assert_close(pair.logits[1], model.reason(enc[1]).logits[0])


def test_hook_that_doubles_the_maps_doubles_the_scores(model, images):
    enc = model.encode(images)
    plain = model.reason(enc)
    handle = model.register_similarity_hook(lambda _model, maps: 2 * maps)
    doubled = model.reason(enc)
    torch.testing.assert_close(doubled.scores, 2 * plain.scores)
    seen = []
    model.register_similarity_hook(lambda _model, maps: seen.append(maps.shape))  # observing only
    model.reason(enc)
    assert seen == [plain.similarity_maps.shape]
    handle.remove()
    model._similarity_hooks.clear()
    torch.testing.assert_close(model.reason(enc).scores, plain.scores)


def test_needs_review_is_the_top_two_margin(model, images):
    out = model(images)
    top = out.probs.sort(-1, descending=True).values
    torch.testing.assert_close(out.needs_review, (top[:, 0] - top[:, 1]) < 0.3)
    with torch.no_grad():
        model.task_head.linear.weight.zero_()
        model.task_head.linear.bias.copy_(torch.tensor([10.0, 0.0, 0.0]))
    assert not model(images).needs_review.any()
    with torch.no_grad():
        model.task_head.linear.bias.copy_(torch.tensor([1.0, 1.0, 0.0]))
    assert model(images).needs_review.all()


def test_save_load_round_trip_is_exact(model, images, tmp_path):
    model.prototype_mask[2, 3] = False
    path = tmp_path / "model.safetensors"
    model.save(path)
    loaded = CSRModel.load(path).eval()
    assert loaded.config == model.config
    interaction = Interaction(boxes=[Box(3, 4, 30, 40)], rejected={"nodule"})
    a, b = model(images, interaction), loaded(images, interaction)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.similarity_maps, b.similarity_maps)
    assert not loaded.prototype_mask[2, 3]


def test_load_refuses_mismatched_or_foreign_files(model, tmp_path):
    path = tmp_path / "model.safetensors"
    model.save(path)
    with pytest.raises(ValueError, match="prototypes_per_concept: 5 != 4"):
        CSRModel.load(path, config=small_config(prototypes_per_concept=5))
    other = CSRModel(small_config(embedding_dim=8))
    from csr_widgets.model.checkpoint import load_weights

    with pytest.raises(ValueError, match=r"shape of prototypes: checkpoint \(3, 4, 16\) != model \(3, 4, 8\)"):
        load_weights(other, path)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        CSRModel.load(junk)
    with pytest.raises(FileNotFoundError):
        CSRModel.load(tmp_path / "missing.safetensors")


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda: torch.rand(1, 3, 64, 64), ValueError, "3 channels but this model takes in_channels=1"),
        (lambda: (torch.rand(1, 1, 64, 64) * 255).to(torch.uint8), TypeError, r"images.float\(\) / 255"),
        (lambda: torch.full((1, 1, 64, 64), float("nan")), ValueError, "NaN or infinite"),
        (lambda: torch.rand(0, 1, 64, 64), ValueError, "Empty batch"),
        (lambda: torch.rand(1, 64, 64), ValueError, r"unsqueeze\(0\)"),
        (lambda: [[0.0]], TypeError, "torch.Tensor"),
    ],
)
def test_bad_images_are_refused_at_the_boundary(model, make, error, message):
    with pytest.raises(error, match=message):
        model.encode(make())


def test_fixed_size_backbone_refuses_other_sizes():
    vit = CSRModel(small_config(backbone="vit_tiny_patch16_224", feature_stage=None, image_size=224))
    with pytest.raises(ValueError, match="needs 224x224 images, got 160x160"):
        vit.encode(torch.rand(1, 1, 160, 160))


def test_bad_interactions_are_refused(model, images):
    enc = model.encode(images)
    with pytest.raises(ValueError, match="inverted or has zero area"):
        Box(10, 10, 5, 20)
    with pytest.raises(ValueError, match="inverted or has zero area"):
        Box(10, 10, 10, 20)
    with pytest.raises(ValueError, match="entirely outside"):
        model.reason(enc, Interaction(boxes=[Box(70, 70, 90, 90)]))
    with pytest.raises(ValueError, match=r"Unknown concept names \['pacemaker'\]"):
        model.reason(enc, Interaction(rejected={"pacemaker"}))
    with pytest.raises(ValueError, match="3 interactions for a batch of 2"):
        model.reason(enc, [Interaction()] * 3)


def test_box_partly_outside_is_clipped(model, images):
    enc = model.encode(images)
    inside = model.reason(enc, Interaction(boxes=[Box(40, 40, 64, 64)]))
    overhanging = model.reason(enc, Interaction(boxes=[Box(40, 40, 200, 100)]))
    torch.testing.assert_close(inside.logits, overhanging.logits)


def test_concept_pooling_mean_and_log_mean_exp_by_hand():
    concept_maps = torch.tensor([[[[0.0, 1.0], [2.0, -1.0]]]])  # (1, 1, 2, 2)
    mean = CSRModel(small_config(concepts=["x"])).pool_concepts(concept_maps)
    assert mean.item() == pytest.approx(0.5)
    lse = CSRModel(small_config(concepts=["x"], concept_pooling="lse", pooling_sharpness=2.0)).pool_concepts(concept_maps)
    by_hand = np.log((np.exp(0.0) + np.exp(2.0) + np.exp(4.0) + np.exp(-2.0)) / 4) / 2
    assert lse.item() == pytest.approx(by_hand, rel=1e-6)
    # a smooth maximum: between the mean and the max, near the max when sharp
    sharp = CSRModel(small_config(concepts=["x"], concept_pooling="lse", pooling_sharpness=50.0)).pool_concepts(concept_maps)
    assert 0.5 < lse.item() < 2.0 and sharp.item() == pytest.approx(2.0 - np.log(4) / 50, abs=1e-4)


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="concepts is empty"):
        CSRConfig(concepts=[], classes=["a", "b"])
    with pytest.raises(ValueError, match=r"classes has duplicate names: \['a'\]"):
        CSRConfig(concepts=["x"], classes=["a", "a"])
    with pytest.raises(ValueError, match="prototypes_per_concept"):
        CSRConfig(concepts=["x"], classes=["a", "b"], prototypes_per_concept=0)
    with pytest.raises(ValueError, match="rejection"):
        CSRConfig(concepts=["x"], classes=["a", "b"], rejection="drop")
    with pytest.raises(ValueError, match="concept_pooling"):
        CSRConfig(concepts=["x"], classes=["a", "b"], concept_pooling="max")
    with pytest.raises(ValueError, match="pooling_sharpness"):
        CSRConfig(concepts=["x"], classes=["a", "b"], concept_pooling="lse", pooling_sharpness=0)
    with pytest.raises(ValueError, match="feature_stage"):
        CSRModel(small_config(feature_stage=9))
    config = small_config()
    assert CSRConfig.from_json(config.to_json()) == config


@pytest.mark.parametrize("backbone, stage", [("convnext_atto", None), ("efficientnet_b0", 2), ("vit_tiny_patch16_224", None)])
def test_backbone_families_and_rgb_input(backbone, stage):
    model = CSRModel(small_config(backbone=backbone, feature_stage=stage, image_size=224 if "vit" in backbone else 64, in_channels=3)).eval()
    size = model.config.image_size
    out = model(torch.rand(1, 3, size, size))
    h = size // model.grid.stride
    assert out.similarity_maps.shape == (1, 3, 4, h, h)
    # every patch vector and prototype is unit length, so S is a cosine in [-1, 1]
    assert out.similarity_maps.abs().max() <= 1 + 1e-5


def test_cell_importance_equals_area_average_of_the_pixel_map(model):
    from csr_widgets.model.interaction import cell_importance

    rng = np.random.default_rng(0)
    for trial in range(50):
        boxes = []
        for _ in range(rng.integers(1, 5)):
            x0, y0 = rng.uniform(-10, 70, 2)
            w, h = rng.uniform(0.3, 40, 2)
            if trial % 2:  # integer boxes, as drawn on most images
                x0, y0, w, h = np.round([x0, y0, w, h]) + [0, 0, 1, 1]
            boxes.append(Box(float(x0), float(y0), float(x0 + w), float(y0 + h), positive=bool(rng.integers(2))))
        reference = model.grid.area_average(importance_map(boxes, 60, 64, 0.2), (8, 8))
        np.testing.assert_allclose(cell_importance(boxes, 60, 64, 0.2, model.grid, (8, 8)), reference, atol=1e-6)


def test_a_model_can_be_built_inside_inference_mode():
    with torch.inference_mode():
        model = CSRModel(small_config())
    assert (model.grid.stride, model.grid.offset) == (8, 0.0)
    assert not any(p.is_inference() for p in model.parameters())  # it can still be trained
