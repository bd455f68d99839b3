"""The explorer's side panel: the prediction, how far to trust it, what to check next, the
legend, and one row per concept (untick to reject). Thin widgets over ``charts`` (pure
HTML): the panel shows what it is given and reports what the user does through two
callbacks; it never decides anything about the model.
"""
from __future__ import annotations

from collections.abc import Callable

import ipywidgets as widgets
import numpy as np

from . import charts


class SidePanel(widgets.VBox):
    """concepts, classes: the model's names; crops: a 48-px atlas crop per concept row.
    on_toggle(name, kept): a concept ticked or unticked by the user.
    on_answer(yes): the user answered the "check next" question.
    """

    def __init__(self, concepts: list[str], classes: list[str], *, crops: bool,
                 on_toggle: Callable[[str, bool], None], on_answer: Callable[[bool], None]):
        super().__init__()
        self.classes = list(classes)
        self._on_toggle = on_toggle
        self._syncing = False  # True while the panel shows a state (no callbacks)

        self.prediction = widgets.HTML()
        self.prediction.add_class("csr-prediction")
        self.confidence = widgets.HTML()
        self.confidence.add_class("csr-review-flag")
        self.question = widgets.HTML()
        self.yes = widgets.Button(description="yes", tooltip="answer yes: the model is told so (undo with z)", layout=widgets.Layout(width="auto"))
        self.no = widgets.Button(description="no", tooltip="answer no: the model is told so (undo with z)", layout=widgets.Layout(width="auto"))
        self.yes.on_click(lambda _: on_answer(True))
        self.no.on_click(lambda _: on_answer(False))
        self.question_row = widgets.HBox([self.question, self.yes, self.no])
        self.question_row.add_class("csr-question-row")
        self.colour_bar = widgets.HTML()
        self.legend = widgets.HTML()
        heading = widgets.HTML("<b>Concepts</b> (untick one to reject it)" + (" &middot; atlas: this looks like that" if crops else ""))

        self.checks: dict[str, widgets.Checkbox] = {}
        self.cells: dict[str, widgets.HTML] = {}
        self.crops: dict[str, widgets.Image] = {}
        self.rows: dict[str, widgets.HBox] = {}
        for name in concepts:
            check = widgets.Checkbox(value=True, description=name, indent=False, layout=widgets.Layout(width="140px"))
            check.add_class("csr-concept-toggle")
            check.observe(lambda change, name=name: self._toggled(name, change["new"]), names="value")
            cell = widgets.HTML(layout=widgets.Layout(width="170px"))
            row = [check, cell]
            if crops:
                self.crops[name] = widgets.Image(format="png", layout=widgets.Layout(width="48px", height="48px"))
                row.append(self.crops[name])
            self.checks[name], self.cells[name] = check, cell
            self.rows[name] = widgets.HBox(row)
            self.rows[name].add_class("csr-concept-row")
        # the colour bar belongs under the image: the explorer places it there
        self.children = [self.prediction, self.confidence, self.question_row, heading, *self.rows.values(), self.legend]
        self.add_class("csr-panel")

    def _toggled(self, name: str, kept: bool) -> None:
        if not self._syncing:
            self._on_toggle(name, kept)

    # ------------------------------------------------------------------ showing
    def show_rejected(self, rejected) -> None:
        """Tick every concept but the rejected ones, and grey the rejected rows."""
        self._syncing = True
        try:
            for name, check in self.checks.items():
                check.value = name not in rejected
                if name in rejected:
                    self.rows[name].add_class("csr-rejected")
                else:
                    self.rows[name].remove_class("csr-rejected")
        finally:
            self._syncing = False

    def show_result(self, result, baseline, rejected, review_margin: float, distance_ratio: float | None) -> None:
        """The prediction (before -> after), its confidence, and each concept's numbers."""
        probs = result.probs[0].tolist()
        predicted = int(np.argmax(probs))
        self.prediction.value = charts.prediction_chart(self.classes, baseline.probs[0].tolist(), probs, predicted)
        self.confidence.value = charts.confidence_flag(
            probs, review_margin, bool(result.needs_review[0]), bool(result.out_of_distribution[0]), distance_ratio)
        scores = result.scores[0].amax(-1).tolist()  # (K,) best prototype per concept
        contributions = result.contributions[0, predicted].tolist()
        scale = max(1e-6, max(abs(c) for c in contributions))
        class_name = self.classes[predicted]
        legend = charts.legend(class_name)
        if self.legend.value != legend:
            self.legend.value = legend
        for k, name in enumerate(self.checks):
            self.cells[name].value = charts.concept_cell(scores[k], contributions[k], scale, name in rejected, class_name)

    def show_question(self, text: str | None, note: str = "") -> None:
        """text: the question to ask; without one, ``note`` says why (or nothing)."""
        self.question.value = charts.question_line(text, note)
        for button in (self.yes, self.no):
            button.layout.display = None if text else "none"

    def show_colour_bar(self, html: str) -> None:
        if self.colour_bar.value != html:
            self.colour_bar.value = html

    def show_crop(self, name: str, png: bytes | None) -> None:
        if png is not None and self.crops[name].value != png:
            self.crops[name].value = png
