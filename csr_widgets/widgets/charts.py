"""Small HTML charts for the explorer's side panel: pure functions, numbers in, HTML out.

HTML (not a plotting library) because each update is a few hundred bytes of text on the
wire, renders identically in JupyterLab and Voila, and its text is readable by a browser
test. Colours are from the Okabe-Ito palette (colour-blind safe).
"""
from __future__ import annotations

from html import escape

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


def review_flag(probs: list[float], margin: float, needs_review: bool) -> str:
    """The review rule in plain words: top-1 minus top-2 probability against the margin."""
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
    state = ' <i style="color:#D55E00">rejected</i>' if rejected else ""
    return (
        f'<div class="csr-concept-cell" style="font-size:12px;line-height:1.3">'
        f'score <span class="csr-score">{score:.3f}</span>{state}<br>'
        f'to {escape(class_name)}: <span class="csr-contribution">{contribution:+.2f}</span>{bar}</div>'
    )


def busy_badge(busy: bool) -> str:
    return '<span class="csr-busy" style="color:#D55E00">&#9203; computing&hellip;</span>' if busy else '<span class="csr-idle"></span>'
