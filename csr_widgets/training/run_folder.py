"""The run folder of ``train(..., out_dir=...)``: what lets an interrupted run resume.

    stage{n}.safetensors          each finished stage at its best epoch (a checkpoint)
    stage1-progress.safetensors   stage 1 after every epoch, with the optimiser and the
                                  learning-rate schedule (tensors and JSON; nothing pickled)
    history.csv                   every epoch of every stage, across resumed runs
    model.safetensors             the final model
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import save_file

from .._tensor_files import read_tensors
from ..model import CSRModel

PROGRESS_FILE = "stage1-progress.safetensors"
HISTORY_FILE = "history.csv"
MODEL_FILE = "model.safetensors"


def stage_file(out: Path, stage: int) -> Path:
    """Where a finished stage's checkpoint lives in the run folder ``out``."""
    return out / f"stage{stage}.safetensors"


def save_progress(path: Path, model: CSRModel, optimizer, schedule, epoch: int, best: float) -> None:
    """Model and optimiser state as tensors; counters as JSON metadata (nothing pickled)."""
    tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    state = optimizer.state_dict()
    for index, slots in state["state"].items():
        for name, value in slots.items():
            tensors[f"optimizer.{index}.{name}"] = torch.as_tensor(value).contiguous().cpu()
    metadata = {"epoch": str(epoch), "best": json.dumps(best), "schedule": json.dumps(schedule.state_dict(), default=float),
                "param_groups": json.dumps(state["param_groups"])}
    save_file(tensors, str(path), metadata=metadata)


def load_progress(path: Path, model: CSRModel, optimizer, schedule) -> tuple[int, float]:
    """Restore what ``save_progress`` wrote; returns (epochs done, best validation score)."""
    tensors, metadata = read_tensors(path, "training progress file")
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    slots: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            slots.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": slots, "param_groups": json.loads(metadata["param_groups"])})
    schedule.load_state_dict(json.loads(metadata["schedule"]))
    return int(metadata["epoch"]), json.loads(metadata["best"])


def merge_history(path: Path, new: pd.DataFrame) -> pd.DataFrame:
    """The run's whole history: earlier rows of stages not retrained now, then the new rows.
    A resumed run therefore never loses what the first one recorded."""
    if path.is_file() and path.stat().st_size > 1:
        old = pd.read_csv(path)
        if not new.empty and "stage" in old:
            old = old[~old["stage"].isin(new["stage"].unique())]
        new = pd.concat([old, new], ignore_index=True)
    new.to_csv(path, index=False)
    return new
