"""Data: the synthetic default (SyntheticCXR), loaders for TBX11K, VinDr-CXR, ISIC 2018 and
your own CSV, all yielding one item format (docs/architecture.md#the-item-format), and
``read_image`` for any image the package is handed."""
from .._batching import collate
from .concept_csv import ConceptCSV
from .isic import ISIC2018
from .pixels import read_image, resize_image
from .synthetic import SyntheticCXR
from .tbx11k import TBX11K
from .vindr import VinDrCXR

__all__ = ["SyntheticCXR", "TBX11K", "VinDrCXR", "ISIC2018", "ConceptCSV", "read_image", "resize_image", "collate"]
