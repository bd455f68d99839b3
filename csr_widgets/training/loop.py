"""Training: the three stages end to end (stages.py says what each trains), resumable.

Stage 1 trains on images; once F and C are frozen, every image's features are cached
(features.py) and stages 2 and 3 cost seconds. With a run folder (run_folder.py) each
finished stage is kept, and an interrupted run resumes where it stopped.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
from torch.utils.data import Dataset

from ..model import CSRModel
from ..model.checkpoint import load_weights
from .features import FeatureCache, cache_features
from .fitting import train_concepts, train_prototypes, train_task_head
from .run_folder import HISTORY_FILE, MODEL_FILE, PROGRESS_FILE, merge_history, stage_file
from .stages import TrainingPlan


def train(model: CSRModel, train_set: Dataset, val_set: Dataset | None = None, plan: TrainingPlan | None = None, *, out_dir=None, stages=(1, 2, 3), progress: bool = True) -> pd.DataFrame:
    """Train a CSRModel in three stages; returns the per-epoch history.

    With ``out_dir``, each finished stage is saved as ``stage{n}.safetensors`` (the best
    epoch by validation), stage 1 also after every epoch (``stage1-progress.safetensors``,
    with the optimiser), and a later call with the same ``out_dir`` resumes where the last
    one stopped: finished stages are loaded, not retrained. ``model.safetensors`` is the
    final model. Deterministic on CPU for a given ``plan.seed``.
    """
    plan = plan or TrainingPlan()
    check_dataset(model, train_set, "training")
    if val_set is not None:
        check_dataset(model, val_set, "validation")
    torch.manual_seed(plan.seed)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    history: list[dict] = []  # rows of the stages trained by this call
    caches: tuple[FeatureCache, FeatureCache | None] | None = None
    for stage in (1, 2, 3):
        done = stage_file(out, stage) if out is not None else None
        if done is not None and done.is_file():
            load_weights(model, done)
            continue
        if stage not in stages:
            continue
        if stage == 1:
            progress_file = out / PROGRESS_FILE if out is not None else None
            history += train_concepts(model, train_set, val_set, plan, progress, resume_from=progress_file)
        else:
            if caches is None:
                caches = (cache_features(model, train_set, progress=progress), cache_features(model, val_set, progress=progress) if val_set is not None else None)
            step = train_prototypes if stage == 2 else train_task_head
            history += step(model, *caches, plan, progress)
        if done is not None:
            model.save(done)
    frame = pd.DataFrame(history)
    if out is not None:
        model.save(out / MODEL_FILE)
        frame = merge_history(out / HISTORY_FILE, frame)
    return frame


def check_dataset(model: CSRModel, dataset: Dataset, what: str) -> None:
    """Refuse a dataset whose concept or class names are not the model's, in order."""
    for field in ("concepts", "classes"):
        names = list(getattr(dataset, field, []))
        if names != list(getattr(model, field)):
            raise ValueError(f"The {what} set's {field} {names} differ from the model's {getattr(model, field)}.")
