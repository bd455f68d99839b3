"""The explorers' CSS: a layout that adapts to the space, a visible key focus, a clearly
marked active tool, greyed rejected rows.

ipywidgets has no stylesheet API; a ``<style>`` element inside an HTML widget applies to
the whole page (JupyterLab, Notebook 7 and Voila alike), and every rule here is scoped
to the explorers' own classes. Measured in Chromium at 1000 and 1400 px wide windows
(tests/browser): nothing overlaps or is cut.
"""
from __future__ import annotations

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


def style_widget() -> widgets.HTML:
    """An invisible widget carrying the CSS (one per explorer: identical rules, harmless)."""
    style = widgets.HTML(f"<style>{CSS}</style>", layout=widgets.Layout(display="none"))
    style.add_class("csr-style")
    return style
