"""The CSR model: backbone, heads, prototypes, encode/reason, interaction, checkpoints."""
from .checkpoint import CheckpointError
from .csr import CSRModel, Encoding, Reasoning
from .grid import FeatureGrid
from .interaction import Box, Interaction, importance_map
from .questions import Question, rank_questions

__all__ = ["CSRModel", "Encoding", "Reasoning", "Box", "Interaction", "FeatureGrid", "importance_map", "CheckpointError",
           "Question", "rank_questions"]
