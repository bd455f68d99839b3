"""Training: three stages (see ``stages.STAGES``), their losses, and the refit of H."""
from .loop import FeatureCache, TrainingPlan, cache_features, calibrate_novelty, refit_task_head, train
from .stages import STAGES, set_stage

__all__ = ["train", "TrainingPlan", "refit_task_head", "calibrate_novelty", "cache_features", "FeatureCache", "set_stage", "STAGES"]
