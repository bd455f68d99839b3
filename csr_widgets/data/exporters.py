"""Writers of a SyntheticCXR in the real datasets' on-disk formats.

They exist so that the real loaders are tested end to end on files whose truth is known,
and so that a user can rehearse a pipeline before the real data arrives. Each writer
renders the dataset's scenes at the export size (the same scenes, see synthetic.py) and
returns the path of the main annotation file.

Concept mappings (synthetic -> format):
- TBX11K: only images labelled tb carry boxes (as in TBX11K); cavity and consolidation
  are ActiveTuberculosis, a nodule (a healed granuloma) is ObsoletePulmonaryTuberculosis;
  effusion, pneumothorax and cardiomegaly are not TB signs and get no box.
- VinDr-CXR: nodule -> Nodule/Mass, consolidation -> Consolidation, effusion -> Pleural
  effusion, pneumothorax -> Pneumothorax, cardiomegaly -> Cardiomegaly, cavity -> Lung
  cavity (PhysioNet layout) or Other lesion (Kaggle's 14 findings have no cavity).
  Global labels (PhysioNet): tb -> Tuberculosis, sick -> Other diseases, healthy -> No finding.
- ISIC 2018: the first five concepts become the five attribute masks in alphabetical
  order (nodule -> globules, ..., pneumothorax -> streaks): a format test, not anatomy.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .isic import ISIC_ATTRIBUTES, ISIC_SPLITS
from .vindr import KAGGLE_FINDINGS, PHYSIONET_FINDINGS, PHYSIONET_GLOBAL

TBX11K_CATEGORIES = ("ActiveTuberculosis", "ObsoletePulmonaryTuberculosis", "PulmonaryTuberculosis")
TBX11K_FROM_SYNTHETIC = {
    "cavity": "ActiveTuberculosis",
    "consolidation": "ActiveTuberculosis",
    "nodule": "ObsoletePulmonaryTuberculosis",
}
TBX11K_FOLDERS = {"healthy": ("health", "h"), "sick": ("sick", "s"), "tb": ("tb", "tb")}
VINDR_FROM_SYNTHETIC = {
    "nodule": "Nodule/Mass",
    "consolidation": "Consolidation",
    "cavity": "Lung cavity",
    "effusion": "Pleural effusion",
    "pneumothorax": "Pneumothorax",
    "cardiomegaly": "Cardiomegaly",
}
VINDR_GLOBAL_FROM_SYNTHETIC = {"tb": "Tuberculosis", "sick": "Other diseases", "healthy": "No finding"}


def write_tbx11k(dataset, root, split: str = "train", image_size: int = 512) -> Path:
    """imgs/<health|sick|tb>/<h|s|tb>_<split>_<index>.png (8-bit grey), COCO JSON
    annotations/json/TBX11K_<split>.json with bbox [x, y, w, h], lists/TBX11K_<split>.txt."""
    root = Path(root)
    source = dataset.replace(image_size=image_size, channels=1, masks=False)
    categories = [{"id": i + 1, "name": name, "supercategory": "Tuberculosis"} for i, name in enumerate(TBX11K_CATEGORIES)]
    images, annotations, listed = [], [], []
    for index in range(len(source)):
        item = source[index]
        folder, prefix = TBX11K_FOLDERS[source.classes[item["label"]]]
        file_name = f"{folder}/{prefix}_{split}_{index:05d}.png"
        _write_png(root / "imgs" / file_name, item["image"][0].numpy(), bits=8)
        images.append({"id": index + 1, "file_name": file_name, "width": image_size, "height": image_size})
        listed.append(file_name)
        if folder != "tb":
            continue
        for concept, x0, y0, x1, y1 in item["boxes"]:
            if concept in TBX11K_FROM_SYNTHETIC:
                annotations.append({
                    "id": len(annotations) + 1,
                    "image_id": index + 1,
                    "category_id": TBX11K_CATEGORIES.index(TBX11K_FROM_SYNTHETIC[concept]) + 1,
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": (x1 - x0) * (y1 - y0),
                    "iscrowd": 0,
                    "segmentation": [],
                })
    json_path = root / "annotations" / "json" / f"TBX11K_{split}.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    (root / "lists").mkdir(parents=True, exist_ok=True)
    (root / "lists" / f"TBX11K_{split}.txt").write_text("".join(f"{name}\n" for name in listed))
    return json_path


def write_vindr(
    dataset,
    root,
    split: str = "train",
    format: str = "dicom",
    readers: int = 3,
    layout: str = "kaggle",
    image_size: int = 512,
    miss_rate: float = 0.2,
    jitter: float = 0.03,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 12,
) -> Path:
    """VinDr-CXR with ``readers`` simulated radiologists per image.

    Each reader draws every true box, except that it misses each one with probability
    ``miss_rate`` and moves each corner by Gaussian noise of ``jitter`` times the box's
    larger side; a reader who draws nothing writes a "No finding" row without a box.
    layout "kaggle": <split>.csv (image_id, class_name, class_id, rad_id, x_min, y_min,
    x_max, y_max) and <split>/<image_id>.dicom; "physionet": annotations/annotations_<split>.csv,
    annotations/image_labels_<split>.csv (one row per reader, 0/1 per finding and global
    label) and <split>/<image_id>.dicom. format "png" writes 16-bit PNGs instead.
    photometric: "MONOCHROME2", "MONOCHROME1" (stored inverted) or "mixed" (alternating).
    Returns the box CSV.
    """
    import pandas as pd

    if format not in ("dicom", "png"):
        raise ValueError(f"format must be 'dicom' or 'png', got {format!r}")
    if layout not in ("kaggle", "physionet"):
        raise ValueError(f"layout must be 'kaggle' or 'physionet', got {layout!r}")
    if photometric not in ("MONOCHROME1", "MONOCHROME2", "mixed"):
        raise ValueError(f"photometric must be MONOCHROME1, MONOCHROME2 or mixed, got {photometric!r}")
    if not 8 < bits_stored <= 16:
        raise ValueError(f"bits_stored must be in 9..16, got {bits_stored}")
    if readers < 1:
        raise ValueError(f"readers must be >= 1, got {readers}")
    root = Path(root)
    source = dataset.replace(image_size=image_size, channels=1, masks=False)
    names = dict(VINDR_FROM_SYNTHETIC, **({"cavity": "Other lesion"} if layout == "kaggle" else {}))
    rad_ids = [f"R{i + 1}" for i in range(max(readers, 17))]
    box_rows, label_rows = [], []
    for index in range(len(source)):
        item = source[index]
        image_id = f"{split}_{source.seed}_{index:05d}"
        rng = source.random_stream(index, 2)
        pixels = item["image"][0].numpy()
        if format == "dicom":
            mono1 = photometric == "MONOCHROME1" or (photometric == "mixed" and index % 2 == 1)
            _write_dicom(root / split / f"{image_id}.dicom", pixels, image_id, bits_stored, mono1)
        else:
            _write_png(root / split / f"{image_id}.png", pixels, bits=16)
        for rad_id in rng.choice(rad_ids, size=readers, replace=False):
            drawn = []
            for concept, x0, y0, x1, y1 in item["boxes"]:
                missed, noise = rng.random() < miss_rate, rng.normal(0.0, jitter, 4) * max(x1 - x0, y1 - y0)
                if missed:
                    continue
                x0, y0, x1, y1 = np.clip(np.array([x0, y0, x1, y1]) + noise, 0, image_size).round(1).tolist()
                if x1 > x0 and y1 > y0:
                    drawn.append((names[concept], x0, y0, x1, y1))
            for name, x0, y0, x1, y1 in drawn or [("No finding", np.nan, np.nan, np.nan, np.nan)]:
                box_rows.append(dict(image_id=image_id, class_name=name, rad_id=rad_id, x_min=x0, y_min=y0, x_max=x1, y_max=y1))
            label_rows.append(_reader_labels(image_id, rad_id, {d[0] for d in drawn}, source.classes[item["label"]]))
    corners = ["x_min", "y_min", "x_max", "y_max"]
    boxes = pd.DataFrame(box_rows, columns=["image_id", "class_name", "rad_id", *corners])
    if layout == "kaggle":
        ids = {name: i for i, name in enumerate(KAGGLE_FINDINGS)} | {"No finding": len(KAGGLE_FINDINGS)}
        boxes["class_id"] = boxes["class_name"].map(ids)
        csv_path = root / f"{split}.csv"
        boxes[["image_id", "class_name", "class_id", "rad_id", *corners]].to_csv(csv_path, index=False)
        return csv_path
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    csv_path = root / "annotations" / f"annotations_{split}.csv"
    boxes[["image_id", "rad_id", "class_name", *corners]].to_csv(csv_path, index=False)
    pd.DataFrame(label_rows).to_csv(root / "annotations" / f"image_labels_{split}.csv", index=False)
    return csv_path


def _reader_labels(image_id: str, rad_id: str, findings: set[str], label: str) -> dict:
    row = {"image_id": image_id, "rad_ID": rad_id}
    row.update({name: int(name in findings) for name in PHYSIONET_FINDINGS})
    row.update({name: int(name == VINDR_GLOBAL_FROM_SYNTHETIC[label]) for name in PHYSIONET_GLOBAL})
    return row


def write_isic(dataset, root, split: str = "train", image_size: int = 256) -> Path:
    """ISIC2018_Task1-2_<Split>_Input/ISIC_<id>.jpg (RGB), ISIC2018_Task2_<Split>_GroundTruth[_v3]/
    ISIC_<id>_attribute_<name>.png (0/255, all black when absent), and a Task-3 style
    one-hot label CSV ISIC2018_Task3_<Split>_GroundTruth.csv (image + one column per class)."""
    from PIL import Image

    root = Path(root)
    name = ISIC_SPLITS[split]
    source = dataset.replace(image_size=image_size, channels=1, masks=True)
    images_dir = root / f"ISIC2018_Task1-2_{name}_Input"
    truth_dir = root / f"ISIC2018_Task2_{name}_GroundTruth{'_v3' if split == 'train' else ''}"
    images_dir.mkdir(parents=True, exist_ok=True)
    truth_dir.mkdir(parents=True, exist_ok=True)
    lines = ["image," + ",".join(source.classes)]
    for index in range(len(source)):
        item = source[index]
        image_id = f"ISIC_{list(ISIC_SPLITS).index(split)}{index:06d}"
        grey = (item["image"][0].numpy() * 255).round().astype(np.uint8)
        Image.fromarray(np.stack([grey] * 3, axis=-1)).save(images_dir / f"{image_id}.jpg", quality=95)
        for attribute, mask in zip(ISIC_ATTRIBUTES, item["masks"]):
            Image.fromarray(mask.numpy().astype(np.uint8) * 255).save(truth_dir / f"{image_id}_attribute_{attribute}.png")
        one_hot = ["1.0" if k == item["label"] else "0.0" for k in range(len(source.classes))]
        lines.append(",".join([image_id, *one_hot]))
    csv_path = root / f"ISIC2018_Task3_{name}_GroundTruth.csv"
    csv_path.write_text("\n".join(lines) + "\n")
    return csv_path


def write_concept_csv(dataset, root, image_size: int | None = None) -> Path:
    """images/<id>.png, labels.csv (image, label, one 0/1 column per concept) and
    boxes.csv (image, concept, x0, y0, x1, y1): the layout ConceptCSV reads."""
    root = Path(root)
    source = dataset if image_size is None else dataset.replace(image_size=image_size)
    label_lines = [",".join(["image", "label", *source.concepts])]
    box_lines = ["image,concept,x0,y0,x1,y1"]
    for index in range(len(source)):
        item = source[index]
        relative = f"images/{item['id']}.png"
        _write_png(root / relative, item["image"][0].numpy(), bits=8)
        flags = [str(int(v)) for v in item["concepts"].tolist()]
        label_lines.append(",".join([relative, source.classes[item["label"]], *flags]))
        box_lines += [f"{relative},{c},{x0:g},{y0:g},{x1:g},{y1:g}" for c, x0, y0, x1, y1 in item["boxes"]]
    (root / "labels.csv").write_text("\n".join(label_lines) + "\n")
    (root / "boxes.csv").write_text("\n".join(box_lines) + "\n")
    return root / "labels.csv"


def _write_png(path: Path, pixels: np.ndarray, bits: int) -> None:
    """(H, W) float in [0, 1] -> an 8- or 16-bit greyscale PNG."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    top = 2**bits - 1
    values = np.round(np.clip(pixels, 0, 1) * top).astype(np.uint8 if bits == 8 else np.uint16)
    Image.fromarray(values).save(path)


def _write_dicom(path: Path, pixels: np.ndarray, image_id: str, bits_stored: int, monochrome1: bool) -> None:
    """(H, W) float in [0, 1] -> an uncompressed DX DICOM, 16 bits allocated, ``bits_stored``
    used, with a window that maps the stored range back onto [0, 1] exactly."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    path.parent.mkdir(parents=True, exist_ok=True)
    top = 2**bits_stored - 1
    values = np.round(np.clip(pixels, 0, 1) * top).astype(np.uint16)
    if monochrome1:
        values = top - values
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray for presentation
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[image_id])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.PatientID = image_id
    ds.Rows, ds.Columns = values.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits_stored, bits_stored - 1, 0
    # DICOM's linear window: (x - (c - 0.5)) / (w - 1) + 0.5 is x / top for these c and w
    ds.WindowCenter, ds.WindowWidth = 2 ** (bits_stored - 1), 2**bits_stored
    ds.PixelData = values.astype("<u2").tobytes()
    try:
        ds.save_as(path, enforce_file_format=True)
    except TypeError:  # pydicom < 3
        ds.save_as(path, write_like_original=False)
