"""Training: the three stages end to end (stages.py says what each trains), resumable.

Stage 1 trains on images; once F and C are frozen, every image's features are cached
(features.py) and stages 2 and 3 cost seconds. With a run folder (run_folder.py) each
finished stage is kept, and an interrupted run resumes where it stopped.

Under torchrun (``_distributed``) every process runs this same function: stage 1 with
DistributedDataParallel, the feature cache split between the processes, and stages 2 and
3 on gathered concept vectors and scores, identically everywhere; after each stage every
process takes rank 0's weights, so no rounding difference between devices can drift
(docs/training.md#how-the-work-is-split).
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
from torch.utils.data import Dataset

from .._distributed import current
from ..model import CSRModel
from ..model.checkpoint import load_weights
from .features import FeatureCache, cache_features
from .fitting import train_concepts, train_prototypes, train_task_head
from .run_folder import HISTORY_FILE, MODEL_FILE, PROGRESS_FILE, merge_history, save_model_file, stage_file
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
    group = current()
    progress = progress and group.is_main
    torch.manual_seed(plan.seed)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    group.broadcast_module(model)  # every process starts from rank 0's weights
    channels_last = plan.uses_channels_last(model.device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
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
                options = dict(progress=progress, num_workers=plan.num_workers, bf16=plan.uses_bf16(model.device))
                caches = (cache_features(model, train_set, **options), cache_features(model, val_set, **options) if val_set is not None else None)
            step = train_prototypes if stage == 2 else train_task_head
            history += step(model, *caches, plan, progress)
        group.broadcast_module(model)  # rank 0's weights everywhere: nothing can drift apart
        if done is not None:
            save_model_file(model, done)
    if channels_last:
        model.to(memory_format=torch.contiguous_format)
    frame = pd.DataFrame(history)
    if out is not None:
        save_model_file(model, out / MODEL_FILE)
        frame = merge_history(out / HISTORY_FILE, frame)
    return frame


def check_dataset(model: CSRModel, dataset: Dataset, what: str) -> None:
    """Refuse a dataset whose concept or class names are not the model's, in order."""
    for field in ("concepts", "classes"):
        names = list(getattr(dataset, field, []))
        if names != list(getattr(model, field)):
            raise ValueError(f"The {what} set's {field} {names} differ from the model's {getattr(model, field)}.")
