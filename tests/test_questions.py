""""Check this next" on a case built by hand (the tiny model of test_evaluation_support:
logit x = 2 s_a0, logit y = 2 s_c0, absent baselines 0, an 8 x 8 grid on 64 px)."""
import math

import pytest
import torch

from csr_widgets import Box, Interaction
from csr_widgets.model import rank_questions
from csr_widgets.widgets.charts import question_text

from .test_evaluation_support import empty_encoding, tiny_model


def case(p_a: float, p_c: float):
    encoding = empty_encoding(1)
    encoding.similarity_maps[0, 0, 0, 2, 2] = 0.6  # a's evidence at cell (2, 2): pixels 12..19
    encoding.similarity_maps[0, 2, 0, 5, 5] = 0.5  # c's at cell (5, 5): pixels 36..43
    encoding.concept_logits[0] = torch.tensor([math.log(p_a / (1 - p_a)), 0.0, math.log(p_c / (1 - p_c))])
    return encoding


def margin(probs: torch.Tensor) -> float:  # x is top-1 and y top-2 before any answer
    return float((probs[0, 0] - probs[0, 1]).detach())


def test_questions_are_ranked_by_the_expected_change_of_the_margin():
    model = tiny_model()
    encoding = case(p_a=0.5, p_c=0.9)
    before = model.reason(encoding).probs
    assert before.argmax() == 0  # x: 1.2 against 1.0

    questions = rank_questions(model, encoding, kinds=("present",))
    by_concept = {q.concept: q for q in questions}
    for name in ("a", "b", "c"):
        rejected = model.reason(encoding, Interaction(rejected={name})).probs
        expected_change = abs(margin(rejected) - margin(before))
        q = by_concept[name]
        assert q.change_no == pytest.approx(expected_change, abs=1e-6)
        assert q.effect == pytest.approx(q.p_no * expected_change, abs=1e-6)
    assert by_concept["a"].p_no == pytest.approx(0.5) and by_concept["c"].p_no == pytest.approx(0.1)
    assert by_concept["b"].effect == 0  # b carries no weight: asking about it changes nothing
    # rejecting a flips the case to y: the most useful question, and it says so
    assert [q.concept for q in questions] == ["a", "c", "b"]
    assert questions[0].flips_to == 1
    assert questions[0].text(model.classes) == "Is there really an a? (a no would make it y)"
    # a "no" that keeps x says by how much it would move x's lead, not that it "makes it x"
    kept = by_concept["c"]
    assert kept.flips_to == 0 and kept.ranked == (0, 1)
    assert kept.text(model.classes) == f"Is there really a c? (a no would change x's lead over y by {kept.change_no:.2f})"
    # the explorer says the same as a sentence
    assert question_text(questions[0], model.classes) == "Is there really an a? A no would make it y."
    # ... unless the concept head is sure a is there
    sure = rank_questions(model, case(p_a=0.999, p_c=0.6), kinds=("present",))
    assert sure[0].concept == "c"


def test_a_location_question_boxes_the_peak_cell_for_its_concept_only():
    model = tiny_model()
    encoding = case(p_a=0.5, p_c=0.9)
    questions = [q for q in rank_questions(model, encoding) if q.kind == "location"]
    a = next(q for q in questions if q.concept == "a")
    assert a.region == (12, 12, 20, 20)  # the pixels cell (2, 2) owns
    assert a.if_no.boxes == (Box(12, 12, 20, 20, positive=False, concept="a"),)
    assert a.if_yes.boxes == (Box(12, 12, 20, 20, positive=True, concept="a"),)
    no = model.reason(encoding, a.if_no)
    assert no.scores[0, 0, 0] == 0  # a's only evidence is gone, down to its baseline (0)
    assert torch.equal(no.scores[0, 2], model.reason(encoding).scores[0, 2])  # c untouched
    assert a.change_no == pytest.approx(abs(margin(no.probs) - margin(model.reason(encoding).probs)), abs=1e-6)
    assert a.change_yes == pytest.approx(0.0, abs=1e-6)  # the peak is all of a's evidence already


def test_rejected_concepts_are_not_asked_again_and_answers_build_on_what_was_said():
    model = tiny_model()
    encoding = case(p_a=0.5, p_c=0.9)
    said = Interaction(boxes=[Box(0, 0, 8, 8, positive=False)], rejected={"c"})
    questions = rank_questions(model, encoding, said)
    assert {q.concept for q in questions} == {"a", "b"}
    for q in questions:
        assert said.boxes[0] in q.if_no.boxes and "c" in q.if_no.rejected
    with pytest.raises(ValueError, match="one case"):
        rank_questions(model, empty_encoding(2))
    with pytest.raises(ValueError, match="kinds"):
        rank_questions(model, encoding, kinds=("why",))
