"""Evaluation: metrics, Pointing Game, simulated clinician, shortcut experiment, atlas, figures."""
from .atlas import Atlas, build_atlas, load_atlas
from .metrics import (accuracy, concept_auc, concept_saliency, confusion_matrix, energy_pointing, macro_f1,
                      per_class_f1, point_concepts, pointing_game)
from .report import classification_summary, concept_auc_summary, evaluate, format_tables, paper_tables, pointing_summary
from .shortcut import compare_pruning, find_shortcut_prototypes, off_target_prototypes, prune_prototypes, run_shortcut_experiment
from .simulation import interaction_gains, oracle_interaction, simulate_interaction

__all__ = [
    "evaluate", "paper_tables", "format_tables", "classification_summary", "pointing_summary", "concept_auc_summary",
    "accuracy", "macro_f1", "per_class_f1", "confusion_matrix", "concept_auc", "concept_saliency", "point_concepts",
    "pointing_game", "energy_pointing", "simulate_interaction", "interaction_gains", "oracle_interaction",
    "find_shortcut_prototypes", "off_target_prototypes", "prune_prototypes", "compare_pruning", "run_shortcut_experiment",
    "Atlas", "build_atlas", "load_atlas", "figures",
]


def __getattr__(name: str):
    # The figures pull in matplotlib: imported on first use, so that training (which
    # selects epochs with ``metrics``) and the widgets do not pay for it.
    if name == "figures":
        import csr_widgets.evaluation.figures as figures  # not `from . import`: that asks this hook again

        return figures
    raise AttributeError(f"module 'csr_widgets.evaluation' has no attribute {name!r}")
