"""Small HTML charts for the explorer's side panel: pure functions, numbers in, HTML out.

HTML (not a plotting library) because each update is a few hundred bytes of text on the
wire, renders identically in JupyterLab and Voila, and its text is readable by a browser
test. Colours are from the Okabe-Ito palette (colour-blind safe).
"""
from __future__ import annotations

from html import escape

import numpy as np

BEFORE_COLOR = "#999999"
AFTER_COLOR = "#0072B2"
POSITIVE_CONTRIBUTION = "#0072B2"
NEGATIVE_CONTRIBUTION = "#D55E00"


def prediction_chart(classes: list[str], before: list[float], after: list[float], predicted: int) -> str:
    """One row per class: probability before (grey) and after (blue) the interaction."""
    rows = []
    for index, (name, p0, p1) in enumerate(zip(classes, before, after)):
        weight = "bold" if index == predicted else "normal"
        rows.append(
            f'<div class="csr-class" data-class="{escape(name)}" style="margin:2px 0;font-weight:{weight}">'
            f'<div style="display:flex;justify-content:space-between"><span>{escape(name)}</span>'
            f'<span class="csr-prob">{p0:.3f} &rarr; {p1:.3f}</span></div>'
            f"{_bar(p0, BEFORE_COLOR, 5)}{_bar(p1, AFTER_COLOR, 9)}</div>"
        )
    legend = (
        f'<div style="font-size:11px;color:#555">bars: <span style="color:{BEFORE_COLOR}">&#9632; before</span> '
        f'<span style="color:{AFTER_COLOR}">&#9632; after</span> your interaction</div>'
    )
    header = f'<div class="csr-predicted"><b>Prediction: {escape(classes[predicted])}</b> ({after[predicted]:.3f})</div>'
    return f'<div class="csr-prediction-chart">{header}{"".join(rows)}{legend}</div>'


def _bar(value: float, color: str, height: int) -> str:
    width = max(0.0, min(1.0, value)) * 100
    return (
        f'<div style="background:#eee;height:{height}px;margin-top:1px">'
        f'<div style="background:{color};width:{width:.1f}%;height:{height}px"></div></div>'
    )


OOD_WARNING = "Unlike the training images: do not trust this prediction"


def confidence_flag(probs: list[float], margin: float, needs_review: bool, out_of_distribution: bool,
                    distance_ratio: float | None = None) -> str:
    """How far to trust the prediction, in plain words.

    Out of distribution overrides everything: on an image unlike the training images a
    high probability means nothing (docs/decisions.md#out-of-distribution). Otherwise the
    review rule: top-1 minus top-2 probability against the margin.
    """
    if out_of_distribution:
        how_far = "" if distance_ratio is None else f" (its distance from the training images is {distance_ratio:.1f} times the limit)"
        return (
            '<div class="csr-review csr-ood" style="padding:4px 6px;border:2px solid #D55E00;background:#fbe9df">'
            f"<b>&#9888; {OOD_WARNING}</b>{how_far}. Use an image like those the model was trained on.</div>"
        )
    ordered = sorted(probs, reverse=True)
    gap = ordered[0] - (ordered[1] if len(ordered) > 1 else 0.0)
    if needs_review:
        return (
            '<div class="csr-review csr-review-needed" style="padding:4px 6px;border:2px solid #D55E00;'
            f'background:#fbe9df"><b>&#9888; Needs review</b>: top-1 minus top-2 = {gap:.2f} &lt; {margin:.2f}</div>'
        )
    return (
        '<div class="csr-review csr-review-ok" style="padding:4px 6px;border:1px solid #009E73">'
        f"Confident: top-1 minus top-2 = {gap:.2f} &ge; {margin:.2f}</div>"
    )


def confidence_words(needs_review: bool, out_of_distribution: bool) -> str:
    """The same verdict as one phrase, for captions and text."""
    if out_of_distribution:
        return OOD_WARNING.lower()
    return "needs review" if needs_review else "confident"


