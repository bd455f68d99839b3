"""evaluate(), its summaries and the paper-style tables.

Constructed case (64 px, cells centred on pixels 0, 8, ..., 56; logit x = 2 s_a0,
logit y = 2 s_c0):

image 0 (label x): (a, 0) = 1 at cell (2, 3) -> a's saliency peaks at pixel (y 16, x 24),
  inside a's box (20, 10, 30, 20): hit. (b, 1) = 0.7 at the same cell; b's box
  (30, 0, 40, 10) is 6 px right and 7 px up: distance sqrt(85) = 9.2 -> miss at 0, hit at
  15. Shortcut box (20, 12, 28, 20) holds that point. c has no box.
image 1 (label y): (a, 0) = 1 at cell (7, 0) -> pixel (56, 0); a's box (0, 0, 8, 8) is 49 px
  away: miss. No shortcut.
Both images: logits 2 / 0 -> x with p = sigmoid(2).
"""
import numpy as np
import pytest
import torch

from csr_widgets import Box, Interaction
from csr_widgets.evaluation import metrics, report

from .test_evaluation_support import ListDataset, empty_encoding, fake_encode, item, tiny_model


def constructed_encoding():
    encoding = empty_encoding(2)
    S = encoding.similarity_maps  # concepts a=0, b=1, c=2
    S[0, 0, 0, 2, 3], S[0, 1, 1, 2, 3] = 1.0, 0.7
    S[1, 0, 0, 7, 0] = 1.0
    return encoding


def constructed_dataset():
    return ListDataset([
        item(0, [1, 1, 0], 0, [("a", 20, 10, 30, 20), ("b", 30, 0, 40, 10)], shortcut_box=(20, 12, 28, 20)),
        item(1, [1, 0, 0], 1, [("a", 0, 0, 8, 8)]),
    ])


@pytest.fixture(scope="module")
def real_model():
    return tiny_model()


@pytest.fixture
def model(real_model, monkeypatch):
    monkeypatch.setattr(real_model, "encode", fake_encode(constructed_encoding()))
    return real_model


def test_evaluate_rows_by_hand(model):
    frame = report.evaluate(model, constructed_dataset(), batch_size=1, progress=False)
    assert frame["index"].tolist() == [0, 1]
    assert frame["label"].tolist() == [0, 1] and frame["prediction"].tolist() == [0, 0]
    assert frame["correct"].tolist() == [True, False]
    p = 1 / (1 + np.exp(-2.0))
    np.testing.assert_allclose(frame["prob/x"], [p, p], rtol=1e-6)
    np.testing.assert_allclose(frame["margin"], [2 * p - 1] * 2, rtol=1e-6)
    assert frame["needs_review"].tolist() == [False, False]
    assert frame["has_shortcut"].tolist() == [True, False]
    assert frame[["point_y/a", "point_x/a"]].to_numpy().tolist() == [[16, 24], [56, 0]]
    np.testing.assert_array_equal(frame["hit@0/a"], [1.0, 0.0])
    np.testing.assert_array_equal(frame["hit@15/b"], [1.0, np.nan])
    np.testing.assert_array_equal(frame["hit@0/b"], [0.0, np.nan])
    assert frame.loc[0, "distance/b"] == pytest.approx(np.sqrt(85))
    assert frame.loc[1, "distance/a"] == pytest.approx(49.0)
    assert frame["hit@0/c"].isna().all()
    np.testing.assert_array_equal(frame["shortcut@0/a"], [1.0, np.nan])
    np.testing.assert_array_equal(frame["concept/b"], [1.0, 0.0])
    np.testing.assert_allclose(frame["concept_prob/a"], [0.5, 0.5])
    # energy: a single peak spreads as a (1 - |d|/8) pyramid over 15 x 15 pixels (total 64);
    # the box keeps rows d = -6..3 (6.625) and columns d = -4..5 (6.875)
    assert frame.loc[0, "energy/a"] == pytest.approx(6.625 * 6.875 / 64, rel=1e-5)
    assert frame.attrs["concepts"] == ["a", "b", "c"] and frame.attrs["tolerances"] == [0.0, 15.0]


def test_summaries_by_hand(model):
    frame = report.evaluate(model, constructed_dataset(), progress=False)
    summary = report.classification_summary(frame)
    assert summary["accuracy"] == 0.5
    assert summary["macro_f1"] == pytest.approx((2 / 3 + 0) / 2)  # x: tp 1, fp 1; y: none right
    assert summary["f1/x"] == pytest.approx(2 / 3) and summary["f1/y"] == 0.0
    # a is present in both images and c in none (no AUC); b: scores 0.5 vs 0.5 -> 0.5
    np.testing.assert_array_equal(report.concept_auc_summary(frame), [np.nan, 0.5, np.nan])
    assert summary["concept_auc"] == 0.5
    pointing = report.pointing_summary(frame)
    assert pointing["evaluated"].tolist() == [2, 1, 0, 3]
    np.testing.assert_allclose(pointing["pg@0"], [0.5, 0.0, np.nan, 1 / 3])
    np.testing.assert_allclose(pointing["pg@15"], [0.5, 1.0, np.nan, 2 / 3])
    np.testing.assert_allclose(pointing["shortcut@0"], [1.0, 1.0, np.nan, 1.0])


