"""Helpers shared by the evaluation tests (this module holds no tests).

A tiny untrained but real CSR model (resnet18 cut at stage 2: stride 8, offset 0, an 8x8
grid on 64 px images) whose ``encode`` can be replaced by a constructed Encoding, so that
scores, predictions and saliency peaks are known by hand.
"""
from __future__ import annotations

import copy
import functools

import torch

from csr_widgets import CSRConfig, CSRModel
from csr_widgets.model import Encoding

CONCEPTS = ["a", "b", "c"]
CLASSES = ["x", "y"]
SIZE = 64  # pixels; the grid has 8 x 8 cells centred on pixels 0, 8, ..., 56


def tiny_model() -> CSRModel:
    """K=3 concepts, M=2 prototypes, N=2 classes; H: logit x = 2 s_a0, logit y = 2 s_c0.

    A fresh copy each call; the model is built once per session (building probes the
    backbone, which takes seconds on a shared CPU).
    """
    return copy.deepcopy(_tiny_model())


@functools.lru_cache(maxsize=1)
def _tiny_model() -> CSRModel:
    torch.manual_seed(0)
    model = CSRModel(CSRConfig(concepts=CONCEPTS, classes=CLASSES, backbone="resnet18", feature_stage=2,
                               image_size=SIZE, prototypes_per_concept=2, embedding_dim=8)).eval()
    with torch.no_grad():
        weight = torch.zeros(2, 3, 2)
        weight[0, 0, 0] = 2.0  # class x <- prototype (a, 0)
        weight[1, 2, 0] = 2.0  # class y <- prototype (c, 0)
        model.task_head.linear.weight.copy_(weight.view(2, 6))
        model.task_head.linear.bias.zero_()
        model.task_head.score_mean.zero_()
        model.task_head.score_std.fill_(1.0)
        model.absent_baseline.zero_()
    assert model.grid.stride == 8 and model.grid.offset == 0.0
    return model


def empty_encoding(batch: int, M: int = 2) -> Encoding:
    """All-zero similarity maps (B, 3, M, 8, 8) on 64 px images, to be filled by hand."""
    return Encoding(
        similarity_maps=torch.zeros(batch, len(CONCEPTS), M, 8, 8),
        concept_maps=torch.zeros(batch, len(CONCEPTS), 8, 8),
        concept_logits=torch.zeros(batch, len(CONCEPTS)),
        image_size=(SIZE, SIZE),
    )


def indexed_image(index: int) -> torch.Tensor:
    """(1, 64, 64) image whose top-left pixel carries its dataset index (read by fake_encode)."""
    image = torch.full((1, SIZE, SIZE), 0.5)
    image[0, 0, 0] = index / 100
    return image


def fake_encode(encoding: Encoding):
    """An ``encode`` that returns the rows of a constructed Encoding for indexed images."""

    def encode(images: torch.Tensor) -> Encoding:
        rows = (images[:, 0, 0, 0] * 100).round().long().cpu()
        return encoding[rows]

    return encode


class ListDataset(torch.utils.data.Dataset):
    """A list of items in the package's item format, with .concepts and .classes."""

    def __init__(self, items, concepts=CONCEPTS, classes=CLASSES):
        self.items, self.concepts, self.classes = list(items), list(concepts), list(classes)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


def item(index: int, concepts, label: int, boxes=(), shortcut_box=None, image=None) -> dict:
    return {
        "image": indexed_image(index) if image is None else image,
        "concepts": torch.tensor(concepts, dtype=torch.float32),
        "label": label,
        "boxes": list(boxes),
        "shortcut_box": shortcut_box,
    }
