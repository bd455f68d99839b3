"""Prepared images: a source decoded once, at the training size, for training to read fast.

Decoding is where real data loses its time: a VinDr-CXR DICOM is ~3000 x 3000 12-bit
pixels, read, windowed, inverted when MONOCHROME1 and resized on every epoch.
``prepare`` does it once (in DataLoader workers) and writes, per role (train, val, test):

    CACHE/prepared.json         {"format": "csr_widgets.prepared/1", "source": "vindr:/data/vindr",
                                 "image_size": 512, "channels": 1, "concepts": [...], "classes": [...],
                                 "roles": {"train": {"images": 13523, "shard_size": 512}, ...}}
    CACHE/<role>.json           {"ids": [...], "labels": [...], "concepts": [[0, 1, ...], ...],
                                 "boxes": [[[concept, x0, y0, x1, y1], ...], ...]}  (pixels of the prepared size)
    CACHE/<role>-00000.npy      uint16 (shard_size, C, S, S): brightness in [0, 1] times 65535

The pixels are the loaders' own output (windowing, MONOCHROME1, resizing: data/pixels.py),
kept at 16 bits, so a prepared image differs from a decoded one by at most 1/131070. The
shards are plain .npy (no pickle: ``np.load(allow_pickle=False)``) opened memory-mapped,
so each DataLoader worker reads only the images it is asked for. ``--data prepared:CACHE``
reads them back with the item format of every dataset (docs/architecture.md#the-item-format);
ISIC's masks are not kept (training and evaluation use the boxes).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from .._batching import loader
from .pixels import resize_image, to_channels

FORMAT = "csr_widgets.prepared/1"
MANIFEST = "prepared.json"
SHARD_BYTES = 2**28  # ~256 MB of pixels per shard file
_TOP = 65535.0


class PreparedImages(Dataset):
    """One role of a prepared cache, as a dataset (``--data prepared:CACHE``).

    image_size / channels: None keeps the prepared ones; another size is resized to
    (boxes with it), other channels converted.
    """

    def __init__(self, cache, role: str = "train", image_size: int | None = None, channels: int | None = None):
        self.cache = Path(cache)
        manifest = self.manifest(self.cache)
        if role not in manifest["roles"]:
            raise FileNotFoundError(f"{self.cache} holds no {role!r} images (prepared: {sorted(manifest['roles'])}).")
        self.role, self.info = role, manifest["roles"][role]
        self.concepts, self.classes = list(manifest["concepts"]), list(manifest["classes"])
        self.prepared_size, self.image_size, self.channels = manifest["image_size"], image_size, channels
        annotations = json.loads((self.cache / f"{role}.json").read_text())
        self.ids, self.labels, self.concept_flags, self.boxes = (annotations[k] for k in ("ids", "labels", "concepts", "boxes"))
        self._shards: dict[int, np.ndarray] = {}  # opened lazily, per process (DataLoader workers)

    @staticmethod
    def manifest(cache) -> dict:
        """The cache's prepared.json, or an error that says how to make one."""
        path = Path(cache) / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"{cache} is not a prepared cache (no {MANIFEST}); write one with "
                                    "`csr-widgets prepare --data SOURCE --out CACHE --image-size SIZE`.")
        manifest = json.loads(path.read_text())
        if manifest.get("format") != FORMAT:
            raise ValueError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}; prepare the cache again.")
        return manifest

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} prepared images")
        shard, row = divmod(index, self.info["shard_size"])
        if shard not in self._shards:
            self._shards[shard] = np.load(self.cache / f"{self.role}-{shard:05d}.npy", mmap_mode="r", allow_pickle=False)
        image = to_channels(torch.from_numpy(self._shards[shard][row].astype(np.float32) / _TOP), self.channels)
        boxes = [tuple(box) for box in self.boxes[index]]
        if self.image_size is not None and self.image_size != self.prepared_size:
            scale = self.image_size / self.prepared_size
            image = resize_image(image, self.image_size)
            boxes = [(c, x0 * scale, y0 * scale, x1 * scale, y1 * scale) for c, x0, y0, x1, y1 in boxes]
        return {"image": image, "concepts": torch.tensor(self.concept_flags[index], dtype=torch.float32),
                "label": int(self.labels[index]), "boxes": boxes, "id": self.ids[index]}


def prepare(source, out, image_size: int, channels: int | None = None, roles=("train", "val", "test"),
            num_workers: int = 0, batch_size: int = 16, progress: bool = True, options: dict | None = None) -> Path:
    """Decode every role of ``source`` (a ``sources.DataSource``) once, at ``image_size``,
    into the cache folder ``out``; returns the manifest's path. A role the source lacks
    (e.g. TBX11K without a val JSON) is skipped, and named in the manifest's "skipped".

    channels: None takes the source's; num_workers: DataLoader workers decoding in
    parallel; options: role -> the loader's keywords (e.g. ``{"train": {"presence":
    "majority"}, ...}`` for VinDr; a synthetic source needs its SyntheticCXR keywords).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    channels = source.channels if channels is None else channels
    manifest = {"format": FORMAT, "source": str(source), "image_size": image_size, "channels": channels,
                "roles": {}, "skipped": {}}
    for role in roles:
        try:
            dataset = source.dataset(role, image_size=image_size, channels=channels, **(options or {}).get(role, {}))
        except FileNotFoundError as missing:
            manifest["skipped"][role] = str(missing)
            continue
        manifest.update(concepts=list(dataset.concepts), classes=list(dataset.classes))
        manifest["roles"][role] = _write_role(dataset, out, role, image_size, channels, num_workers, batch_size, progress)
    if not manifest["roles"]:
        raise FileNotFoundError(f"{source} has none of the roles {list(roles)}: {manifest['skipped']}")
    path = out / MANIFEST
    path.write_text(json.dumps(manifest, indent=1))
    return path


def _write_role(dataset, out: Path, role: str, size: int, channels: int, num_workers: int, batch_size: int, progress: bool) -> dict:
    per_shard = max(1, SHARD_BYTES // (2 * channels * size * size))
    annotations = {"ids": [], "labels": [], "concepts": [], "boxes": []}
    pending, shard = [], 0
    batches = loader(dataset, batch_size, num_workers=num_workers)
    for batch in tqdm(batches, desc=f"preparing {role}", disable=not progress):
        pixels = np.round(batch["image"].clamp(0, 1).numpy() * _TOP).astype(np.uint16)
        pending.extend(pixels)
        annotations["ids"] += [str(i) for i in batch["id"]]
        annotations["labels"] += batch["label"].tolist()
        annotations["concepts"] += batch["concepts"].int().tolist()
        annotations["boxes"] += [[[c, *map(float, xyxy)] for c, *xyxy in boxes] for boxes in batch["boxes"]]
        while len(pending) >= per_shard:
            np.save(out / f"{role}-{shard:05d}.npy", np.stack(pending[:per_shard]), allow_pickle=False)
            pending, shard = pending[per_shard:], shard + 1
    if pending:
        np.save(out / f"{role}-{shard:05d}.npy", np.stack(pending), allow_pickle=False)
    (out / f"{role}.json").write_text(json.dumps(annotations))
    return {"images": len(annotations["ids"]), "shard_size": per_shard}
