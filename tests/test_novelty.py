"""Out of distribution: the novelty statistics, their checkpoint, and the bundled model's verdicts."""
import warnings

import matplotlib.cbook
import numpy as np
import pytest
import torch
from pydicom.data import get_testdata_file
from safetensors.torch import load_file, save_file
from sklearn.covariance import LedoitWolf

from csr_widgets import CSRModel, SyntheticCXR, load_pretrained
from csr_widgets.data import read_image, resize_image
from csr_widgets.model.checkpoint import FORMAT
from csr_widgets.model.novelty import NoveltyDetector
from csr_widgets.pretrained import RECIPES

from .conftest import small_config


def test_distance_is_the_mahalanobis_distance_of_the_pooled_features():
    generator = torch.Generator().manual_seed(0)
    train = torch.randn(200, 5, 3, 3, generator=generator) * torch.tensor([1.0, 2, 3, 4, 5]).view(1, 5, 1, 1)
    val = torch.randn(50, 5, 3, 3, generator=generator)
    detector = NoveltyDetector(5)
    assert not detector.calibrated
    detector.fit(train, val, quantile=0.9)
    reference = LedoitWolf().fit(train.mean((-2, -1)).double().numpy())
    probe = torch.randn(7, 5, 3, 3, generator=generator) * 3
    expected = np.sqrt(reference.mahalanobis(probe.mean((-2, -1)).double().numpy()))
    np.testing.assert_allclose(detector.distance(probe).numpy(), expected, rtol=1e-4)
    # the threshold is the validation distances' 90th percentile
    expected_threshold = np.quantile(np.sqrt(reference.mahalanobis(val.mean((-2, -1)).double().numpy())), 0.9)
    assert float(detector.threshold) == pytest.approx(expected_threshold, rel=1e-4)
    assert detector.calibrated


def test_reason_flags_images_beyond_the_threshold_and_nothing_when_uncalibrated(model, images):
    enc = model.encode(images)
    assert enc.feature_distance.shape == (2,)
    assert not model.reason(enc).out_of_distribution.any()  # inf threshold: nothing flagged
    with torch.no_grad():
        model.novelty.threshold.fill_(float(enc.feature_distance.mean()))
    flagged = model.reason(enc).out_of_distribution
    assert flagged.tolist() == (enc.feature_distance > enc.feature_distance.mean()).tolist()
    assert flagged.sum() == 1


def test_a_checkpoint_saved_before_the_statistics_loads_unflagging(model, tmp_path, images):
    path = tmp_path / "old.safetensors"
    model.save(path)
    tensors = load_file(str(path))
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["format"] == FORMAT
    save_file({k: v for k, v in tensors.items() if not k.startswith("novelty.")}, str(path), metadata=metadata)
    with pytest.warns(UserWarning, match="no out-of-distribution statistics.*calibrate_novelty"):
        old = CSRModel.load(path)
    assert not old.novelty.calibrated
    assert not old(images).out_of_distribution.any()


def test_input_checks_name_the_problem(model):
    with pytest.raises(ValueError, match="aspect ratio beyond 10:1"):
        model(torch.rand(1, 1, 64, 700))
    with pytest.raises(ValueError, match="smaller than this backbone's minimum of 16 px"):
        model(torch.rand(1, 1, 8, 8))
    with pytest.warns(UserWarning, match="Pixel values reach 25.*Divide by 255"):
        model(torch.rand(1, 1, 64, 64) * 255)
    with pytest.warns(UserWarning, match="96x80 px but the model was trained on 64x64"):
        model(torch.rand(1, 1, 80, 96))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(torch.rand(1, 1, 64, 64))  # the trained size, in [0, 1]: not a word


@pytest.fixture(scope="module")
def bundled():
    return load_pretrained("synthetic-cxr", device="cpu")


def verdict(model, image) -> tuple[bool, float]:
    x = resize_image(read_image(image, channels=1), model.config.image_size)[None]
    with torch.inference_mode():
        out = model.reason(enc := model.encode(x))
    return bool(out.out_of_distribution[0]), float(enc.feature_distance[0] / model.novelty.threshold)


def test_the_bundled_model_knows_its_own_world(bundled):
    """<= 5% of held-out phantoms flagged; a real film, a photograph, a blank frame flagged."""
    data = SyntheticCXR(**{**RECIPES["synthetic-cxr"].test, "n": 200})
    images = torch.stack([data[i]["image"] for i in range(len(data))])
    with torch.inference_mode():
        flagged = bundled(images).out_of_distribution
    assert flagged.float().mean() <= 0.05
    photo = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    for image in (photo, np.zeros((300, 300), np.float32), np.full((50, 50), 0.5, np.float32),
                  np.tile(np.linspace(0, 1, 256, dtype=np.float32), (256, 1))):
        assert verdict(bundled, image)[0]


def test_a_real_chest_film_is_flagged(bundled):
    path = get_testdata_file("RG1_UNCR.dcm", download=False)  # a PA chest CR, from pydicom-data
    if path is None:
        pytest.skip("pydicom-data (a dev dependency) is not installed")
    flagged, ratio = verdict(bundled, path)
    assert flagged and ratio > 3
