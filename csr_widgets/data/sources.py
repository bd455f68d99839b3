"""Data sources named on the command line: ``--data synthetic | tbx11k:ROOT | vindr:ROOT |
isic:ROOT | csv:FILE[:ROOT] | prepared:CACHE``, the same for ``train`` and ``evaluate``.

A source gives the dataset of each role, "train", "val" and "test", from the format's own
splits (docs/training.md#data-sources):

| source   | train                  | val                       | test                          |
|----------|------------------------|---------------------------|-------------------------------|
| tbx11k   | split "train"          | split "val"               | split "val" (test labels are not public) |
| vindr    | "train" less a holdout | the holdout of "train"    | split "test"                  |
| isic     | split "train"          | split "val"               | split "test"                  |
| csv      | the file less a holdout | the holdout              | the whole file                |
| prepared | the prepared "train"   | the prepared "val"        | the prepared "test"           |
| synthetic | the keywords the caller gives (a recipe's splits)                                |

The holdout (ours) is the images whose id hashes into the lowest ``HOLDOUT`` share: the
same images on every machine and in every process, whatever the file's order.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import Dataset

# Share of a source without a validation split of its own that is held out for validation (ours).
HOLDOUT = 0.1
ROLES = ("train", "val", "test")
KINDS = {  # kind -> what follows the colon, for messages
    "synthetic": None,
    "tbx11k": "ROOT, the folder holding imgs/ and annotations/",
    "vindr": "ROOT, the folder holding train.csv (or annotations/) and the DICOM folders",
    "isic": "ROOT, the folder holding the ISIC2018_Task1-2_* and ISIC2018_Task2_* folders",
    "csv": "FILE[:ROOT], a labels CSV and the folder its image paths are relative to",
    "prepared": "CACHE, a folder written by `csr-widgets prepare`",
}
USAGE = "give one of: synthetic, " + ", ".join(f"{kind}:{what.split(',')[0]}" for kind, what in KINDS.items() if what)
# (loader split, part) of each role: part None = the whole split, "rest" / "holdout".
_SPLITS = {
    "tbx11k": {"train": ("train", None), "val": ("val", None), "test": ("val", None)},
    "vindr": {"train": ("train", "rest"), "val": ("train", "holdout"), "test": ("test", None)},
    "isic": {"train": ("train", None), "val": ("val", None), "test": ("test", None)},
    "csv": {"train": (None, "rest"), "val": (None, "holdout"), "test": (None, None)},
    "prepared": {role: (role, None) for role in ROLES},
}
# Image channels of each kind when nothing else says (dermoscopy is colour).
CHANNELS = {"isic": 3}


class DataSpecError(ValueError):
    """A ``--data`` value that names no usable source (the message says what to give)."""


@dataclass(frozen=True)
class DataSource:
    """A parsed ``--data`` value: its kind and the path(s) after the colon."""

    kind: str
    path: Path | None = None
    root: Path | None = None  # csv only: the folder image paths are relative to

    def __str__(self) -> str:
        parts = [self.kind] + [str(p) for p in (self.path, self.root) if p is not None]
        return ":".join(parts)

    @property
    def channels(self) -> int:
        """The image channels of this kind of data (a prepared cache: as it was written)."""
        if self.kind == "prepared":
            from .prepared import PreparedImages

            return PreparedImages.manifest(self.path)["channels"]
        return CHANNELS.get(self.kind, 1)

    @property
    def origin(self) -> str:
        """The kind of the data behind this source (a prepared cache: what it was prepared from)."""
        if self.kind == "prepared":
            from .prepared import PreparedImages

            return parse_source(PreparedImages.manifest(self.path)["source"], check=False).kind
        return self.kind

    def dataset(self, role: str, *, image_size: int | None, channels: int | None, split: str | None = None, **options) -> Dataset:
        """The dataset of ``role`` ("train", "val", "test"), its images resized to
        ``image_size`` with ``channels``. split: the format's own split name instead of
        the role's (the whole split, no holdout). options: the loader's keywords (for
        "synthetic": SyntheticCXR's, which must say everything but the size)."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}.")
        if self.kind == "synthetic":
            from .synthetic import SyntheticCXR

            return SyntheticCXR(**{"split": role, **options, "image_size": image_size, "channels": channels or 1})
        name, part = (split, None) if split is not None else _SPLITS[self.kind][role]
        dataset = self._load(name, image_size, channels, options)
        return dataset if part is None else Holdout(dataset, part)

    def _load(self, split: str | None, image_size: int | None, channels: int | None, options: dict) -> Dataset:
        size = dict(image_size=image_size, channels=channels)
        if self.kind == "tbx11k":
            from .tbx11k import TBX11K

            return TBX11K(self.path, split, **size, **options)
        if self.kind == "vindr":
            from .vindr import VinDrCXR

            return VinDrCXR(self.path, split, **size, **options)
        if self.kind == "isic":
            from .isic import ISIC2018

            return ISIC2018(self.path, split, **size, **options)
        if self.kind == "csv":
            from .concept_csv import ConceptCSV

            return ConceptCSV(self.path, self.root, **size, **options)
        from .prepared import PreparedImages

        return PreparedImages(self.path, split, **size)


def parse_source(spec: str, check: bool = True) -> DataSource:
    """``--data``'s value -> a DataSource; a DataSpecError naming the problem and the fix
    (an unknown kind, a missing path, a path that does not exist when ``check``)."""
    kind, colon, rest = str(spec).strip().partition(":")
    kind = kind.lower()
    if kind not in KINDS:
        raise DataSpecError(f"--data {spec!r}: unknown source {kind!r}; {USAGE}.")
    if kind == "synthetic":
        if rest:
            raise DataSpecError(f"--data {spec!r}: the synthetic source takes no path; give just `synthetic`.")
        return DataSource("synthetic")
    if not rest:
        raise DataSpecError(f"--data {spec!r}: {kind} needs a path: {kind}:{KINDS[kind]}.")
    path, root = (rest.split(":", 1) + [None])[:2] if kind == "csv" else (rest, None)
    source = DataSource(kind, Path(path).expanduser(), Path(root).expanduser() if root else None)
    if check:
        expected = "file" if kind == "csv" else "folder"
        found = source.path.is_file() if kind == "csv" else source.path.is_dir()
        if not found:
            raise DataSpecError(f"--data {spec!r}: no such {expected} {source.path}; {kind} needs {KINDS[kind]}.")
        if source.root is not None and not source.root.is_dir():
            raise DataSpecError(f"--data {spec!r}: no such folder {source.root} (the image root after the second colon).")
    return source


def in_holdout(image_id: str, share: float = HOLDOUT) -> bool:
    """Whether an image belongs to the validation holdout: a hash of its id, not its position."""
    return zlib.crc32(str(image_id).encode()) % 10_000 < share * 10_000


class Holdout(Dataset):
    """The "holdout" or the "rest" of a dataset of records (by ``in_holdout`` of each id);
    keeps the dataset's concepts and classes."""

    def __init__(self, dataset, part: str):
        if part not in ("holdout", "rest"):
            raise ValueError(f"part must be 'holdout' or 'rest', got {part!r}.")
        self.dataset, self.part = dataset, part
        self.indices = [i for i, record in enumerate(dataset.records) if in_holdout(record.id) == (part == "holdout")]
        self.concepts, self.classes = list(dataset.concepts), list(dataset.classes)
        if not self.indices:
            raise ValueError(f"The {part} of {len(dataset)} images is empty (the holdout takes {HOLDOUT:.0%} of the "
                             "images by id): too few images to hold some out for validation.")

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict:
        return self.dataset[self.indices[index]]

    @property
    def records(self) -> list:
        return [self.dataset.records[i] for i in self.indices]
