"""AtlasExplorer: browse, prune and refit the prototypes of a CSR model
(docs/method.md#atlas-and-pruning).

The atlas
---------
A ``csr_widgets.evaluation.atlas.Atlas`` (``load_atlas``, ``build_atlas``), or any
object whose ``atlas[k, m]`` returns None (no entry) or an object or mapping with the
fields of ``AtlasEntry``: ``crop`` (uint8 (h, w), (h, w, 3) or (h, w, 4), the
training-image patch most similar to prototype (k, m), Eq. 11), ``source_index`` (the
image's index in the training dataset), ``location`` ((x0, y0, x1, y1) of the crop in that
image, x1/y1 exclusive), ``similarity`` and an optional ``heatmap`` ((h, w) in [0, 1]).
``csr_widgets.evaluation.atlas.atlas_entry`` reads both.

Optionally ``atlas.usage``: (K, M) counts of how often each prototype is the best of its
concept (``build_atlas`` stores them); when the atlas has none and a dataset is given, the
explorer counts them (one pass over the dataset: ~5 min for the bundled recipe's 3,000
images on a 2-core machine, so an atlas's own counts are preferred). Without a
``heatmap``, and with a dataset, a tile shows the prototype's similarity map on its
source image (only the atlas's source images are encoded).

Dataset items are read as docs/architecture.md#the-item-format describes them (image
(C, H, W) in [0, 1], concepts (K,), label, boxes), as a mapping, an object with those
attributes, or a tuple.

Pruning writes ``model.prototype_mask`` (a public mask: pruned prototypes enter the task
head as 0), and the tiles show that mask: a prototype pruned before the explorer opened
shows pruned, and every widget on the same model follows each change (``views``). "Apply" refits the task head with ``refit(model, dataset, progress=callback)``, where
``callback(fraction)`` takes a float in [0, 1] (a refit without a ``progress`` parameter
is called without it); the default is ``csr_widgets.training.refit_task_head``.
Validation macro F1 is shown before and after.
"""
from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Mapping
from pathlib import Path

import ipywidgets as widgets
import numpy as np
import torch
import traitlets

from .._inference import evaluating, single_threaded
from ..model import CSRModel, Encoding
from . import render, views
from .page import style_widget
from .image import model_input, read_image

MASK_FORMAT = "csr_widgets.prototype_mask/1"
SORTS = ("usage", "weight", "index")


def item_fields(item) -> tuple[torch.Tensor, torch.Tensor | None, int | None]:
    """(image, concepts, label) of a dataset item (mapping, object or tuple)."""
    if isinstance(item, Mapping):
        return item["image"], item.get("concepts"), item.get("label")
    if hasattr(item, "image"):
        return item.image, getattr(item, "concepts", None), getattr(item, "label", None)
    if isinstance(item, (tuple, list)) and item:
        return item[0], item[1] if len(item) > 1 else None, item[2] if len(item) > 2 else None
    raise TypeError(f"Cannot read a dataset item of type {type(item).__name__}: expected image, concepts, label.")


