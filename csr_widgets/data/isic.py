"""ISIC 2018 Task 2: dermoscopy images with one mask per attribute.

Layout (the official release):
    ISIC2018_Task1-2_<Split>_Input/ISIC_0000000.jpg
    ISIC2018_Task2_<Split>_GroundTruth[_v3]/ISIC_0000000_attribute_<attribute>.png
with <Split> in Training, Validation, Test. A mask is white where the attribute is seen;
an all-black mask means absent. Each present attribute gets one box: the bounding box of
all its mask pixels.

Task 2 has no diagnosis, so labels come from a CSV (``labels``), one row per image, either
Task-3 style (an ``image`` column and one 0/1 column per class: MEL, NV, ...) or with an
``image`` and a ``label`` (or ``diagnosis``) column of class names. The CSV decides which
images the dataset holds, in its order.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .pixels import read_image
from .records import AnnotatedImages, GroundTruthBox, Record, csv_line, read_csv, require_columns

ISIC_ATTRIBUTES = ("globules", "milia_like_cyst", "negative_network", "pigment_network", "streaks")
ISIC_SPLITS = {"train": "Training", "val": "Validation", "test": "Test"}


class ISIC2018(AnnotatedImages):
    """ISIC 2018 Task 2 from ``root``.

    Args:
        root: the folder holding the ISIC2018_* folders.
        split: "train", "val" or "test".
        labels: the label CSV; None looks for ISIC2018_Task3_<Split>_GroundTruth.csv in
            root (or in a folder of that name).
        image_size, channels: as for every loader (channels default 3, dermoscopy is colour).
        masks: also return "masks", (5, H, W) bool.
    """

    def __init__(self, root, split: str = "train", labels=None, image_size: int | None = None,
                 channels: int | None = 3, masks: bool = False):
        if split not in ISIC_SPLITS:
            raise ValueError(f"split must be one of {tuple(ISIC_SPLITS)}, got {split!r}")
        root, name = Path(root), ISIC_SPLITS[split]
        images_dir = root / f"ISIC2018_Task1-2_{name}_Input"
        truth_dirs = [root / f"ISIC2018_Task2_{name}_GroundTruth_v3", root / f"ISIC2018_Task2_{name}_GroundTruth"]
        truth_dir = next((d for d in truth_dirs if d.is_dir()), None)
        if truth_dir is None:
            raise FileNotFoundError(f"ISIC 2018 Task 2 masks not found: expected {truth_dirs[0]} or {truth_dirs[1]}")
        if labels is None:
            stem = f"ISIC2018_Task3_{name}_GroundTruth"
            candidates = [root / f"{stem}.csv", root / stem / f"{stem}.csv"]
            labels = next((c for c in candidates if c.is_file()), None)
            if labels is None:
                raise FileNotFoundError(f"no label CSV: expected {candidates[0]} or {candidates[1]}, or pass labels=")
        self.return_masks = masks
        records, classes = _records(Path(labels), images_dir, truth_dir)
        super().__init__(records, ISIC_ATTRIBUTES, classes, image_size, channels)

    def annotations(self, record: Record, image: torch.Tensor):
        """Reads the five masks: presence, one box per present attribute, masks."""
        height, width = image.shape[-2:]
        masks = torch.zeros((len(ISIC_ATTRIBUTES), height, width), dtype=torch.bool)
        boxes = []
        for k, (attribute, path) in enumerate(zip(ISIC_ATTRIBUTES, record.masks)):
            try:
                mask = read_image(path, channels=1)[0] >= 0.5
            except FileNotFoundError:
                raise FileNotFoundError(f"mask file not found: {path} (for {record.source})") from None
            if mask.shape != (height, width):
                raise ValueError(
                    f"mask {path} is {mask.shape[1]}x{mask.shape[0]} but its image {record.path} is {width}x{height}"
                )
            masks[k] = mask
            rows, cols = torch.nonzero(mask.any(dim=1)), torch.nonzero(mask.any(dim=0))
            if len(rows):
                x0, y0, x1, y1 = float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)
                boxes.append(GroundTruthBox(attribute, x0, y0, x1, y1, source=str(path)))
        concepts = masks.flatten(1).any(dim=1).numpy().astype(np.float32)
        return concepts, boxes, masks if self.return_masks else None


def _records(labels_csv: Path, images_dir: Path, truth_dir: Path) -> tuple[list[Record], list[str]]:
    frame = read_csv(labels_csv)
    require_columns(frame, ["image"], labels_csv)
    named = next((c for c in ("label", "diagnosis") if c in frame.columns), None)
    if named:
        classes = sorted(frame[named].astype(str).unique())
        labels = [classes.index(v) for v in frame[named].astype(str)]
    else:
        classes = [c for c in frame.columns if c != "image"]
        one_hot = frame[classes].to_numpy(float)
        bad = np.flatnonzero(~np.isclose(one_hot.sum(axis=1), 1.0) | ~np.isin(one_hot, (0.0, 1.0)).all(axis=1))
        if len(bad):
            where = f"{labels_csv.name} line {csv_line(frame.index[bad[0]])}"
            raise ValueError(f"{where}: a row needs exactly one class column at 1")
        labels = one_hot.argmax(axis=1).tolist()
    records = []
    for index, image_id, label in zip(frame.index, frame["image"].astype(str), labels):
        path = images_dir / f"{image_id}.jpg"
        if not path.is_file() and (images_dir / f"{image_id}.png").is_file():
            path = images_dir / f"{image_id}.png"
        masks = [truth_dir / f"{image_id}_attribute_{a}.png" for a in ISIC_ATTRIBUTES]
        unknown = np.zeros(len(ISIC_ATTRIBUTES), np.float32)  # read from the masks, per item
        where = f"{labels_csv.name} line {csv_line(index)}"
        records.append(Record(image_id, path, unknown, int(label), [], where, masks))
    return records, classes
