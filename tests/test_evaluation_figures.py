"""Figures: built without pyplot, with the values they claim to show."""
import io

import matplotlib

matplotlib.use("Agg")  # before anything imports pyplot

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure

from csr_widgets.evaluation import figures, report

from .test_evaluation_report import constructed_dataset, constructed_encoding
from .test_evaluation_support import fake_encode, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def _renders(fig: Figure) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=40)
    assert buffer.getvalue()[:4] == b"\x89PNG"


def test_similarity_grid_shows_every_prototype_with_its_score(model):
    image = torch.rand(1, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.prototype_mask[1, 0] = False
    try:
        fig = figures.similarity_grid(model, image)
        with torch.inference_mode():
            out = model(image[None])
    finally:
        model.prototype_mask.fill_(True)
    axes = np.array(fig.axes).reshape(3, 3)  # 3 concepts x (saliency + 2 prototypes)
    assert axes[0, 2].get_title() == f"p1  s={out.scores[0, 0, 1]:.2f}"
    assert axes[1, 1].get_title() == "p0  pruned"
    assert axes[2, 0].get_title().startswith(f"c  p={out.concept_probs[0, 2]:.2f}")
    # the heat layer of prototype (a, 1) is its map carried to pixels by the grid
    heat = axes[0, 2].get_images()[1].get_array()
    expected = model.grid.upsample(out.similarity_maps[0, 0, 1].clamp(min=0), (64, 64))
    np.testing.assert_allclose(np.asarray(heat), expected.numpy(), atol=1e-6)
    assert len(axes[1, 1].get_images()) == 1  # pruned: no heat
    _renders(fig)


def test_contribution_chart_bars_are_the_contributions(model):
    image = torch.rand(1, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        out = model(image)
    fig = figures.contribution_chart(model, out, class_index=1)
    widths = sorted(p.get_width() for p in fig.axes[0].patches)
    np.testing.assert_allclose(widths, np.sort(out.contributions[0, 1].numpy()), atol=1e-6)
    _renders(fig)
    interactive = figures.contribution_chart(model, out, class_index=1, interactive=True)
    np.testing.assert_allclose(sorted(interactive.data[0].x), widths, atol=1e-6)


def test_interaction_gains_chart_heights_are_gains_in_points():
    gains = pd.DataFrame(
        {"gain": [0.01, -0.02, 0.03, 0.0], "touched": [3, 4, 5, 6],
         "macro_f1_before": [0.5] * 4, "macro_f1_after": [0.51, 0.48, 0.53, 0.5]},
        index=pd.MultiIndex.from_tuples([("review", "boxes"), ("review", "reject"), ("all", "boxes"), ("all", "reject")],
                                        names=["trigger", "kind"]))
    fig = figures.interaction_gains_chart(gains)
    heights = [p.get_height() for p in fig.axes[0].patches]
    np.testing.assert_allclose(heights, [1.0, -2.0, 3.0, 0.0])
    _renders(fig)
    interactive = figures.interaction_gains_chart(gains, interactive=True)
    np.testing.assert_allclose([list(bar.y) for bar in interactive.data], [[1.0, -2.0], [3.0, 0.0]])
    assert [bar.name for bar in interactive.data] == ["trigger: review", "trigger: all"]


def test_pointing_examples_mark_hits_and_misses(model, monkeypatch):
    monkeypatch.setattr(model, "encode", fake_encode(constructed_encoding()))
    dataset = constructed_dataset()
    frame = report.evaluate(model, dataset, progress=False)
    fig = figures.pointing_examples(model, dataset, frame, "a", tolerance=0, n=2)
    axes = np.array(fig.axes).reshape(2, 2)
    assert axes[0, 0].get_title().startswith("#0 hit") and axes[1, 0].get_title().startswith("#1 miss")
    assert not axes[0, 1].get_images()  # only one hit and one miss exist
    x, y = axes[0, 0].lines[0].get_data()
    assert (x[0], y[0]) == (24, 16)
    _renders(fig)
    with pytest.raises(ValueError, match="hit@5/a"):
        figures.pointing_examples(model, dataset, frame, "a", tolerance=5)
