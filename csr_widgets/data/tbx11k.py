"""TBX11K: 512-px chest X-rays in class folders, TB boxes in COCO JSON.

Layout (the official release):
    imgs/health/h0001.png, imgs/sick/s0001.png, imgs/tb/tb0001.png, imgs/test/...
    annotations/json/TBX11K_train.json, TBX11K_val.json (also all_train.json, ...)
The JSON's ``images[].file_name`` is relative to imgs/, ``annotations[].bbox`` is
[x, y, w, h] in pixels, ``categories`` are ActiveTuberculosis, ObsoletePulmonaryTuberculosis
(and PulmonaryTuberculosis, "uncertain"). Concepts are the categories in id order; the
label comes from the folder: health -> healthy, sick -> sick, tb -> tb, any other folder
(test, extra) -> -1 (unknown).
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from .records import AnnotatedImages, GroundTruthBox, Record, check_box

TBX11K_CLASSES = ("healthy", "sick", "tb")
_FOLDER_CLASS = {"health": 0, "sick": 1, "tb": 2}


class TBX11K(AnnotatedImages):
    """TBX11K from ``root`` (the folder holding imgs/ and annotations/).

    Args:
        split: "train", "val", "trainval" or "test": reads ``<annotations>_<split>.json``.
        annotations: "TBX11K" (the 8,400-image set) or "all" (with the extra datasets).
        image_size: None (512 native) or the side of the square the images are resized to.
        channels: 1 (default; the PNGs are grey, possibly stored as RGB) or 3.
    """

    def __init__(self, root, split: str = "train", image_size: int | None = None, channels: int | None = 1,
                 annotations: str = "TBX11K"):
        root = Path(root)
        json_path = root / "annotations" / "json" / f"{annotations}_{split}.json"
        if not json_path.is_file():
            raise FileNotFoundError(f"TBX11K annotations not found: {json_path}")
        try:
            coco = json.loads(json_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"cannot parse {json_path}: {error}") from None
        missing = [key for key in ("images", "categories") if key not in coco]
        if missing:
            raise ValueError(f"{json_path}: missing key(s) {missing}")
        categories = sorted(coco["categories"], key=lambda c: c["id"])
        concepts = [c["name"] for c in categories]
        names = {c["id"]: c["name"] for c in categories}
        boxes = defaultdict(list)
        for ann in coco.get("annotations", []):
            where = f"{json_path.name} annotation id {ann.get('id')}"
            if ann.get("category_id") not in names:
                raise ValueError(f"{where}: unknown category_id {ann.get('category_id')!r}")
            bbox = ann.get("bbox")
            if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
                raise ValueError(f"{where}: bbox must be [x, y, w, h], got {bbox!r}")
            x, y, w, h = map(float, bbox)
            boxes[ann["image_id"]].append(GroundTruthBox(names[ann["category_id"]], x, y, x + w, y + h, source=where))
        records = []
        for entry in coco["images"]:
            file_name = str(entry["file_name"])
            path = root / "imgs" / file_name
            found = boxes.get(entry["id"], [])
            flags = np.array([any(b.concept == name for b in found) for name in concepts], np.float32)
            label = _FOLDER_CLASS.get(Path(file_name).parts[0], -1) if len(Path(file_name).parts) > 1 else -1
            record = Record(Path(file_name).stem, path, flags, label, found, f"{json_path.name} image id {entry['id']}")
            if "width" in entry and "height" in entry:  # the JSON knows the size: check early
                for box in found:
                    check_box(box, int(entry["width"]), int(entry["height"]), record)
            records.append(record)
        super().__init__(records, concepts, TBX11K_CLASSES, image_size, channels)
