"""ConceptCSV: your own images, labels and concepts in a CSV, boxes in an optional second.

labels CSV: an image column (a path, relative to ``root``), a label column (a class name
or an integer index) and one 0/1 column per concept:

    image,label,nodule,effusion
    scans/a.png,tb,1,0

boxes CSV (optional): image, concept, x0, y0, x1, y1 in pixels of the stored image,
x1/y1 exclusive; every box's image must be in the labels CSV and its concept marked 1.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .records import AnnotatedImages, GroundTruthBox, Record, csv_line, read_csv, require_columns


class ConceptCSV(AnnotatedImages):
    """Images listed in a CSV with their label and concepts.

    Args:
        csv: the labels CSV.
        root: folder the image paths are relative to (default: the CSV's folder).
        concepts: concept columns, in vector order (default: every other column).
        classes: class names in label order (default: the sorted distinct names, or "0",
            "1", ... when the labels are integers).
        boxes: the boxes CSV, or None.
        image_size, channels: as for every loader (channels default: as stored).
        image_column, label_column: the column names.
    """

    def __init__(self, csv, root=None, *, concepts=None, classes=None, boxes=None, image_size: int | None = None,
                 channels: int | None = None, image_column: str = "image", label_column: str = "label"):
        csv = Path(csv)
        root = csv.parent if root is None else Path(root)
        frame = read_csv(csv)
        require_columns(frame, [image_column, label_column], csv)
        if concepts is None:
            concepts = [c for c in frame.columns if c not in (image_column, label_column)]
        require_columns(frame, list(concepts), csv)
        flags = frame[list(concepts)].to_numpy()
        bad = ~np.isin(flags, (0, 1))
        if bad.any():
            row, col = map(int, np.argwhere(bad)[0])
            where = f"{csv.name} line {csv_line(frame.index[row])}"
            raise ValueError(f"{where}: concept {concepts[col]!r} must be 0 or 1, got {np.asarray(flags[row, col]).tolist()!r}")
        classes, labels = _labels(frame, label_column, classes, csv)
        records, by_path = [], {}
        for row, (index, image) in enumerate(zip(frame.index, frame[image_column].astype(str))):
            where = f"{csv.name} line {csv_line(index)}"
            records.append(Record(Path(image).stem, root / image, flags[row].astype(np.float32), labels[row], [], where))
            by_path[image] = records[-1]
        if boxes is not None:
            _attach_boxes(Path(boxes), by_path, list(concepts))
        super().__init__(records, concepts, classes, image_size, channels)


def _labels(frame, column: str, classes, csv: Path) -> tuple[list[str], list[int]]:
    import pandas as pd

    values = frame[column]
    if values.isna().any():
        raise ValueError(f"{csv.name} line {csv_line(values.index[values.isna()][0])}: empty label")
    integers = pd.api.types.is_integer_dtype(values)
    if classes is None:
        classes = [str(i) for i in range(int(values.max()) + 1)] if integers else sorted(values.astype(str).unique())
    classes = list(classes)
    labels = []
    for index, value in values.items():
        if integers and 0 <= value < len(classes):
            labels.append(int(value))
        elif not integers and str(value) in classes:
            labels.append(classes.index(str(value)))
        else:
            raise ValueError(f"{csv.name} line {csv_line(index)}: label {value!r} is not one of {classes}")
    return classes, labels


def _attach_boxes(csv: Path, by_path: dict[str, Record], concepts: list[str]) -> None:
    frame = read_csv(csv)
    require_columns(frame, ["image", "concept", "x0", "y0", "x1", "y1"], csv)
    for index, row in zip(frame.index, frame.itertuples(index=False)):
        where = f"{csv.name} line {csv_line(index)}"
        record = by_path.get(str(row.image))
        if record is None:
            raise ValueError(f"{where}: image {row.image!r} is not in the labels CSV")
        if row.concept not in concepts:
            raise ValueError(f"{where}: unknown concept {row.concept!r}; concepts are {concepts}")
        if not record.concepts[concepts.index(row.concept)]:
            raise ValueError(f"{where}: a box of {row.concept!r} but {record.source} marks it absent")
        try:
            coords = [float(v) for v in (row.x0, row.y0, row.x1, row.y1)]
        except (TypeError, ValueError):
            raise ValueError(f"{where}: box coordinates are not numbers") from None
        record.boxes.append(GroundTruthBox(row.concept, *coords, source=where))
