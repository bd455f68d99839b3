"""Checkpoints: safetensors weights with the config as JSON in the same file's header.

Nothing is unpickled: safetensors holds only tensors and strings. One file means the
weights can never be separated from the config they belong to.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from .. import __version__
from ..config import CSRConfig

FORMAT = "csr_widgets.checkpoint/1"
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
    path = checkpoint_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    metadata = {"format": FORMAT, "config": model.config.to_json(), "csr_widgets_version": __version__}
    save_file(state, str(path), metadata=metadata)
    return path


def read_config(path) -> CSRConfig:
    """The config stored in a checkpoint's header."""
    path = checkpoint_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint at {path}.")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path} is not a readable safetensors checkpoint ({error}).") from None
    if metadata.get("format") != FORMAT or "config" not in metadata:
        raise CheckpointError(f"{path} is a safetensors file but not a csr_widgets checkpoint (no config in its header).")
    try:
        return CSRConfig.from_json(metadata["config"])
    except (ValueError, TypeError) as error:
        raise CheckpointError(f"{path} has an invalid config: {error}") from None


def load_model(path, device=None, config: CSRConfig | None = None):
    from .csr import CSRModel

    stored = read_config(path)
    if config is not None and config != stored:
        raise CheckpointError(
            f"{checkpoint_path(path)} was saved with a different config:\n  "
            + "\n  ".join(config.differences(stored))
        )
    model = CSRModel(stored)
    load_weights(model, path)
    return model.to(device) if device is not None else model


def load_weights(model, path) -> None:
    """Load a checkpoint's tensors into ``model``; refuse any missing, extra or reshaped tensor."""
    path = checkpoint_path(path)
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path} is not a readable safetensors checkpoint ({error}).") from None
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
