"""The scene of the browser tests and the latency benchmark, imported by the fixture
notebook (copied next to it): a small model whose prediction responds to boxes, an image
of a non-square size, and where its strongest region is, in canvas pixels."""
from __future__ import annotations

import json

import numpy as np
import torch

from csr_widgets import CSRConfig, CSRModel
from csr_widgets.widgets import CSRExplorer

CONCEPTS = ["nodule", "effusion", "cavity"]
CLASSES = ["healthy", "sick", "tb"]


def build_model(image_size: int = 128, prototypes: int = 4, dim: int = 16, seed: int = 0) -> CSRModel:
    """Untrained resnet18 (stride 8) with a hand-set head: "sick" rises with nodule's
    scores, "tb" with cavity's, "healthy" with effusion's; standardised around 0.3 so a
    box that moves a score moves the prediction visibly."""
    torch.manual_seed(seed)
    config = CSRConfig(
        concepts=CONCEPTS, classes=CLASSES, backbone="resnet18", feature_stage=2, image_size=image_size,
        in_channels=1, prototypes_per_concept=prototypes, embedding_dim=dim, cell_offset=0.0,
    )
    model = CSRModel(config).eval()
    with torch.no_grad():
        weight = torch.zeros(3, 3, prototypes)
        weight[1, 0], weight[2, 2], weight[0, 1] = 1.0, 1.0, 0.5
        model.task_head.linear.weight.copy_(weight.view(3, -1))
        model.task_head.linear.bias.zero_()
        model.task_head.score_mean.fill_(0.3)
        model.task_head.score_std.fill_(0.1)
        model.absent_baseline.fill_(0.05)
    return model


def build_image(height: int = 200, width: int = 300) -> np.ndarray:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width]
    blobs = 180 * np.exp(-((x - 0.3 * width) ** 2 + (y - 0.4 * height) ** 2) / 400.0)
    blobs += 120 * np.exp(-((x - 0.7 * width) ** 2 + (y - 0.6 * height) ** 2) / 900.0)
    return np.clip(50 + blobs + rng.normal(0, 12, (height, width)), 0, 255).astype(np.uint8)


def build_explorer(**kwargs) -> CSRExplorer:
    ex = CSRExplorer(build_model(), build_image(), concept="nodule", display_size=480, **kwargs)
    ex.add_class("csr-test-main")  # the explorer the tests drive (the page has two)
    return ex


def build_ood_explorer() -> CSRExplorer:
    """The bundled model on a real PA chest film (pydicom's test data, when installed) or
    else on a colour gradient: both lie far beyond its training images."""
    from csr_widgets import load_pretrained

    try:
        from pydicom.data import get_testdata_file

        image = get_testdata_file("RG1_UNCR.dcm", download=False)
    except ImportError:
        image = None
    if image is None:
        y, x = np.mgrid[0:200, 0:300]
        image = np.stack([x / 300, y / 200, 1 - x / 300], axis=-1).astype(np.float32)
    ex = CSRExplorer(load_pretrained("synthetic-cxr", device="cpu"), image, display_size=320)
    ex.add_class("csr-test-ood")
    return ex


def strongest_region(ex: CSRExplorer, concept: str = "nodule", cells: float = 1.5) -> dict:
    """The box (canvas pixels) of +-``cells`` feature cells around the strongest cell of a
    concept's map (max over its prototypes), as the user would see it."""
    k = ex.model.concepts.index(concept)
    maps = ex.result.similarity_maps[0, k].amax(0)
    i, j = divmod(int(maps.argmax()), maps.shape[-1])
    grid = ex.model.grid
    (mh, mw), (ch, cw) = ex.geometry.model_size, ex.geometry.canvas_size
    cy, cx = grid.offset + grid.stride * i, grid.offset + grid.stride * j  # model pixels
    half = grid.stride * cells
    return {
        "x0": max(2.0, (cx - half) * cw / mw), "y0": max(2.0, (cy - half) * ch / mh),
        "x1": min(cw - 2.0, (cx + half + 1) * cw / mw), "y1": min(ch - 2.0, (cy + half + 1) * ch / mh),
    }


def describe(ex: CSRExplorer) -> str:
    """One line the browser test reads: where to draw, and what the model says now."""
    scene = {"box": strongest_region(ex), "canvas": list(ex.geometry.canvas_size), "probs": ex.result.probs[0].tolist()}
    return "SCENE " + json.dumps(scene)


PAPER_FINDINGS = [  # VinDr-CXR's 14 findings: the paper-size setting of benchmarks/interaction.py
    "aortic_enlargement", "atelectasis", "calcification", "cardiomegaly", "consolidation", "ild",
    "infiltration", "lung_opacity", "nodule", "other_lesion", "pleural_effusion",
    "pleural_thickening", "pneumothorax", "pulmonary_fibrosis",
]


