"""The run folder of ``train(..., out_dir=...)``: what lets an interrupted run resume.

    stage{n}.safetensors          each finished stage at its best epoch (a checkpoint)
    stage1-progress.safetensors   stage 1 after every epoch, with the optimiser and the
                                  learning-rate schedule (tensors and JSON; nothing pickled)
    history.csv                   every epoch of every stage, across resumed runs
    model.safetensors             the final model

With several processes the main one writes the folder (every process holds the same
weights) and every one reads it when a run resumes; across machines the folder must be
on a file system they share. Files are written to a temporary name and renamed, so an
interruption never leaves half a file for the next run to resume from.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import save_file

from .._distributed import current
from .._tensor_files import read_tensors
from ..model import CSRModel

PROGRESS_FILE = "stage1-progress.safetensors"
HISTORY_FILE = "history.csv"
MODEL_FILE = "model.safetensors"


def stage_file(out: Path, stage: int) -> Path:
    """Where a finished stage's checkpoint lives in the run folder ``out``."""
    return out / f"stage{stage}.safetensors"


def save_model_file(model: CSRModel, path: Path) -> None:
    """A checkpoint in the run folder (a finished stage, the final model), by the main process."""
    _write(path, model.save)


def save_progress(path: Path, model: CSRModel, optimizer, schedule, epoch: int, best: list[float] | None, layout: dict | None = None,
                  history: list[dict] | None = None) -> None:
    """Model and optimiser state as tensors; counters as JSON metadata (nothing pickled).

    layout: what the schedule's step count depends on (processes, batch size, ...): a
    resumed run must match it. history: the stage's rows so far, which a resumed run keeps."""
    tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    state = optimizer.state_dict()
    for index, slots in state["state"].items():
        for name, value in slots.items():
            tensors[f"optimizer.{index}.{name}"] = torch.as_tensor(value).contiguous().cpu()
    metadata = {"epoch": str(epoch), "best": json.dumps(best), "schedule": json.dumps(schedule.state_dict(), default=float),
                "param_groups": json.dumps(state["param_groups"]), "layout": json.dumps(layout or {}),
                "history": json.dumps(history or [])}
    _write(path, lambda target: save_file(tensors, str(target), metadata=metadata))


def load_progress(path: Path, model: CSRModel, optimizer, schedule, layout: dict | None = None) -> tuple[int, float, list[dict]]:
    """Restore what ``save_progress`` wrote; returns (epochs done, best validation score,
    the history rows of those epochs). Refuses a file written with another ``layout`` (its
    schedule would not fit)."""
    tensors, metadata = read_tensors(path, "training progress file")
    saved = json.loads(metadata.get("layout", "{}"))
    if layout is not None and saved and saved != layout:
        changed = ", ".join(f"{k} {saved.get(k)} (now {layout.get(k)})" for k in sorted(set(saved) | set(layout)) if saved.get(k) != layout.get(k))
        raise ValueError(f"{path} was written by a stage 1 run with {changed}: resume it with the same settings "
                         "(processes: torchrun --nproc_per_node), or start a new run folder.")
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    slots: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            slots.setdefault(int(index), {})[name] = value.to(model.device)
    optimizer.load_state_dict({"state": slots, "param_groups": json.loads(metadata["param_groups"])})
    schedule.load_state_dict(json.loads(metadata["schedule"]))
    return int(metadata["epoch"]), json.loads(metadata["best"]), json.loads(metadata.get("history", "[]"))


def merge_history(path: Path, new: pd.DataFrame) -> pd.DataFrame:
    """The run's whole history: earlier rows of stages not retrained now, then the new rows.
    A resumed run therefore never loses what the first one recorded."""
    if path.is_file() and path.stat().st_size > 1:
        old = pd.read_csv(path)
        if not new.empty and "stage" in old:
            old = old[~old["stage"].isin(new["stage"].unique())]
        new = pd.concat([old, new], ignore_index=True)
    _write(path, lambda target: new.to_csv(target, index=False))
    return new


def _write(path: Path, write: Callable[[Path], object]) -> None:
    """``write(temporary)`` then rename it to ``path``, on the main process only."""
    if not current().is_main:
        return
    temporary = path.with_name(f".{path.name}.partial")
    write(temporary)
    os.replace(temporary, path)
