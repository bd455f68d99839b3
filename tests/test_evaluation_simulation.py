"""The oracle user on a constructed case whose scores and predictions are known by hand.

Model (tests/test_evaluation_support.py): logit x = 2 s_a0, logit y = 2 s_c0, rejected
concepts score 0. Three 64 px images, 8x8 cells centred on pixels 0, 8, ..., 56:

image 0 (label x): s_a0 = 0.5 at cell (1, 1), s_c0 = 0.6 at cell (7, 7) -> logits 1.0 / 1.2,
  p(y) = 0.55: flagged, predicted y (wrong). Truth: a present (box 0..16), b, c absent.
  boxes: A = 1 on cell (1, 1), 0.2 on cell (7, 7) -> s_c0 = 0.12 -> x (fixed).
  reject {b, c}: s_c0 -> 0 -> x (fixed).
image 1 (label x): s_a0 = 0.9 at cell (1, 1), s_c0 = 0.3 at cell (5, 5) -> 1.8 / 0.6,
  p(x) = 0.77: not flagged, predicted x. Truth: a present with box 32..48 (which covers
  cell (5, 5), not (1, 1)), b, c absent.
  boxes: s_a0 = 0.18, s_c0 = 0.3 -> y (broken, but only when every case gets feedback).
  reject {b, c}: s_c0 -> 0 -> x (unchanged).
image 2 (label y): s_a0 = 0.5, s_c0 = 0.55 -> flagged, predicted y (right). Truth: every
  concept present, no box: the oracle has nothing to say (untouched).
"""
import numpy as np
import pytest
import torch

from csr_widgets import Box, Interaction
from csr_widgets.evaluation import simulation

from .test_evaluation_support import CONCEPTS, ListDataset, empty_encoding, fake_encode, item, tiny_model

TRUTH = [[1, 0, 0], [1, 0, 0], [1, 1, 1]]
BOXES = [[("a", 0, 0, 16, 16)], [("a", 32, 32, 48, 48)], []]
LABELS = [0, 0, 1]


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def constructed_encoding():
    encoding = empty_encoding(3)
    S = encoding.similarity_maps  # (B, K, M, h, w); concepts a=0, b=1, c=2
    S[0, 0, 0, 1, 1], S[0, 2, 0, 7, 7] = 0.5, 0.6
    S[1, 0, 0, 1, 1], S[1, 2, 0, 5, 5] = 0.9, 0.3
    S[2, 0, 0, 3, 3], S[2, 2, 0, 4, 4] = 0.5, 0.55
    return encoding


def test_oracle_interaction_draws_clipped_boxes_and_rejects_known_absent_concepts():
    boxes = [("a", -4, 10, 8, 20), ("zzz", 5, 5, 9, 9), ("b", 3, 3, 3, 9), ("c", 70, 70, 90, 90)]
    both = simulation.oracle_interaction([1, 0, np.nan], boxes, CONCEPTS, "both", (64, 64))
    # clipped to the image; a box of a concept the model does not know is still a place to
    # look; the zero-width box and the box outside the image are skipped
    assert both.boxes == (Box(0, 10, 8, 20), Box(5, 5, 9, 9))
    assert both.rejected == {"b"}  # "c" is unknown (NaN), so it is not rejected
    assert simulation.oracle_interaction([1, 0, 0], boxes, CONCEPTS, "boxes", (64, 64)).rejected == frozenset()
    assert simulation.oracle_interaction([1, 0, 0], boxes, CONCEPTS, "reject", (64, 64)) == Interaction(rejected={"b", "c"})
    # concept boxes name their own concept, when the model has it
    named = simulation.oracle_interaction([1, 0, np.nan], boxes, CONCEPTS, "concept_both", (64, 64))
    assert named.boxes == (Box(0, 10, 8, 20, concept="a"), Box(5, 5, 9, 9)) and named.rejected == {"b"}
    with pytest.raises(ValueError, match="kind"):
        simulation.oracle_interaction([1, 0, 0], boxes, CONCEPTS, "shout", (64, 64))


def test_oracle_predictions_on_the_constructed_batch(model):
    encoding = constructed_encoding()
    base = model.reason(encoding)
    # the hand computation of the base case
    torch.testing.assert_close(base.logits, torch.tensor([[1.0, 1.2], [1.8, 0.6], [1.0, 1.1]]))
    result = simulation.oracle_predictions(model, encoding, torch.tensor(TRUTH, dtype=torch.float32), BOXES)
    np.testing.assert_array_equal(result["prediction"], [1, 0, 1])
    np.testing.assert_array_equal(result["needs_review"], [True, False, True])
    np.testing.assert_array_equal(result["touched/boxes"], [True, True, False])
    np.testing.assert_array_equal(result["prediction/boxes"], [0, 1, 1])
    np.testing.assert_array_equal(result["touched/reject"], [True, True, False])
    np.testing.assert_array_equal(result["prediction/reject"], [0, 0, 1])
    np.testing.assert_array_equal(result["prediction/both"], [0, 0, 1])
    # a box for a only: c's evidence at (7, 7) stays whole in image 0 (still y), and in
    # image 1 a's peak at (1, 1) falls to 0.2 * 0.9 outside a's box (y, as with "boxes")
    np.testing.assert_array_equal(result["prediction/concept_boxes"], [1, 1, 1])
    np.testing.assert_array_equal(result["prediction/concept_both"], [0, 0, 1])
    # the boxes really did what the docstring says: s_c0 of image 0 fell to 0.2 * 0.6
    boxed = model.reason(encoding, [simulation.oracle_interaction(TRUTH[b], BOXES[b], CONCEPTS, "boxes", (64, 64)) for b in range(3)])
    torch.testing.assert_close(boxed.scores[:2, [0, 2], 0], torch.tensor([[0.5, 0.12], [0.18, 0.3]]))


