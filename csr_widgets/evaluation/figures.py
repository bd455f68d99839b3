"""Figures for reports: similarity maps, Pointing Game examples, interaction gains,
per-concept contributions.

Every function returns a figure object and shows nothing: a ``matplotlib.figure.Figure``
built without pyplot (no global state, no backend needed until it is saved or displayed),
or, with ``interactive=True`` where hovering helps, a ``plotly.graph_objects.Figure``.
Heatmaps are carried from the feature grid to pixels by ``model.grid.upsample`` only.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Circle, Rectangle

from .._inference import evaluating
from ..model.interaction import Interaction
from . import metrics

HEATMAP = "jet"


def _image_array(image: torch.Tensor) -> tuple[np.ndarray, str | None]:
    """(C, H, W) in [0, 1] -> an array imshow understands, and its colormap."""
    array = image.detach().float().cpu().clamp(0, 1).numpy()
    if array.shape[0] == 1:
        return array[0], "gray"
    return array.transpose(1, 2, 0), None


def _as_image(image) -> torch.Tensor:
    image = torch.as_tensor(image, dtype=torch.float32)
    if image.ndim == 2:
        image = image[None]
    if image.ndim != 3:
        raise ValueError(f"image must be (C, H, W) or (H, W), got shape {tuple(image.shape)}.")
    return image


def _show(ax, image: np.ndarray, cmap: str | None, heat: np.ndarray | None = None, alpha: float = 0.45) -> None:
    ax.imshow(image, cmap=cmap, vmin=0, vmax=1)
    if heat is not None:
        # Cosine similarity clamped at 0 lies in [0, 1]: one fixed scale makes panels comparable.
        ax.imshow(heat, cmap=HEATMAP, vmin=0, vmax=1, alpha=alpha)
    ax.set_xticks([])
    ax.set_yticks([])


def similarity_grid(model, image, interaction: Interaction | None = None, concepts: Sequence[str] | None = None,
                    max_prototypes: int | None = None, alpha: float = 0.45) -> Figure:
    """One image's similarity maps: a row per concept, the concept saliency then each prototype.

    image: (C, H, W) in [0, 1]. Column 0 shows the concept saliency (max over active
    prototypes, with the concept probability); the other columns show each prototype's
    map with its score s_km; pruned prototypes are titled "pruned" and drawn without heat.
    """
    image = _as_image(image)
    names = list(concepts) if concepts is not None else list(model.concepts)
    rows = model.concept_index(names)
    with evaluating(model):
        encoding = model.encode(image[None])
        out = model.reason(encoding, interaction)
        size = encoding.image_size
        saliency = metrics.concept_saliency(out.similarity_maps, model.grid, size, model.prototype_mask)[0]
        maps = model.grid.upsample(out.similarity_maps[0].clamp(min=0), size)  # (K, M, H, W)
    M = maps.shape[1] if max_prototypes is None else min(max_prototypes, maps.shape[1])
    picture, cmap = _image_array(image)
    fig = Figure(figsize=(1.6 * (M + 1), 1.7 * len(rows)), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(rows), M + 1, squeeze=False))
    mask = model.prototype_mask.cpu()
    for r, k in enumerate(rows):
        heat = saliency[k].clamp(min=0).cpu().numpy()
        _show(axes[r, 0], picture, cmap, None if np.isnan(heat).any() else heat, alpha)
        axes[r, 0].set_title(f"{names[r]}  p={out.concept_probs[0, k]:.2f}", fontsize=8)
        for m in range(M):
            active = bool(mask[k, m])
            _show(axes[r, m + 1], picture, cmap, maps[k, m].cpu().numpy() if active else None, alpha)
            title = f"p{m}  s={out.scores[0, k, m]:.2f}" if active else f"p{m}  pruned"
            axes[r, m + 1].set_title(title, fontsize=7)
    fig.suptitle(f"predicted {model.classes[int(out.prediction[0])]} ({float(out.probs.max()):.2f})", fontsize=9)
    return fig


def pointing_examples(model, dataset, frame: pd.DataFrame, concept: str, tolerance: float = 0, n: int = 3,
                      alpha: float = 0.45) -> Figure:
    """Pointing Game hits (top row) and misses (bottom row) for one concept.

    frame: an ``evaluate`` frame of ``model`` on ``dataset`` with tolerance ``tolerance``.
    Each panel shows the concept saliency, the concept's ground-truth boxes (green), the
    shortcut box if any (orange, dashed), and the argmax point (green + hit, red x miss,
    with the tolerance as a circle).
    """
    column = f"hit@{tolerance:g}/{concept}"
    if column not in frame:
        raise ValueError(f"The frame has no column {column!r}: evaluate with tolerances including {tolerance:g}.")
    picked = {"hits": frame.index[frame[column] == 1][:n], "misses": frame.index[frame[column] == 0][:n]}
    k = model.concept_index([concept])[0]
    fig = Figure(figsize=(2.2 * n, 4.6), layout="constrained")
    axes = fig.subplots(2, n, squeeze=False)
    for r, (kind, rows) in enumerate(picked.items()):
        for c in range(n):
            ax = axes[r, c]
            ax.set_axis_off()
            if c >= len(rows):
                if c == 0:
                    ax.text(0.5, 0.5, f"no {kind}", ha="center", va="center", transform=ax.transAxes, fontsize=9)
                continue
            row = frame.loc[rows[c]]
            item = dataset[int(row["index"])]
            image = _as_image(item["image"])
            with evaluating(model):
                encoding = model.encode(image[None])
                out = model.reason(encoding)
                heat = metrics.concept_saliency(out.similarity_maps, model.grid, encoding.image_size, model.prototype_mask)[0, k]
            picture, cmap = _image_array(image)
            _show(ax, picture, cmap, heat.clamp(min=0).cpu().numpy(), alpha)
            for name, x0, y0, x1, y1 in item.get("boxes", ()):
                if name == concept:
                    # Pixel i spans [i - 0.5, i + 0.5] in imshow coordinates.
                    ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor="lime", lw=1.2))
            if item.get("shortcut_box") is not None:
                x0, y0, x1, y1 = item["shortcut_box"]
                ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor="orange", lw=1.2, ls="--"))
            y, x = row[f"point_y/{concept}"], row[f"point_x/{concept}"]
            hit = kind == "hits"
            ax.plot([x], [y], marker="+" if hit else "x", color="lime" if hit else "red", markersize=10, mew=2)
            if tolerance > 0:
                ax.add_patch(Circle((x, y), tolerance, fill=False, edgecolor="white", lw=0.8, ls=":"))
            ax.set_title(f"#{int(row['index'])} {'hit' if hit else 'miss'}  d={row[f'distance/{concept}']:.0f}px", fontsize=8)
    fig.suptitle(f"Pointing Game, {concept}, tolerance {tolerance:g} px", fontsize=9)
    return fig


def interaction_gains_chart(gains: pd.DataFrame, interactive: bool = False):
    """Bar chart of the macro F1 gain (points) per feedback kind, one bar per trigger.

    gains: ``simulation.interaction_gains`` output. Bars are annotated with the number of
    cases touched.
    """
    triggers = list(dict.fromkeys(gains.index.get_level_values("trigger")))
    kinds = list(dict.fromkeys(gains.index.get_level_values("kind")))
    if interactive:
        import plotly.graph_objects as go

        fig = go.Figure()
        for trigger in triggers:
            part = gains.xs(trigger, level="trigger").reindex(kinds)
            fig.add_bar(x=kinds, y=100 * part["gain"], name=f"trigger: {trigger}",
                        text=[f"{t} touched" for t in part["touched"]],
                        customdata=np.stack([100 * part["macro_f1_before"], 100 * part["macro_f1_after"]], axis=1),
                        hovertemplate="%{x}: %{y:+.2f} pts (F1 %{customdata[0]:.1f} -> %{customdata[1]:.1f}), %{text}<extra></extra>")
        fig.update_layout(barmode="group", yaxis_title="macro F1 gain (points)", title="Simulated interaction")
        return fig
    fig = Figure(figsize=(max(5, 0.9 * len(kinds) + 1), 3.4), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / max(len(triggers), 1)
    for i, trigger in enumerate(triggers):
        part = gains.xs(trigger, level="trigger").reindex(kinds)
        x = np.arange(len(kinds)) + (i - (len(triggers) - 1) / 2) * width
        bars = ax.bar(x, 100 * part["gain"].to_numpy(), width, label=f"trigger: {trigger}")
        ax.bar_label(bars, labels=[f"{t}" for t in part["touched"]], fontsize=7, padding=2)
    ax.axhline(0, color="black", lw=0.8)
    ax.margins(y=0.12)  # room for the bar labels
    # Kind names are long (concept_both, random_question): slanted, seven of them stay readable.
    ax.set_xticks(np.arange(len(kinds)), kinds, rotation=30, ha="right", rotation_mode="anchor")
    ax.set_ylabel("macro F1 gain (points)")
    ax.set_title("Simulated interaction (bar labels: cases touched)", fontsize=9)
    ax.legend(fontsize=8)
    return fig


def contribution_chart(model, reasoning, index: int = 0, class_index: int | None = None, interactive: bool = False):
    """Each concept's share of one class logit for one image (``reasoning.contributions``).

    reasoning: a ``Reasoning``; index: the image in its batch; class_index: defaults to the
    predicted class. Positive shares (towards the class) are blue, negative red; the title
    gives the logit = sum of shares + bias.
    """
    n = int(reasoning.prediction[index]) if class_index is None else int(class_index)
    shares = reasoning.contributions[index, n].detach().float().cpu().numpy()
    bias = float(model.task_head.bias.detach()[n])
    names = list(model.concepts)
    order = np.argsort(shares)
    colours = np.where(shares[order] >= 0, "#1f77b4", "#d62728")
    title = f"{model.classes[n]}: logit {shares.sum() + bias:.2f} = concepts {shares.sum():.2f} + bias {bias:.2f}"
    if interactive:
        import plotly.graph_objects as go

        fig = go.Figure(go.Bar(x=shares[order], y=[names[k] for k in order], orientation="h", marker_color=list(colours),
                               hovertemplate="%{y}: %{x:+.3f}<extra></extra>"))
        fig.update_layout(title=title, xaxis_title="contribution to the logit")
        return fig
    fig = Figure(figsize=(4.5, 0.35 * len(names) + 1.2), layout="constrained")
    ax = fig.subplots()
    ax.barh(np.arange(len(names)), shares[order], color=colours)
    ax.set_yticks(np.arange(len(names)), [names[k] for k in order])
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel("contribution to the logit")
    ax.set_title(title, fontsize=9)
    return fig