class AtlasExplorer(widgets.VBox):
    """Per concept, a grid of prototype crops with their similarity heatmaps, usage counts
    and task-head weights; prune toggles; "apply" refits the task head.

    Parameters
    ----------
    model: the CSRModel whose ``prototype_mask`` is edited in place.
    atlas: see the module docstring.
    dataset: training items (for usage counts, heatmaps on crops, and the refit).
    validation: items for the F1 shown before/after refitting (default: ``dataset``,
        labelled as such).
    refit: callable ``refit(model, dataset, progress=callback)`` that refits the task
        head in place; default ``csr_widgets.training.refit_task_head``.
    """

    revision = traitlets.Int(0, read_only=True, help="bumped whenever the mask or the head changes")

    def __init__(
        self,
        model: CSRModel,
        atlas,
        dataset=None,
        *,
        validation=None,
        refit: Callable | None = None,
        sort: str = "usage",
        colormap: str = render.DEFAULT_COLORMAP,
        tile_size: int = 96,
        columns: int = 5,
        batch_size: int = 32,
    ):
        super().__init__()
        if not all(hasattr(model, name) for name in ("encode", "reason", "prototype_mask", "task_head")):
            raise TypeError(f"AtlasExplorer needs a CSRModel, got {type(model).__name__}.")
        if sort not in SORTS:
            raise ValueError(f"sort must be one of {SORTS}, got {sort!r}.")
        self.model, self.atlas, self.dataset = model, atlas, dataset
        self.validation = validation if validation is not None else dataset
        self._validation_is_dataset = validation is None
        self._refit = refit
        self.colormap = colormap
        self.tile_size = int(tile_size)
        self.batch_size = int(batch_size)
        self._source_maps: dict[int, torch.Tensor] = {}  # source image -> (K, M, h, w) S
        self._source_sizes: dict[int, tuple[int, int]] = {}
        self._validation_encodings: list[tuple[Encoding, np.ndarray]] | None = None
        from ..evaluation.atlas import atlas_entry  # here, not on import: evaluation brings pandas, scikit-learn

        K, M = model.config.num_concepts, model.config.prototypes_per_concept
        self._entries = {(k, m): atlas_entry(atlas, k, m) for k in range(K) for m in range(M)}  # None: no entry

        self.usage = self._usage_counts()  # (K, M) int or None
        self._build(sort, columns)
        views.follow(model, self._model_changed)
        self.f1_start = self.validation_f1()
        self._f1_before = self._f1_after = None
        self._show_f1()

    # ------------------------------------------------------------------ numbers
    @property
    def mask(self) -> np.ndarray:
        """(K, M) bool: True = prototype kept (a copy of model.prototype_mask)."""
        return self.model.prototype_mask.detach().cpu().numpy().copy()

    def weights(self) -> np.ndarray:
        """(K, M) the largest absolute task-head weight of each prototype over classes."""
        K, M = self.mask.shape
        weight = self.model.task_head.linear.weight.detach().cpu().view(-1, K, M)
        return weight.abs().amax(0).numpy()

    def _encode(self, items: list) -> tuple[Encoding, list]:
        images, labels, concepts = [], [], []
        size = (self.model.config.image_size,) * 2
        for item in items:
            image, concept, label = item_fields(item)
            images.append(model_input(read_image(image), self.model.config.in_channels, size)[0])
            labels.append(label)
            concepts.append(concept)
        with evaluating(self.model):  # batch norm must use its running statistics here
            encoding = self.model.encode(torch.stack(images).to(self.model.device))
        return encoding, list(zip(labels, concepts))

    def _batches(self, dataset):
        for start in range(0, len(dataset), self.batch_size):
            yield [dataset[i] for i in range(start, min(start + self.batch_size, len(dataset)))]

    def _usage_counts(self) -> np.ndarray | None:
        """How often each prototype is its concept's best, over dataset images showing the concept.

        The same pass keeps what else needs the dataset's encodings (the validation
        encodings when validation is the dataset, the atlas source images' maps), so each
        image is encoded once.
        """
        usage = getattr(self.atlas, "usage", None)
        if usage is not None or self.dataset is None:
            return None if usage is None else np.asarray(torch.as_tensor(usage).cpu(), dtype=np.int64)
        K, M = self.model.config.num_concepts, self.model.config.prototypes_per_concept
        counts = np.zeros((K, M), np.int64)
        sources = self._source_indices()
        validation = [] if self.validation is self.dataset else None
        for start, items in zip(range(0, len(self.dataset), self.batch_size), self._batches(self.dataset)):
            encoding, meta = self._encode(items)
            with torch.inference_mode():
                best = self.model.reason(encoding).scores.argmax(-1).cpu().numpy()  # (B, K)
            for b, (_, concepts) in enumerate(meta):
                present = np.ones(K, bool) if concepts is None else np.asarray(torch.as_tensor(concepts).cpu()) > 0.5
                for k in np.flatnonzero(present):
                    counts[k, best[b, k]] += 1
                if start + b in sources:
                    self._keep_source(start + b, items[b], encoding.similarity_maps[b])
            if validation is not None:
                validation.append((_pooled(encoding), np.array([int(label) for label, _ in meta])))
        if validation is not None:
            self._validation_encodings = validation
        return counts

    def validation_f1(self) -> float | None:
        """Macro F1 (``metrics.macro_f1``, Table 1's) of the model as it is now on the
        validation items (None without them).

        Images are encoded once; pruning and refitting only change ``reason``.
        """
        if self.validation is None:
            return None
        from ..evaluation.metrics import macro_f1  # here, not on import: scikit-learn

        if self._validation_encodings is None:
            self._validation_encodings = []
            for items in self._batches(self.validation):
                encoding, meta = self._encode(items)
                self._validation_encodings.append((_pooled(encoding), np.array([int(label) for label, _ in meta])))
        predicted, truth = [], []
        with torch.inference_mode(), single_threaded():
            for encoding, labels in self._validation_encodings:
                predicted.append(self.model.reason(encoding).prediction.cpu().numpy())
                truth.append(labels)
        return macro_f1(np.concatenate(truth), np.concatenate(predicted))

    # ------------------------------------------------------------------ mask
    def set_pruned(self, concept: str | int, prototype: int, pruned: bool = True) -> None:
        """Prune (or restore) prototype ``prototype`` of a concept (name or index)."""
        k = concept if isinstance(concept, int) else self.model.concept_index([concept])[0]
        with torch.no_grad():
            self.model.prototype_mask[k, prototype] = not pruned
        self._sync_toggles()
        self._bump()

    def export_mask(self) -> dict:
        """The pruning as plain data: pruned prototype indices per concept name."""
        mask = self.mask
        return {
            "format": MASK_FORMAT,
            "concepts": list(self.model.concepts),
            "prototypes_per_concept": int(mask.shape[1]),
            "pruned": {name: [int(m) for m in np.flatnonzero(~mask[k])] for k, name in enumerate(self.model.concepts)},
        }

    def save_mask(self, path) -> None:
        Path(path).write_text(json.dumps(self.export_mask(), indent=2))

    def load_mask(self, data) -> None:
        """Apply a mask from ``export_mask`` (dict, JSON text, or a path to a JSON file), or a (K, M) bool array."""
        K, M = self.model.config.num_concepts, self.model.config.prototypes_per_concept
        if isinstance(data, (np.ndarray, torch.Tensor)):
            mask = np.asarray(torch.as_tensor(data).cpu(), dtype=bool)
            if mask.shape != (K, M):
                raise ValueError(f"A prototype mask must have shape (K, M) = {(K, M)}, got {mask.shape}.")
        else:
            if isinstance(data, Path) or (isinstance(data, str) and not data.lstrip().startswith("{")):
                data = Path(data).read_text()
            if isinstance(data, str):
                data = json.loads(data)
            if not isinstance(data, Mapping) or data.get("format") != MASK_FORMAT:
                raise ValueError(f"Not a prototype mask: expected a dict with format {MASK_FORMAT!r}.")
            if list(data["concepts"]) != list(self.model.concepts) or int(data["prototypes_per_concept"]) != M:
                raise ValueError(
                    f"The mask is for concepts {data['concepts']} with M={data['prototypes_per_concept']}; this "
                    f"model has {self.model.concepts} with M={M}."
                )
            mask = np.ones((K, M), bool)
            for name, pruned in data["pruned"].items():
                for m in pruned:
                    if not 0 <= int(m) < M:
                        raise ValueError(f"Prototype index {m} of {name!r} is out of range [0, {M}).")
                    mask[self.model.concepts.index(name), int(m)] = False
        with torch.no_grad():
            self.model.prototype_mask.copy_(torch.from_numpy(mask))
        self._sync_toggles()
        self._bump()

    # ------------------------------------------------------------------ apply
    def apply(self) -> tuple[float | None, float | None]:
        """Refit the task head with the current mask; returns validation F1 (before, after)."""
        if self.dataset is None:
            raise ValueError("Refitting needs the training dataset: AtlasExplorer(model, atlas, dataset).")
        self._apply_button.disabled = True
        self._progress.value = 0.0
        self._progress.layout.visibility = "visible"
        self._status.value = "refitting the task head&hellip;"
        try:
            refit = self._refit if self._refit is not None else _default_refit
            self._f1_before = self.validation_f1()
            kwargs = {"progress": self._on_progress} if _accepts(refit, "progress") else {}
            refit(self.model, self.dataset, **kwargs)
            self._progress.value = 1.0
            self._f1_after = self.validation_f1()
            self._status.value = "refitted"
        except Exception as error:
            self._status.value = f'<span style="color:#D55E00">refit failed: {type(error).__name__}: {error}</span>'
            raise
        finally:
            self._apply_button.disabled = False
        self._show_f1()
        self._refresh_weights()
        self._bump()
        return self._f1_before, self._f1_after

    def _on_progress(self, fraction, *args, **kwargs) -> None:
        self._progress.value = float(min(max(fraction, 0.0), 1.0))

    # ------------------------------------------------------------------ widgets
    def _build(self, sort: str, columns: int) -> None:
        K, M = self.model.config.num_concepts, self.model.config.prototypes_per_concept
        self._toggles: dict[tuple[int, int], widgets.Checkbox] = {}
        self._captions: dict[tuple[int, int], widgets.HTML] = {}
        self._tiles: dict[tuple[int, int], widgets.VBox] = {}
        self._grids: list[widgets.GridBox] = []
        cell = self.tile_size + 24  # a tile and its padding, px
        for k in range(K):
            for m in range(M):
                self._tiles[k, m] = self._tile(k, m)
            # as many columns as fit, at most ``columns``: the grid wraps in a narrow notebook
            grid = widgets.GridBox(layout=widgets.Layout(grid_template_columns=f"repeat(auto-fill, {cell}px)", grid_gap="6px",
                                                         max_width=f"{columns * (cell + 6)}px"))
            grid.add_class("csr-atlas-grid")
            self._grids.append(grid)
        # a concept per button (they wrap), not tabs (cut to "nod..." when the concepts do not fit)
        self._concept = widgets.ToggleButtons(options=[(name, k) for k, name in enumerate(self.model.concepts)], value=0,
                                              description="concept", style=widgets.ToggleButtonsStyle(button_width="auto"))
        self._grid_box = widgets.Box([self._grids[0]])
        self._concept.observe(lambda change: setattr(self._grid_box, "children", [self._grids[change["new"]]]), names="value")
        self._sort = widgets.ToggleButtons(
            options=[("by usage", "usage"), ("by head weight", "weight"), ("by index", "index")],
            value=sort, description="sort", style=widgets.ToggleButtonsStyle(button_width="auto"),
        )
        self._sort.observe(lambda _: self._arrange(), names="value")
        needs = "" if self.dataset is not None else " (needs the training images: AtlasExplorer(model, atlas, dataset))"
        self._apply_button = widgets.Button(description="apply: refit the task head", icon="refresh", disabled=self.dataset is None,
                                            tooltip="refit the task head with the pruned prototypes masked" + needs)
        self._apply_button.layout.width = "auto"
        self._apply_button.on_click(lambda _: self._apply_clicked())
        self._progress = widgets.FloatProgress(value=0.0, min=0.0, max=1.0, layout=widgets.Layout(visibility="hidden", width="200px"))
        self._status = widgets.HTML(
            "" if self.dataset is not None else
            '<span class="csr-apply-needs" style="color:#555">"apply" needs the training images the atlas was built from: '
            "<code>AtlasExplorer(model, atlas, dataset)</code></span>"
        )
        self._f1 = widgets.HTML()
        self._f1.add_class("csr-atlas-f1")
        self._mask_text = widgets.Textarea(placeholder="pruning mask (JSON)", layout=widgets.Layout(width="auto", height="70px", align_self="stretch"))
        export_button = widgets.Button(description="export mask", tooltip="the pruned prototypes as JSON, in the box below")
        export_button.on_click(lambda _: setattr(self._mask_text, "value", json.dumps(self.export_mask())))
        load_button = widgets.Button(description="load mask", tooltip="prune as the JSON in the box below says")
        load_button.on_click(lambda _: self._load_clicked())
        toolbar = widgets.HBox([self._sort, self._apply_button, self._progress, self._status])
        toolbar.add_class("csr-atlas-toolbar")
        legend = widgets.HTML(
            '<div style="font-size:12px;color:#333">Each tile: the training-image patch a prototype matches best '
            "(heatmap: where in the patch), how many training images it is its concept's best match for, its largest "
            "weight in the task head, and that patch's similarity. Untick <i>keep</i> to prune a prototype (a shortcut such "
            "as a text marker or a device), then <i>apply</i> to refit the task head without it.</div>"
        )
        self.children = [
            style_widget(),
            toolbar,
            self._f1,
            legend,
            self._concept,
            self._grid_box,
            widgets.HBox([export_button, load_button]),
            self._mask_text,
        ]
        self.add_class("csr-atlas-explorer")
        self._arrange()

    def _tile(self, k: int, m: int) -> widgets.VBox:
        entry = self._entries[k, m]
        image = widgets.Image(format="png", layout=widgets.Layout(width=f"{self.tile_size}px", height=f"{self.tile_size}px"))
        if entry is not None:
            image.value = render.encode_png(self._tile_rgba(k, m, entry))
        toggle = widgets.Checkbox(value=bool(self.model.prototype_mask[k, m]), description="keep", indent=False,
                                  tooltip="untick to prune this prototype")
        toggle.observe(lambda change, k=k, m=m: self._on_toggle(k, m, change["new"]), names="value")
        caption = widgets.HTML()
        self._toggles[k, m], self._captions[k, m] = toggle, caption
        tile = widgets.VBox([image, caption, toggle], layout=widgets.Layout(padding="2px", border="1px solid #ddd"))
        tile.add_class("csr-atlas-tile")
        self._tiles[k, m] = tile
        self._caption(k, m, entry)
        self._style_tile(k, m)  # pruned before the explorer opened: shown so
        return tile

    def _caption(self, k: int, m: int, entry=None, weights: np.ndarray | None = None) -> None:
        """The tile's text, in words: which prototype, how often it is used, its weight, its match."""
        if entry is None:
            entry = self._entries[k, m]
        weights = self.weights() if weights is None else weights
        lines = [f"<b>prototype {m}</b>{' &middot; <b>pruned</b>' if not bool(self.model.prototype_mask[k, m]) else ''}"]
        if self.usage is not None:
            count = int(self.usage[k, m])
            lines.append(f"best match in {count} training image{'s' if count != 1 else ''}")
        lines.append(f"head weight {weights[k, m]:.2f}")
        if entry is None:
            lines.append("<i>no training image shows its concept</i>")
        else:
            match = "" if entry.similarity is None else f"similarity {entry.similarity:.2f}"
            source = "" if entry.source_index is None else f"image #{entry.source_index}"
            lines.append(" &middot; ".join(part for part in (match, source) if part))
        self._captions[k, m].value = f'<div style="font-size:11px;line-height:1.3">{"<br>".join(lines)}</div>'

    def _tile_rgba(self, k: int, m: int, entry) -> np.ndarray:
        crop = render.crop_rgba(entry.crop)
        heat = entry.heatmap if entry.heatmap is not None else self._source_heat(k, m, entry)
        if heat is not None:
            overlay = render.colorize(render.normalise(heat, 1.0), self.colormap, opacity=1.0, fade=True)
            overlay = render.resize_rgba(overlay, crop.shape[:2])
            crop = render.composite(crop, overlay, opacity=0.5)
        return render.resize_rgba(crop, (self.tile_size, self.tile_size), smooth=False)

    def _source_heat(self, k: int, m: int, entry) -> np.ndarray | None:
        """Prototype (k, m)'s similarity map on its source image, in [0, 1], cut to the crop."""
        if self.dataset is None or entry.source_index is None or entry.location is None:
            return None
        index = entry.source_index
        if index not in self._source_maps:
            self._encode_sources()
        H, W = self._source_sizes[index]
        size = (self.model.config.image_size,) * 2
        # scaled by the map's maximum over the whole source image: the crop shows where, in
        # it, the prototype matches best
        pixels = render.normalise(render.upsample(self._source_maps[index][k, m].clamp(min=0).numpy(), self.model.grid, size))
        # The crop's location in source pixels -> model-input pixels (a scaling, geometry.py),
        # widened to whole pixels.
        x0, y0, x1, y1 = entry.location
        sx, sy = size[1] / W, size[0] / H
        top, left = int(np.floor(y0 * sy)), int(np.floor(x0 * sx))
        bottom, right = max(top + 1, int(np.ceil(y1 * sy))), max(left + 1, int(np.ceil(x1 * sx)))
        return pixels[max(top, 0) : bottom, max(left, 0) : right]

    def _source_indices(self) -> set[int]:
        return {e.source_index for e in self._entries.values() if e is not None and e.source_index is not None}

    def _keep_source(self, index: int, item, maps: torch.Tensor) -> None:
        self._source_maps[index] = maps.cpu()
        self._source_sizes[index] = tuple(read_image(item_fields(item)[0]).shape[-2:])

    def _encode_sources(self) -> None:
        """Similarity maps of the atlas source images not seen yet, encoded in batches."""
        wanted = sorted(self._source_indices() - set(self._source_maps))
        for start in range(0, len(wanted), self.batch_size):
            indices = wanted[start : start + self.batch_size]
            items = [self.dataset[i] for i in indices]
            encoding, _ = self._encode(items)
            for i, item, maps in zip(indices, items, encoding.similarity_maps):
                self._keep_source(i, item, maps)

    def _arrange(self) -> None:
        K, M = self.model.config.num_concepts, self.model.config.prototypes_per_concept
        weights = self.weights()
        for k in range(K):
            if self._sort.value == "usage" and self.usage is not None:
                order = sorted(range(M), key=lambda m: (-self.usage[k, m], m))
            elif self._sort.value == "weight":
                order = sorted(range(M), key=lambda m: (-weights[k, m], m))
            else:
                order = list(range(M))
            self._grids[k].children = [self._tiles[k, m] for m in order]

    def order(self, concept: str | int) -> list[int]:
        """Prototype indices of a concept in the order they are shown."""
        k = concept if isinstance(concept, int) else self.model.concept_index([concept])[0]
        M = self.model.config.prototypes_per_concept
        position = {id(self._tiles[k, m]): m for m in range(M)}
        return [position[id(tile)] for tile in self._grids[k].children]

    def _on_toggle(self, k: int, m: int, keep: bool) -> None:
        if bool(self.model.prototype_mask[k, m]) == keep:
            return
        with torch.no_grad():
            self.model.prototype_mask[k, m] = keep
        self._style_tile(k, m)
        self._caption(k, m)
        self._bump()

    def _style_tile(self, k: int, m: int) -> None:
        if bool(self.model.prototype_mask[k, m]):
            self._tiles[k, m].remove_class("csr-pruned")
        else:
            self._tiles[k, m].add_class("csr-pruned")

    def _sync_toggles(self) -> None:
        """Show the model's mask (the one truth: other widgets may have changed it)."""
        weights = self.weights()
        for (k, m), toggle in self._toggles.items():
            toggle.value = bool(self.model.prototype_mask[k, m])
            self._style_tile(k, m)
            self._caption(k, m, weights=weights)

    def _model_changed(self) -> None:
        """Another widget pruned or refitted this model: show it."""
        self._sync_toggles()
        if self._sort.value == "weight":
            self._arrange()

    def _refresh_weights(self) -> None:
        weights = self.weights()
        for k, m in self._tiles:
            self._caption(k, m, weights=weights)
        if self._sort.value == "weight":
            self._arrange()

    def _show_f1(self) -> None:
        label = "F1 on the refit data (no validation set given)" if self._validation_is_dataset else "validation macro F1"
        if self.f1_start is None:
            self._f1.value = "<i>no validation data: F1 not shown</i>"
            return
        text = f"{label}: at start {self.f1_start:.3f}"
        if self._f1_after is not None:
            text += f"; last apply: <b>{self._f1_before:.3f} &rarr; {self._f1_after:.3f}</b>"
        self._f1.value = text

    def _apply_clicked(self) -> None:
        try:
            self.apply()
        except Exception:  # shown in the status line; a widget callback has nowhere to raise to
            pass

    def _load_clicked(self) -> None:
        try:
            self.load_mask(json.loads(self._mask_text.value))  # text from the box: never a path
            self._status.value = "mask loaded"
        except (ValueError, KeyError, TypeError) as error:
            self._status.value = f'<span style="color:#D55E00">cannot load the mask: {error}</span>'

    def _bump(self) -> None:
        self.set_trait("revision", self.revision + 1)
        views.announce(self.model, source=self)


def _default_refit(model, dataset, progress=None) -> None:
    """Stage 3 again on the current masks (imported late: training is a heavier module).
    ``progress(fraction)`` follows feature caching and the epochs; tqdm stays off, so
    nothing prints into the notebook."""
    from ..training import refit_task_head

    refit_task_head(model, dataset, progress=False, on_progress=progress)


def _pooled(encoding: Encoding) -> Encoding:
    """Without boxes, ``reason`` needs only each similarity map's maximum: keep that,
    (B, K, M, 1, 1), instead of whole maps (similarity hooks then see 1 x 1 maps)."""
    return Encoding(
        encoding.similarity_maps.amax(dim=(-2, -1), keepdim=True),
        encoding.concept_maps.amax(dim=(-2, -1), keepdim=True),
        encoding.concept_logits,
        encoding.image_size,
    )


def _accepts(function: Callable, name: str) -> bool:
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)
