"""csr_widgets: Concept-based Similarity Reasoning (CVPR 2025) with live Jupyter widgets."""
__version__ = "0.1.0"

from .config import CSRConfig
from .data import SyntheticCXR
from .model import Box, CSRModel, Interaction
from .pretrained import load_pretrained
from .widgets import AtlasExplorer, CSRExplorer

__all__ = [
    "CSRConfig",
    "CSRModel",
    "Interaction",
    "Box",
    "load_pretrained",
    "SyntheticCXR",
    "CSRExplorer",
    "AtlasExplorer",
    "__version__",
]
