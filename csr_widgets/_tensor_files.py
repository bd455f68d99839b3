"""Reading safetensors files, the one way the package does it, with errors that name the file.

Checkpoints, prototype atlases and stage-1 progress files are all safetensors files:
tensors plus a header of strings, nothing ever unpickled. A file that is missing, cut
short or not safetensors at all is reported with its path and what it was expected to be.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

# What safetensors raises for a damaged file (SafetensorError: a bad header, a truncated
# file) or an unreadable one (OSError).
_READ_ERRORS = (SafetensorError, OSError, ValueError)


def read_header(path, what: str, error: type[ValueError] = ValueError) -> dict[str, str]:
    """The string metadata in a safetensors file's header, without reading its tensors.

    what: the kind of file expected (for messages: "No {what} at ..."); error: the
    ValueError subclass raised for an unreadable file.
    """
    return _read(path, what, error, tensors=False)[1]


def read_tensors(path, what: str, error: type[ValueError] = ValueError) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor of a safetensors file (on the CPU) and its header metadata."""
    return _read(path, what, error, tensors=True)


def _read(path, what: str, error: type[ValueError], tensors: bool) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No {what} at {path}.")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            values = {name: handle.get_tensor(name) for name in handle.keys()} if tensors else {}
    except _READ_ERRORS as cause:
        raise error(f"{path} is not a readable {what} ({cause}).") from None
    return values, metadata
