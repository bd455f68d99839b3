"""VinDr-CXR: DICOM radiographs read by several radiologists each.

Two layouts, detected from the files present:
- Kaggle (VinBigData challenge): ``<split>.csv`` with image_id, class_name, class_id,
  rad_id, x_min, y_min, x_max, y_max (one row per box; a reader who found nothing writes
  one "No finding" row without a box) and ``<split>/<image_id>.dicom``. Concepts: the 14
  findings. Classes: ["No finding", "Finding"] (Finding when any concept is present).
- PhysioNet (v1.0.0): ``annotations/annotations_<split>.csv`` (image_id, rad_id,
  class_name, boxes) and ``annotations/image_labels_<split>.csv`` (one row per reader, a
  0/1 column per local finding and per global label). Concepts: the local finding
  columns; classes: the global label columns (COPD, Lung tumor, Pneumonia, Tuberculosis,
  Other diseases, No finding). The label is the global class most readers ticked (ties
  go to the earlier column, "No finding" is last).

Presence rule (``presence``): a finding is present when at least this many of the
image's readers reported it: "any" (1), "majority" (more than half the image's readers)
or an int. Boxes: every reader's box of every present finding (duplicates kept, one per
reader); boxes of absent findings are dropped. Coordinates are pixels of the stored
image, x_max/y_max exclusive.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from .records import AnnotatedImages, GroundTruthBox, Record, csv_line, read_csv, require_columns

KAGGLE_FINDINGS = (
    "Aortic enlargement", "Atelectasis", "Calcification", "Cardiomegaly", "Consolidation", "ILD",
    "Infiltration", "Lung Opacity", "Nodule/Mass", "Other lesion", "Pleural effusion",
    "Pleural thickening", "Pneumothorax", "Pulmonary fibrosis",
)
PHYSIONET_FINDINGS = (
    "Aortic enlargement", "Atelectasis", "Calcification", "Cardiomegaly", "Clavicle fracture",
    "Consolidation", "Edema", "Emphysema", "Enlarged PA", "ILD", "Infiltration", "Lung Opacity",
    "Lung cavity", "Lung cyst", "Mediastinal shift", "Nodule/Mass", "Pleural effusion",
    "Pleural thickening", "Pneumothorax", "Pulmonary fibrosis", "Rib fracture", "Other lesion",
)
PHYSIONET_GLOBAL = ("COPD", "Lung tumor", "Pneumonia", "Tuberculosis", "Other diseases", "No finding")
NO_FINDING = "No finding"
_BOX_COLUMNS = ["x_min", "y_min", "x_max", "y_max"]
_IMAGE_SUFFIXES = (".dicom", ".dcm", ".png", ".jpg", ".jpeg")


def presence_threshold(presence, readers: int) -> int:
    """How many of ``readers`` must report a finding for it to count as present."""
    if presence == "any":
        return 1
    if presence == "majority":
        return readers // 2 + 1
    if isinstance(presence, (int, np.integer)) and not isinstance(presence, bool) and presence >= 1:
        return int(presence)
    raise ValueError(f"presence must be 'any', 'majority' or a positive int, got {presence!r}")


class VinDrCXR(AnnotatedImages):
    """VinDr-CXR from ``root`` (either layout, see the module docstring).

    Args:
        root: the dataset folder.
        split: "train" or "test" (the file names carry it).
        presence: "any", "majority" or an int: the presence rule.
        image_size: None (native) or the side of the square the images are resized to.
        channels: 1 (default) or 3.
        layout: None (detect), "kaggle" or "physionet".
    """

    def __init__(self, root, split: str = "train", presence="any", image_size: int | None = None,
                 channels: int | None = 1, layout: str | None = None):
        root = Path(root)
        presence_threshold(presence, 3)  # validates before any file is read
        kaggle_csv = root / f"{split}.csv"
        physionet_csv = root / "annotations" / f"annotations_{split}.csv"
        if layout is None:
            layout = "physionet" if physionet_csv.is_file() else "kaggle" if kaggle_csv.is_file() else None
            if layout is None:
                raise FileNotFoundError(f"no VinDr-CXR annotations in {root}: expected {kaggle_csv} or {physionet_csv}")
        if layout not in ("kaggle", "physionet"):
            raise ValueError(f"layout must be None, 'kaggle' or 'physionet', got {layout!r}")
        self.presence = presence
        self.layout = layout
        images = _index_images(root / split)
        if layout == "kaggle":
            records, concepts, classes = _kaggle_records(kaggle_csv, images, root / split, presence)
        else:
            labels_csv = root / "annotations" / f"image_labels_{split}.csv"
            records, concepts, classes = _physionet_records(physionet_csv, labels_csv, images, root / split, presence)
        super().__init__(records, concepts, classes, image_size, channels)


def _index_images(folder: Path) -> dict[str, Path]:
    """image_id -> file, by one directory listing (VinDr has 15,000 files per split)."""
    if not folder.is_dir():
        return {}
    return {p.stem: p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES}


def _read_boxes(csv_path: Path, frame, concepts) -> dict[str, list[tuple[str, str, Box]]]:
    """image_id -> [(rad_id, class_name, GroundTruthBox)] for the box rows; checks class names and coordinates."""
    boxes = defaultdict(list)
    for index, row in zip(frame.index, frame.itertuples(index=False)):
        where = f"{csv_path.name} line {csv_line(index)}"
        name = str(row.class_name)
        if name == NO_FINDING:
            continue
        if name not in concepts:
            raise ValueError(f"{where}: unknown class_name {name!r} (image_id {row.image_id})")
        coords = [getattr(row, c) for c in _BOX_COLUMNS]
        try:
            coords = [float(c) for c in coords]
        except (TypeError, ValueError):
            raise ValueError(f"{where}: box coordinates {coords} are not numbers (image_id {row.image_id})") from None
        if not np.isfinite(coords).all():
            raise ValueError(f"{where}: finding {name!r} without a box (image_id {row.image_id})")
        boxes[str(row.image_id)].append((str(row.rad_id), name, GroundTruthBox(name, *coords, source=where)))
    return boxes


def _kaggle_records(csv_path: Path, images: dict, folder: Path, presence):
    frame = read_csv(csv_path)
    require_columns(frame, ["image_id", "class_name", "rad_id", *_BOX_COLUMNS], csv_path)
    concepts = list(KAGGLE_FINDINGS)
    boxes = _read_boxes(csv_path, frame, concepts)
    readers = frame.groupby("image_id", sort=False)["rad_id"].nunique()
    first_line = {str(v): csv_line(i) for i, v in frame["image_id"].drop_duplicates().items()}
    records = []
    for image_id, n_readers in readers.items():
        image_id = str(image_id)
        needed = presence_threshold(presence, int(n_readers))
        votes = defaultdict(set)
        for rad_id, name, _ in boxes[image_id]:
            votes[name].add(rad_id)
        present = {name for name, rads in votes.items() if len(rads) >= needed}
        flags = np.array([name in present for name in concepts], np.float32)
        kept = [box for _, name, box in boxes[image_id] if name in present]
        path = images.get(image_id, folder / f"{image_id}.dicom")
        records.append(Record(image_id, path, flags, int(flags.any()), kept, f"{csv_path.name} line {first_line[image_id]}"))
    return records, concepts, [NO_FINDING, "Finding"]


def _physionet_records(csv_path: Path, labels_csv: Path, images: dict, folder: Path, presence):
    labels = read_csv(labels_csv).rename(columns={"Other disease": "Other diseases", "rad_ID": "rad_id"})
    require_columns(labels, ["image_id", "rad_id"], labels_csv)
    columns = [c for c in labels.columns if c not in ("image_id", "rad_id")]
    concepts = [c for c in columns if c not in PHYSIONET_GLOBAL]
    classes = [c for c in columns if c in PHYSIONET_GLOBAL]
    if not classes:
        raise ValueError(f"{labels_csv}: no global label column; expected some of {list(PHYSIONET_GLOBAL)}")
    values = labels[columns].fillna(0).to_numpy()
    bad = ~np.isin(values, (0, 1))
    if bad.any():
        row, col = map(int, np.argwhere(bad)[0])
        where = f"{labels_csv.name} line {csv_line(labels.index[row])}"
        raise ValueError(f"{where}: column {columns[col]!r} must be 0 or 1, got {np.asarray(values[row, col]).tolist()!r}")
    frame = read_csv(csv_path)
    require_columns(frame, ["image_id", "rad_id", "class_name", *_BOX_COLUMNS], csv_path)
    boxes = _read_boxes(csv_path, frame, concepts)
    votes = labels.groupby("image_id", sort=False)[columns].sum()
    readers = labels.groupby("image_id", sort=False)["rad_id"].size()
    first_line = {str(v): csv_line(i) for i, v in labels["image_id"].drop_duplicates().items()}
    records = []
    for image_id, row in votes.iterrows():
        image_id = str(image_id)
        needed = presence_threshold(presence, int(readers[image_id]))
        flags = (row[concepts].to_numpy(float) >= needed).astype(np.float32)
        present = {name for name, flag in zip(concepts, flags) if flag}
        global_votes = row[classes].to_numpy(float)
        label = int(np.argmax(global_votes)) if global_votes.max() > 0 else -1
        kept = [box for _, name, box in boxes.get(image_id, []) if name in present]
        path = images.get(image_id, folder / f"{image_id}.dicom")
        records.append(Record(image_id, path, flags, label, kept, f"{labels_csv.name} line {first_line[image_id]}"))
    return records, concepts, classes
