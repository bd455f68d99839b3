"""Training: three stages (see ``stages.STAGES``), their losses, and the refit of H."""
from .features import FeatureCache, cache_features
from .fitting import calibrate_novelty, refit_task_head
from .loop import train
from .stages import STAGES, TrainingPlan, set_stage

__all__ = ["train", "TrainingPlan", "refit_task_head", "calibrate_novelty", "cache_features", "FeatureCache", "set_stage", "STAGES"]
