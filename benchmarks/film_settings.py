"""The bundled model on films unlike its training phantoms, and on images that are no
phantoms at all.

1. Out of distribution: the ratio of each image's feature distance to the model's
   threshold (> 1: flagged) for a real PA chest film (pydicom-data's RG1_UNCR.dcm), a
   photograph (matplotlib's sample), blank, grey and gradient images.
2. Film settings: macro F1 on the first --n images of the recipe's test split with each of
   SyntheticCXR's film settings fixed at an end of its range (anatomy_scale 0.85 / 1.15,
   gamma 0.7 / 1.4, contrast 0.8 / 1.2), against the default phantoms
   (docs/decisions.md#film-settings).

    python benchmarks/film_settings.py [CHECKPOINT] [--n 500]

CHECKPOINT: a run's model.safetensors (default: the bundled model).
"""
from __future__ import annotations

import argparse

import matplotlib.cbook
import numpy as np
import torch
from pydicom.data import get_testdata_file

from csr_widgets import CSRModel, SyntheticCXR, load_pretrained
from csr_widgets.data import read_image, resize_image
from csr_widgets.evaluation import evaluate
from csr_widgets.evaluation.report import classification_summary
from csr_widgets.pretrained import RECIPES

SETTINGS = [("default", {}), ("anatomy_scale 0.85", {"anatomy_scale": 0.85}), ("anatomy_scale 1.15", {"anatomy_scale": 1.15}),
            ("gamma 0.7", {"gamma": 0.7}), ("gamma 1.4", {"gamma": 1.4}),
            ("contrast 0.8", {"contrast": 0.8}), ("contrast 1.2", {"contrast": 1.2})]


def distance_ratio(model, image) -> float:
    """The image's feature distance over the model's out-of-distribution threshold."""
    x = resize_image(read_image(image, channels=1), model.config.image_size)[None]
    with torch.inference_mode():
        return float(model.encode(x).feature_distance[0] / model.novelty.threshold)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", nargs="?", default=None, help="a .safetensors file (default: the bundled model)")
    parser.add_argument("--n", type=int, default=500, help="test images per setting")
    args = parser.parse_args()
    model = load_pretrained("synthetic-cxr", device="cpu") if args.checkpoint is None else CSRModel.load(args.checkpoint, device="cpu").eval()
    images = {"real PA chest film (RG1_UNCR.dcm)": get_testdata_file("RG1_UNCR.dcm", download=False),
              "photograph": matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False),
              "blank": np.zeros((300, 300), np.float32), "grey": np.full((50, 50), 0.5, np.float32),
              "gradient": np.tile(np.linspace(0, 1, 256, dtype=np.float32), (256, 1))}
    print(f"out-of-distribution threshold {float(model.novelty.threshold):.2f}; distance / threshold:")
    for name, image in images.items():
        print(f"  {name:<34} {distance_ratio(model, image):5.1f}x")
    print(f"macro F1 (%) on the first {args.n} test images:")
    for name, setting in SETTINGS:
        frame = evaluate(model, SyntheticCXR(**{**RECIPES["synthetic-cxr"].test, "n": args.n, **setting}), progress=False)
        print(f"  {name:<20} {100 * classification_summary(frame)['macro_f1']:5.1f}", flush=True)


if __name__ == "__main__":
    main()