def _standardise(model: CSRModel, seed: int = 2) -> CSRModel:
    """Standardise an untrained model's scores as stage 3 would (on a few images) and keep
    its logits unsaturated, so that boxes move the displayed probabilities."""
    from csr_widgets import SyntheticCXR

    images = torch.stack([item["image"] for item in SyntheticCXR(n=8, seed=seed, image_size=model.config.image_size)])
    with torch.no_grad():
        scores = model(images).scores
        model.task_head.score_mean.copy_(scores.mean(0))
        model.task_head.score_std.copy_(scores.std(0).clamp(min=1e-3))
        model.task_head.linear.weight.normal_(0, 1.0 / model.config.prototypes_per_concept ** 0.5)
        model.task_head.linear.bias.zero_()
    return model


def build_benchmark_explorer(kind: str = "bundled", display_size: int = 512) -> tuple[CSRExplorer, str]:
    """The explorer the latency benchmark drives, on a SyntheticCXR image.

    kind "bundled": the bundled model when it is installed, else an untrained one of the
    bundled size (resnet18 stride 8, 160 px, 6 concepts, M = 10, D = 64);
    kind "paper": an untrained paper-size model (resnet18, 224 px, K = 14, M = 100,
    D = 256, as benchmarks/interaction.py). Returns the explorer and which model it is."""
    from csr_widgets import SyntheticCXR, load_pretrained

    torch.manual_seed(0)
    if kind == "paper":
        config = CSRConfig(concepts=PAPER_FINDINGS, classes=["no_finding", "finding"], backbone="resnet18",
                           image_size=224, prototypes_per_concept=100, embedding_dim=256)
        model, name = _standardise(CSRModel(config).eval()), "paper size (resnet18, 224 px, K=14, M=100), untrained"
    elif kind == "bundled":
        try:
            model, name = load_pretrained("synthetic-cxr", device="cpu"), "bundled synthetic-cxr"
        except (FileNotFoundError, ValueError):
            from csr_widgets.pretrained import recipe_config

            model, name = _standardise(CSRModel(recipe_config("synthetic-cxr")).eval()), "untrained, bundled size"
    else:
        raise ValueError(f"kind must be 'bundled' or 'paper', got {kind!r}.")
    image = SyntheticCXR(n=4, seed=1, image_size=model.config.image_size)[1]["image"]
    return CSRExplorer(model, image, display_size=display_size), name


def strongest_regions(ex: CSRExplorer, count: int = 8, cells: float = 2.5, min_change: float = 0.005) -> list[dict]:
    """Up to ``count`` boxes (canvas pixels) around the strongest cells of the shown
    concept's map whose NEGATIVE box visibly moves the prediction (checked with the
    model: probabilities are shown with 3 decimals)."""
    from csr_widgets import Interaction

    k = ex.model.concepts.index(ex.concept)
    maps = ex.result.similarity_maps[0, k].amax(0)
    grid, w = ex.model.grid, maps.shape[-1]
    (mh, mw), (ch, cw) = ex.geometry.model_size, ex.geometry.canvas_size
    boxes = []
    for flat in maps.flatten().argsort(descending=True).tolist():
        i, j = divmod(flat, w)
        cy, cx = grid.offset + grid.stride * i, grid.offset + grid.stride * j
        half = grid.stride * cells
        box = {
            "x0": max(2.0, (cx - half) * cw / mw), "y0": max(2.0, (cy - half) * ch / mh),
            "x1": min(cw - 2.0, (cx + half + 1) * cw / mw), "y1": min(ch - 2.0, (cy + half + 1) * ch / mh),
        }
        if any(abs(box["x0"] - b["x0"]) + abs(box["y0"] - b["y0"]) <= 20 for b in boxes):
            continue
        image_box = ex.geometry.box_from_canvas(box["x0"], box["y0"], box["x1"], box["y1"], positive=False)
        with torch.inference_mode():
            probs = ex.model.reason(ex.encoding, Interaction(boxes=(ex.geometry.box_to_model(image_box),))).probs
        if float((probs - ex.result.probs).abs().max()) >= min_change:
            boxes.append(box)
        if len(boxes) == count:
            break
    return boxes


def build_readme_explorer() -> CSRExplorer:
    """The README's picture: the bundled model on a held-out phantom with a nodule, a
    concept box on the nodule ("the nodule is here"), its heatmap shown."""
    from csr_widgets import Box, SyntheticCXR, load_pretrained

    model = load_pretrained("synthetic-cxr", device="cpu")
    data = SyntheticCXR(n=40, split="test", image_size=model.config.image_size)
    item = next(data[i] for i in range(len(data)) if data.classes[data[i]["label"]] == "tb"
                and any(concept == "nodule" for concept, *_ in data[i]["boxes"]))
    _, *nodule = next(b for b in item["boxes"] if b[0] == "nodule")
    ex = CSRExplorer(model, item["image"], concept="nodule", display_size=400)
    x0, y0, x1, y1 = nodule
    ex.boxes = [Box(x0 - 2, y0 - 2, x1 + 2, y1 + 2, concept="nodule")]
    ex.add_class("csr-readme")
    return ex
