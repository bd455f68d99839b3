"""What the explorers add to the page: CSS, and a few lines of script for the keys.

The CSS: a layout that adapts to the space, a visible key focus, a clearly marked active
tool, greyed rejected rows. ipywidgets has no stylesheet API; a ``<style>`` element inside
an HTML widget applies to the whole page (JupyterLab, Notebook 7 and Voila alike), and
every rule here is scoped to the explorers' own classes. Checked in Chromium at 1000 and
1400 px wide windows (tests/browser): nothing overlaps or is cut.

The script (docs/decisions.md#explorer-keys): JupyterLab and Notebook 7 read every key press in the
capture phase, before the widget that has the focus, so with the image focused and the
notebook in command mode, ``r`` turned the explorer's cell into a Raw cell (deleting the
explorer) and ``y``/``z`` changed or undid cells. Lumino looks for a shortcut from the
focused element up and stops at an element marked ``data-lm-suppress-shortcuts``;
ipywidgets cannot set an attribute, so a tiny anywidget front end (``PageSupport``, an ES
module run by the page) marks whatever receives the focus inside its explorer, and gives
the image the key focus when the pointer enters it or a click lands elsewhere in the
explorer (without scrolling). Where no front end runs (a static export), the kernel still
focuses the image when the pointer enters it (a widget "focus" message).
"""
from __future__ import annotations

import anywidget
import ipywidgets as widgets

CSS = """
.csr-explorer, .csr-atlas-explorer { max-width: 100%; box-sizing: border-box; }
.csr-explorer .csr-toolbar, .csr-explorer .csr-toolbar-group, .csr-explorer .csr-view-controls, .csr-explorer .csr-question-row,
.csr-atlas-explorer .csr-atlas-toolbar { flex-wrap: wrap; gap: 4px 8px; align-items: center; }
.csr-explorer .widget-toggle-buttons, .csr-atlas-explorer .widget-toggle-buttons { flex-wrap: wrap; height: auto; }
.csr-explorer .widget-toggle-buttons > div, .csr-atlas-explorer .widget-toggle-buttons > div { flex-wrap: wrap; display: flex; }
.csr-explorer .widget-toggle-button, .csr-atlas-explorer .widget-toggle-button { white-space: nowrap; }
.csr-explorer .csr-main { flex-wrap: wrap; gap: 12px; align-items: flex-start; }
.csr-explorer .csr-view { min-width: 200px; }
.csr-explorer .csr-panel { min-width: 280px; }
.csr-explorer .csr-panel .widget-html-content, .csr-atlas-explorer .widget-html-content { line-height: 1.4; }
.csr-explorer .csr-canvas { display: block; cursor: crosshair; }
.csr-explorer .csr-canvas:focus { outline: 3px solid #0072B2; outline-offset: 2px; }
.csr-explorer .csr-hint { font-size: 12px; color: #555; line-height: 1.35; }
.csr-explorer .csr-toolbar-group .widget-html { margin-right: 0; }
.csr-explorer .csr-hint kbd { font: bold 11px monospace; border: 1px solid #bbb; border-radius: 3px; padding: 0 3px; background: #f6f6f6; }
.csr-explorer .csr-hint .csr-keys-on { display: none; }
.csr-explorer .csr-view:has(.csr-canvas:focus) .csr-hint .csr-keys-on { display: inline; color: #0072B2; font-weight: bold; }
.csr-explorer .csr-view:has(.csr-canvas:focus) .csr-hint .csr-keys-off { display: none; }
.csr-explorer .widget-toggle-button.mod-active, .csr-atlas-explorer .widget-toggle-button.mod-active {
  background: #0072B2; color: #fff; font-weight: bold; box-shadow: inset 0 0 0 2px #003d61; }
.csr-explorer .csr-concept-row { align-items: center; flex-wrap: wrap; }
.csr-explorer .csr-concept-row.csr-rejected { opacity: 0.45; }
.csr-explorer .csr-concept-row.csr-rejected .csr-concept-cell { font-style: italic; }
.csr-explorer .widget-dropdown, .csr-explorer .widget-hslider { max-width: 100%; }
.csr-atlas-explorer .csr-atlas-grid { grid-template-columns: repeat(auto-fill, minmax(var(--csr-tile, 130px), 1fr)); }
.csr-atlas-explorer .csr-atlas-tile.csr-pruned { border: 2px dashed #D55E00 !important; background: #fbe9df; }
"""


KEY_MODULE = """
export default {
  render({ el }) {
    // the view is attached to the page after render returns: find the explorer around it then
    let tries = 0;
    const attach = () => {
      const root = el.closest('.csr-explorer');
      if (!root) { if (tries++ < 600) requestAnimationFrame(attach); return; }
      if (root.dataset.csrKeys) return;
      root.dataset.csrKeys = '1';
      root.addEventListener('focusin', (e) => e.target.setAttribute('data-lm-suppress-shortcuts', 'true'));
      const focus = () => {
        const canvas = root.querySelector('.csr-canvas');
        if (canvas && document.activeElement !== canvas) canvas.focus({ preventScroll: true });
      };
      root.addEventListener('mouseover', (e) => { if (e.target.classList.contains('csr-canvas')) focus(); });
      root.addEventListener('click', (e) => {
        if (!e.target.closest('select, textarea, input[type=text], input[type=number], .widget-slider')) focus();
      });
    };
    attach();
  },
};
"""


class PageSupport(anywidget.AnyWidget):
    """Invisible: the explorers' CSS and the key handling above, as an anywidget front end
    (one per explorer: the rules are identical, the module marks its own explorer once)."""

    _esm = KEY_MODULE
    _css = CSS


def style_widget() -> PageSupport:
    """The page support widget, hidden, to place inside an explorer."""
    support = PageSupport(layout=widgets.Layout(display="none"))
    support.add_class("csr-style")
    return support
