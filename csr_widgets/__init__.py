"""csr_widgets: Concept-based Similarity Reasoning (CVPR 2025) with live Jupyter widgets."""
from ._version import __version__
from .config import CSRConfig
from .data import SyntheticCXR
from .model import Box, CSRModel, Interaction
from .pretrained import load_pretrained

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


def __getattr__(name: str):
    # The widgets pull in ipywidgets and ipycanvas: imported on first use, so that training
    # scripts and the command line start fast.
    if name in ("CSRExplorer", "AtlasExplorer"):
        from . import widgets

        return getattr(widgets, name)
    raise AttributeError(f"module 'csr_widgets' has no attribute {name!r}")
