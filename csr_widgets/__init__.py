"""csr_widgets: Concept-based Similarity Reasoning (CVPR 2025) with live Jupyter widgets."""
__version__ = "0.1.0"

from .config import CSRConfig
from .model import Box, CSRModel, Interaction

__all__ = ["CSRConfig", "CSRModel", "Interaction", "Box", "__version__"]
