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
ipywidgets cannot set an attribute, so the style widget carries a script that marks
whatever receives the focus inside the explorer, and gives the image the key focus when
the pointer enters it or a click lands elsewhere in the explorer (without scrolling). ipywidgets' HTML widget sets its value as innerHTML, where a ``<script>`` does
not run; an image that fails to load runs its ``onerror``. Where the script cannot run,
the kernel still focuses the image when the pointer enters it (a widget "focus"
message), and only the shortcut suppression is missing.
"""
from __future__ import annotations

import html

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


KEY_SCRIPT = " ".join("""
var root = this.closest('.csr-explorer');
if (root && !root.dataset.csrKeys) {
  root.dataset.csrKeys = '1';
  root.addEventListener('focusin', function (e) { e.target.setAttribute('data-lm-suppress-shortcuts', 'true'); });
  var focus = function () { var c = root.querySelector('.csr-canvas'); if (c && document.activeElement !== c) c.focus({preventScroll: true}); };
  root.addEventListener('mouseover', function (e) { if (e.target.classList.contains('csr-canvas')) focus(); });
  root.addEventListener('click', function (e) { if (!e.target.closest('select, textarea, input[type=text], input[type=number], .widget-slider')) focus(); });
}
""".split())


def style_widget() -> widgets.HTML:
    """An invisible widget carrying the CSS and the key script (one per explorer: the
    rules are identical, the script marks its own explorer once)."""
    script = html.escape(KEY_SCRIPT, quote=True)
    style = widgets.HTML(f'<style>{CSS}</style><img src="data:," alt="" onerror="{script}">', layout=widgets.Layout(display="none"))
    style.add_class("csr-style")
    return style