def test_tables_as_text(model):
    dataset = constructed_dataset()
    refined = torch.ones(3, 2, dtype=torch.bool)
    refined[0, 0] = False  # a's saliency becomes the flat (a, 1): first maximum pixel (0, 0)
    text = report.paper_tables(model, dataset, refined=refined)
    for heading in ("Table 1.", "Table 2.", "Table 3.", "Table 4.", "after refinement", "out of distribution"):
        assert heading in text
    table1 = text.split("Table 1.")[1].split("Table 2.")[0]
    assert "50.0" in table1 and "33.3" in table1  # accuracy, macro F1
    overall = [line for line in text.split("Table 2.")[1].split("Table 3.")[0].splitlines() if line.startswith("overall")]
    # before: PG@0 1/3, PG@15 2/3; after: (0, 0) misses image 0's box, lies in image 1's
    assert overall and overall[0].split()[2:4] == ["33.3", "66.7"]
    refined_frame = report.evaluate(model, dataset, progress=False, prototype_mask=refined)
    assert refined_frame["hit@0/a"].tolist() == [0.0, 1.0]
    assert model.prototype_mask.all()  # scoring a refinement leaves the model alone


def test_evaluate_on_real_encodings_matches_the_model(real_model, monkeypatch):
    """Without the constructed encoder: batching, saliency chunks, interaction, eval mode."""
    monkeypatch.setattr(report, "SALIENCY_ELEMENTS", 1)  # one image per saliency chunk
    generator = torch.Generator().manual_seed(3)
    images = torch.rand(3, 1, 64, 64, generator=generator)
    boxes = [[("a", 5, 5, 30, 30)], [("c", 40, 10, 60, 30), ("a", 0, 0, 64, 64)], []]
    dataset = ListDataset([item(i, [1, 0, 1], i % 2, boxes[i], image=images[i]) for i in range(3)])
    interaction = Interaction(boxes=(Box(0, 0, 32, 32),), rejected={"b"})
    real_model.train()
    frame = report.evaluate(real_model, dataset, batch_size=2, progress=False,
                            interaction=lambda index: interaction if index == 1 else Interaction())
    assert real_model.training  # restored
    real_model.eval()
    with torch.inference_mode():
        plain = real_model(images)
        touched = real_model(images[1:2], interaction)
    np.testing.assert_allclose(frame.loc[[0, 2], ["prob/x", "prob/y"]], plain.probs[[0, 2]].numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(frame.loc[[1], ["prob/x", "prob/y"]], touched.probs.numpy(), rtol=1e-5, atol=1e-6)
    saliency = metrics.concept_saliency(plain.similarity_maps, real_model.grid, (64, 64))
    pointing = metrics.point_concepts(saliency, boxes, ["a", "b", "c"])
    for b in (0, 2):
        np.testing.assert_array_equal(frame.loc[b, ["distance/a", "distance/b", "distance/c"]].to_numpy(float), pointing.distance[b])
    # image 1 is scored on its maps after A, which the whole-image box of "a" always hits
    assert frame.loc[1, "hit@0/a"] == 1.0


def test_evaluate_aligns_dataset_concepts_and_classes(model):
    # the dataset lists concepts c, a (no b) and classes in the order y, x
    dataset = ListDataset([item(0, [0, 1], 1), item(1, [1, 1], 0)], concepts=["c", "a"], classes=["y", "x"])
    frame = report.evaluate(model, dataset, progress=False)
    np.testing.assert_array_equal(frame[["concept/a", "concept/b", "concept/c"]].to_numpy(), [[1, np.nan, 0], [1, np.nan, 1]])
    assert frame["label"].tolist() == [0, 1]  # x, y in the model's order


def test_evaluate_rejects_mismatched_datasets(real_model):
    dataset = ListDataset([item(0, [1], 0)], concepts=["zzz"])
    with pytest.raises(ValueError, match="share no name"):
        report.evaluate(real_model, dataset, progress=False)
    dataset = ListDataset([item(0, [1, 0, 0], 0)], classes=["x", "w"])
    with pytest.raises(ValueError, match=r"\['w'\]"):
        report.evaluate(real_model, dataset, progress=False)


def test_tables_as_markdown(model):
    """--markdown gives pipe tables (pandas + tabulate), with the same numbers as the text."""
    text = report.paper_tables(model, constructed_dataset(), markdown=True)
    table1 = text.split("Table 1.")[1].split("Table 2.")[0]
    rows = [line for line in table1.splitlines() if line.startswith("|")]
    assert len(rows) == 3 and set(rows[1]) <= set("|:-")  # header, rule, one model row
    cells = [cell.strip() for cell in rows[2].strip("|").split("|")]
    assert cells[0] == "CSR (this model)" and cells[2:4] == ["50.0", "33.3"]  # accuracy, macro F1