def colour_bar(lut: np.ndarray, vmax: float, concept: str, prototype: int | None, prototypes: int, fade: bool) -> str:
    """The heatmap's legend: its colours from 0 to ``vmax`` and what they measure.

    lut: (256, 4) uint8 colormap; vmax: the similarity the brightest colour stands for.
    """
    stops = ", ".join(f"rgb({r},{g},{b})" for r, g, b, _ in lut[np.linspace(0, 255, 9).astype(int)])
    which = f"prototype {prototype}" if prototype is not None else f"the best of its {prototypes} prototypes"
    faded = "; faint where low" if fade else ""
    return (
        '<div class="csr-colour-bar" style="font-size:12px;line-height:1.35">'
        f'<div style="display:flex;align-items:center;gap:6px"><span>0</span>'
        f'<span style="flex:1;height:10px;border:1px solid #999;background:linear-gradient(to right, {stops})"></span>'
        f'<span class="csr-vmax">{vmax:.2f}</span></div>'
        f"Heatmap: how similar each region is to {escape(concept)} ({which}), cosine similarity "
        f"from 0 to {vmax:.2f}, the highest before your boxes{faded}.</div>"
    )


def legend(class_name: str) -> str:
    """One line each on what the panel's numbers and the image's marks mean."""
    return (
        '<div class="csr-legend" style="font-size:12px;line-height:1.35;color:#333">'
        "<b>score</b>: the concept's best match in this image (cosine similarity 0&ndash;1, after your boxes).<br>"
        f"<b>to {escape(class_name)}</b>: how much the concept pushes the prediction towards "
        f"{escape(class_name)} (logit units: + towards, &minus; away).<br>"
        "<b>boxes</b>: + look here, &minus; not here (dashed); the shaded cells are where the box acts "
        "on the model's feature grid.</div>"
    )


def question_text(question, classes: list[str]) -> str:
    """A "check next" question (csr_widgets.model.Question) in a clinician's words; a
    location question points at the cell marked on the image, not at coordinates."""
    ask = question.text() if question.kind == "present" else f"Is the {question.concept} in the marked cell (? check here)?"
    consequence = question.consequence(classes)
    return f"{ask} {consequence[0].upper()}{consequence[1:]}."


UNLIKELY = "Check next: nothing. No answer is likely to change the prediction."


def question_line(text: str | None, note: str = "") -> str:
    """The "check next" suggestion; when there is none, ``note`` (say why, or nothing)."""
    if not text:
        return f'<span class="csr-question csr-question-none" style="color:#555">{note}</span>'
    return f'<span class="csr-question"><b>Check next:</b> {escape(text)}</span>'


def concept_cell(score: float, contribution: float, scale: float, rejected: bool, class_name: str) -> str:
    """A concept's score and its signed contribution to the predicted class's logit."""
    share = 0.0 if scale <= 0 else max(-1.0, min(1.0, contribution / scale))
    color = POSITIVE_CONTRIBUTION if contribution >= 0 else NEGATIVE_CONTRIBUTION
    left = 50.0 if share >= 0 else 50.0 + share * 50.0
    bar = (
        '<div style="position:relative;background:#eee;height:8px;width:120px">'
        '<div style="position:absolute;left:50%;width:1px;height:8px;background:#333"></div>'
        f'<div style="position:absolute;left:{left:.1f}%;width:{abs(share) * 50:.1f}%;height:8px;background:{color}"></div></div>'
    )
    state = ' <i style="color:#D55E00">rejected: scored as absent</i>' if rejected else ""
    return (
        f'<div class="csr-concept-cell" style="font-size:12px;line-height:1.3">'
        f'score <span class="csr-score">{score:.3f}</span>{state}<br>'
        f'to {escape(class_name)}: <span class="csr-contribution">{contribution:+.2f}</span>{bar}</div>'
    )


def busy_badge(busy: bool) -> str:
    return '<span class="csr-busy" style="color:#D55E00">&#9203; computing&hellip;</span>' if busy else '<span class="csr-idle"></span>'
