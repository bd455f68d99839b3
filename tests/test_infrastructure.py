"""The package's infrastructure modules: the eval-mode guard, batching, safetensors reading."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from csr_widgets._batching import collate
from csr_widgets._inference import evaluating
from csr_widgets._tensor_files import read_header, read_tensors


def frozen_backbone_and_trained_head() -> nn.Module:
    """The mix that training makes (set_stage): a frozen part in eval mode, a trained part in train mode."""
    model = nn.Sequential(nn.BatchNorm1d(3), nn.Linear(3, 2))
    model.train()
    model[0].eval()
    return model


def test_evaluating_restores_each_modules_own_flag_even_after_an_error():
    model = frozen_backbone_and_trained_head()
    with pytest.raises(RuntimeError, match="inside"):
        with evaluating(model):
            assert not any(m.training for m in model.modules())
            raise RuntimeError("inside")
    assert [m.training for m in model.modules()] == [True, False, True]  # not model.train(True)'s [True] * 3


def test_evaluating_grad_modes():
    model = nn.Linear(3, 1)
    x = torch.ones(1, 3)
    with evaluating(model):
        assert torch.is_inference_mode_enabled()
    with evaluating(model, autograd=torch.no_grad):
        out = model(x)
    assert not out.requires_grad and not torch.is_inference(out)  # may feed a later training step
    with evaluating(model, autograd=None):
        model(x).sum().backward()  # the grid probe differentiates a backbone in eval mode
    assert model.weight.grad is not None


def test_collate_stacks_arrays_and_keeps_every_key():
    items = [{"image": np.zeros((1, 4, 4), np.float32), "label": 1, "boxes": [("a", 0, 0, 1, 1)]},
             {"image": np.ones((1, 4, 4), np.float32), "label": torch.tensor(0), "shortcut_box": (0, 0, 2, 2)}]
    batch = collate(items)
    assert batch["image"].shape == (2, 1, 4, 4) and batch["image"][1].eq(1).all()
    assert batch["label"].tolist() == [1, 0] and batch["label"].dtype == torch.long
    assert batch["boxes"] == [[("a", 0, 0, 1, 1)], None] and batch["shortcut_box"] == [None, (0, 0, 2, 2)]
    with pytest.raises(ValueError, match="at least one"):
        collate([])


def test_safetensors_errors_name_the_file(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "good.safetensors"
    save_file({"a": torch.arange(3.0)}, str(path), metadata={"format": "x"})
    tensors, metadata = read_tensors(path, "atlas")
    assert torch.equal(tensors["a"], torch.arange(3.0)) and metadata == {"format": "x"}
    assert read_header(path, "atlas") == {"format": "x"}
    with pytest.raises(FileNotFoundError, match="No atlas at .*missing"):
        read_tensors(tmp_path / "missing.safetensors", "atlas")
    (tmp_path / "cut.safetensors").write_bytes(path.read_bytes()[:-4])
    with pytest.raises(ValueError, match="cut.safetensors is not a readable atlas"):
        read_tensors(tmp_path / "cut.safetensors", "atlas")

    class Refused(ValueError):
        pass

    with pytest.raises(Refused):
        read_header(tmp_path / "cut.safetensors", "checkpoint", Refused)
