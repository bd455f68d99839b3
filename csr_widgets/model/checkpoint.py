"""Checkpoints: safetensors weights with the config as JSON in the same file's header.

Nothing is unpickled: safetensors holds only tensors and strings. One file means the
weights can never be separated from the config they belong to. This module never builds
a model: ``CSRModel.load`` reads the config here, builds itself, and loads the weights
here, so the model class and its file format do not import each other.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file

from .._tensor_files import read_header, read_tensors
from .._version import __version__
from ..config import CSRConfig

FORMAT = "csr_widgets.checkpoint/1"
_WHAT = "safetensors checkpoint"  # how messages name the file
# Tensors a checkpoint may lack because it predates them; the model keeps its defaults.
# novelty.*: out-of-distribution statistics (csr_widgets 0.2); without them nothing is flagged.
OPTIONAL_PREFIXES = ("novelty.",)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or that does not fit the model it is loaded into."""


def checkpoint_path(path) -> Path:
    """The file a checkpoint path names: ``.safetensors`` is appended when there is no suffix."""
    path = Path(path)
    return path if path.suffix else path.with_suffix(".safetensors")


def save_model(model, path) -> Path:
    """Write ``model``'s state dict and ``model.config`` to one safetensors file."""
    path = checkpoint_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    metadata = {"format": FORMAT, "config": model.config.to_json(), "csr_widgets_version": __version__}
    save_file(state, str(path), metadata=metadata)
    return path


def read_config(path, expected: CSRConfig | None = None) -> CSRConfig:
    """The config stored in a checkpoint's header; refuses one that differs from ``expected``."""
    path = checkpoint_path(path)
    metadata = read_header(path, _WHAT, CheckpointError)
    if metadata.get("format") != FORMAT or "config" not in metadata:
        raise CheckpointError(f"{path} is a safetensors file but not a csr_widgets checkpoint (no config in its header).")
    try:
        stored = CSRConfig.from_json(metadata["config"])
    except (ValueError, TypeError) as error:
        raise CheckpointError(f"{path} has an invalid config: {error}") from None
    if expected is not None and expected != stored:
        raise CheckpointError(f"{path} was saved with a different config:\n  " + "\n  ".join(expected.differences(stored)))
    return stored


def load_weights(model, path) -> None:
    """Load a checkpoint's tensors into ``model``; refuse any missing, extra or reshaped tensor."""
    path = checkpoint_path(path)
    state, _ = read_tensors(path, _WHAT, CheckpointError)
    expected = model.state_dict()
    absent = [k for k in expected if k not in state and k.startswith(OPTIONAL_PREFIXES)]
    if absent:
        warnings.warn(
            f"{path} has no out-of-distribution statistics (saved before csr_widgets 0.2): "
            "Reasoning.out_of_distribution will flag nothing. Measure them with "
            "csr_widgets.training.calibrate_novelty(model, train_set, val_set) and save the model again.",
            stacklevel=3,
        )
        state = {**state, **{k: expected[k] for k in absent}}
    problems = [f"missing: {k} {tuple(v.shape)}" for k, v in expected.items() if k not in state]
    problems += [f"unexpected: {k} {tuple(v.shape)}" for k, v in state.items() if k not in expected]
    problems += [
        f"shape of {k}: checkpoint {tuple(state[k].shape)} != model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if problems:
        raise CheckpointError(f"{path} does not match this model:\n  " + "\n  ".join(problems))
    with torch.no_grad():
        model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})
