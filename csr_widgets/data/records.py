"""AnnotatedImages: the Dataset behind every real-data loader, one Record per image.

A loader's only job is to turn its format's files into Records; reading, checking,
resizing and the item format (docs/architecture.md#the-item-format) live here, once:

    {"image": FloatTensor (C, H, W) in [0, 1], "concepts": FloatTensor (K,) 0/1,
     "label": int (-1 when the format has none for this image),
     "boxes": [(concept, x0, y0, x1, y1)] floats in pixels of the returned image, x1/y1
              exclusive, "id": str}
    plus "masks" (K, H, W) bool for formats with masks (ISIC), when asked for.

Every record remembers where it came from (file and line), so that a missing file, an
unreadable image or a box outside its image is reported with both.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .pixels import read_image, resize_image, to_channels

# A box may overhang its image by this many pixels (annotation tools round); it is then
# clipped. Anything further out is an error.
BOX_TOLERANCE = 0.5


@dataclass
class GroundTruthBox:
    """A finding's box as an annotation file gives it, in the file image's pixels (x1/y1
    exclusive). Not ``csr_widgets.Box``, which is what a user draws to talk to the model."""

    concept: str
    x0: float
    y0: float
    x1: float
    y1: float
    source: str  # "train.csv line 12": where the box was read, for error messages


@dataclass
class Record:
    id: str
    path: Path
    concepts: np.ndarray  # (K,) float32 0/1
    label: int
    boxes: list[GroundTruthBox] = field(default_factory=list)
    source: str = ""  # where the image was listed
    masks: list[Path] | None = None  # one mask file per concept, for formats that have them


def csv_line(index: int) -> int:
    """The file line of a pandas row read with a header line: 1-based, header is line 1."""
    return int(index) + 2


def require_columns(frame, columns, csv_path) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{csv_path}: missing column(s) {missing}; found {list(frame.columns)}")


def read_csv(path):
    """pandas.read_csv with the file named in every failure."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CSV file not found: {path}")
    try:
        return pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot parse CSV {path}: {error}") from None


class AnnotatedImages(Dataset):
    """Records -> items. Subclasses fill ``records``, ``concepts`` and ``classes``.

    image_size: None keeps each image's size; an int resizes to a square (boxes are
        scaled with the image, separately along x and y).
    channels: None keeps the file's channels; 1 or 3 converts.
    """

    concepts: list[str]
    classes: list[str]

    def __init__(self, records: list[Record], concepts, classes, image_size: int | None = None, channels: int | None = None):
        if image_size is not None and (int(image_size) != image_size or image_size < 1):
            raise ValueError(f"image_size must be None or a positive integer, got {image_size!r}")
        if channels not in (None, 1, 3):
            raise ValueError(f"channels must be None, 1 or 3, got {channels!r}")
        self.records = records
        self.concepts = list(concepts)
        self.classes = list(classes)
        self.image_size = image_size
        self.channels = channels

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        image = self.read(record)
        concepts, boxes, masks = self.annotations(record, image)
        height, width = image.shape[-2:]
        boxes = [check_box(box, width, height, record) for box in boxes]
        item = {"image": image, "concepts": torch.as_tensor(concepts, dtype=torch.float32), "label": int(record.label)}
        if self.image_size is not None:
            size = self.image_size
            item["image"] = resize_image(image, size)
            # multiply first: whole-pixel boxes scale to exactly rounded floats
            boxes = [(c, x0 * size / width, y0 * size / height, x1 * size / width, y1 * size / height)
                     for c, x0, y0, x1, y1 in boxes]
            if masks is not None:
                masks = resize_image(masks, self.image_size, mode="nearest")
        item["boxes"] = boxes
        item["id"] = record.id
        if masks is not None:
            item["masks"] = masks
        return item

    def read(self, record: Record) -> torch.Tensor:
        """The record's image at its own size, (C, H, W) in [0, 1]."""
        where = f" (listed at {record.source})" if record.source else ""
        try:
            image = read_image(record.path)
        except FileNotFoundError:
            raise FileNotFoundError(f"image file not found: {record.path}{where}") from None
        except ValueError as error:
            raise ValueError(f"{error}{where}") from None
        return to_channels(image, self.channels)

    def annotations(self, record: Record, image: torch.Tensor) -> tuple[np.ndarray, list[GroundTruthBox], torch.Tensor | None]:
        """(concepts (K,), boxes, masks (K, H, W) bool or None) of a record; a hook for
        formats that read their annotations along with the image."""
        return record.concepts, record.boxes, None


def check_box(box: GroundTruthBox, width: int, height: int, record: Record) -> tuple:
    """A GroundTruthBox inside a (width, height) image -> (concept, x0, y0, x1, y1), or a ValueError
    naming the image, the annotation's line and both sizes."""
    coords = np.array([box.x0, box.y0, box.x1, box.y1], float)
    limits = np.array([width, height, width, height], float)
    where = f"box {box.concept!r} {tuple(coords.tolist())} at {box.source} for image {record.path}"
    if not np.isfinite(coords).all() or box.x1 <= box.x0 or box.y1 <= box.y0:
        raise ValueError(f"{where}: not a box (need finite x0 < x1 and y0 < y1)")
    if (coords < -BOX_TOLERANCE).any() or (coords > limits + BOX_TOLERANCE).any():
        raise ValueError(f"{where}: outside the image of {width}x{height} pixels")
    x0, y0, x1, y1 = np.clip(coords, 0.0, limits).tolist()
    return (box.concept, x0, y0, x1, y1)
