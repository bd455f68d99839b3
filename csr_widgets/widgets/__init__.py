"""Jupyter widgets: CSRExplorer (talk to the model about one image) and AtlasExplorer
(browse, prune and refit prototypes). Rendering is in ``render`` (pure numpy -> RGBA)."""
from .atlas_explorer import AtlasExplorer
from .explorer import CSRExplorer

__all__ = ["CSRExplorer", "AtlasExplorer"]