def test_simulate_interaction_and_gains_over_a_dataset(model, monkeypatch):
    monkeypatch.setattr(model, "encode", fake_encode(constructed_encoding()))
    # the dataset lists its concepts in another order than the model: c, a, b
    reorder = [2, 0, 1]
    items = [item(i, [TRUTH[i][k] for k in reorder], LABELS[i], BOXES[i]) for i in range(3)]
    dataset = ListDataset(items, concepts=["c", "a", "b"])
    cases = simulation.simulate_interaction(model, dataset, batch_size=2, progress=False)  # two batches
    assert cases["index"].tolist() == [0, 1, 2]
    assert cases["prediction/boxes"].tolist() == [0, 1, 1]
    assert cases["prediction/reject"].tolist() == [0, 0, 1]

    gains = simulation.interaction_gains(cases).drop(index=["concept_boxes", "concept_both", "question", "random_question"], level="kind")
    before = 2 / 3  # labels x x y, predictions y x y: F1(x) = F1(y) = 2/3
    assert gains["macro_f1_before"].to_numpy() == pytest.approx([before] * 6)
    review, every = gains.loc["review"], gains.loc["all"]
    # review trigger: only image 0 is flagged and touched; every kind fixes it
    assert review["touched"].tolist() == [1, 1, 1]
    assert review["macro_f1_after"].tolist() == pytest.approx([1.0, 1.0, 1.0])
    assert review.loc["boxes", ["changed", "fixed", "broken"]].tolist() == [1, 1, 0]
    # every case: boxes also break image 1 (x -> y): predictions y->x, x->y, y -> F1 2/3
    assert every["touched"].tolist() == [2, 2, 2]
    assert every.loc["boxes", ["changed", "fixed", "broken"]].tolist() == [2, 1, 1]
    assert every.loc["boxes", "macro_f1_after"] == pytest.approx(2 / 3)
    assert every.loc["boxes", "gain"] == pytest.approx(0.0)
    assert every.loc["reject", "macro_f1_after"] == pytest.approx(1.0)
    assert every.loc["reject", "accuracy_after"] == pytest.approx(1.0)
    assert gains["flagged"].tolist() == [2] * 6


def test_the_oracle_answers_check_this_next_questions_from_the_truth(model):
    encoding = constructed_encoding()
    questions = {(q.kind, q.concept): q for q in simulation.rank_questions(model, encoding[0])}
    truth, boxes = TRUTH[0], BOXES[0]  # a present in 0..16; b, c absent
    answer = lambda kind, concept: simulation.oracle_answer(questions[kind, concept], truth, boxes, CONCEPTS)  # noqa: E731
    assert answer("present", "c") == Interaction(rejected={"c"})  # absent: "no"
    assert answer("present", "a") is None  # present: "yes" changes nothing
    # a peaks at cell (1, 1), pixels 4..11, inside its box 0..16: "yes", a positive box for a
    assert answer("location", "a") == Interaction(boxes=(Box(4, 4, 12, 12, concept="a"),))
    # c peaks at cell (7, 7) but is absent: "no"
    assert answer("location", "c") == Interaction(boxes=(Box(52, 52, 64, 64, positive=False, concept="c"),))
    assert simulation.oracle_answer(questions["present", "c"], [1, 0, np.nan], boxes, CONCEPTS) is None  # unknown
    # the oracle's best question fixes image 0 (rejecting c), as "reject" does
    result = simulation.oracle_predictions(model, encoding, torch.tensor(TRUTH, dtype=torch.float32), BOXES,
                                           kinds=("question",))
    np.testing.assert_array_equal(result["prediction/question"], [0, 0, 1])


def test_box_fidelity_on_the_constructed_case(model, monkeypatch):
    monkeypatch.setattr(model, "encode", fake_encode(constructed_encoding()))
    items = [item(i, TRUTH[i], LABELS[i], BOXES[i]) for i in range(3)]
    frame = simulation.box_fidelity(model, ListDataset(items), progress=False)
    assert frame["index"].tolist() == [0, 1] and frame["concept"].tolist() == ["a", "a"]
    assert frame["width_cells"].tolist() == [2.0, 2.0]
    # image 0: a's peak (1, 1) is in its box: kept whole; image 1: a's only evidence (0.9 at
    # (1, 1)) is outside its box 32..48: alpha = 0.2 of it is left (above the floor, 0)
    assert frame["kept"].tolist() == pytest.approx([1.0, 0.2])
    assert frame["peak_on_before"].tolist() == [True, False]
    assert frame["peak_off_after"].tolist() == [True, True]
    summary = simulation.fidelity_summary(frame, max_cells=2)
    assert summary.loc["overall", "kept (small, mean)"] == pytest.approx(0.6)
    assert summary.loc["overall", "peak moved off (was on)"] == 1.0
