"""Is the stage-2 step vectorised? (issue 4)

Times, in one run on the same batch, (a) a backbone-only forward pass (frozen F, no grad),
(b) a full stage-2 step from images: frozen F and C, local concept vectors (Eq. 2), P,
the SoftTriple loss over all K x M prototypes, backward and the optimiser step, and (c)
the stage-2 step on cached features, as training really runs it. Target: (b)/(a) <= 1.3.

    python benchmarks/training_step.py [--size 160] [--batch 32] [--repeats 10]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.nn import functional as F

from csr_widgets import CSRConfig, CSRModel
from csr_widgets.training import set_stage
from csr_widgets.training.losses import local_concept_vectors, prototype_loss


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    config = CSRConfig(concepts=[f"c{k}" for k in range(6)], classes=["a", "b", "c"], feature_stage=2,
                       image_size=args.size, prototypes_per_concept=10, embedding_dim=64)
    model = CSRModel(config)
    params = set_stage(model, 2)
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    images = torch.rand(args.batch, 1, args.size, args.size)
    concepts = (torch.rand(args.batch, 6) < 0.4).float()

    def backbone_only():
        with torch.no_grad():
            model.features(images)

    def step(features):
        with torch.no_grad():
            vectors = local_concept_vectors(features, model.concept_head(features))
        image, concept = concepts.nonzero(as_tuple=True)
        projected = model.projector(vectors[image, concept])
        loss = prototype_loss(projected, concept, F.normalize(model.prototypes, dim=-1), config.lambda_, config.gamma, config.delta)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def from_images():
        with torch.no_grad():
            features = model.features(images)
        step(features)

    with torch.no_grad():
        cached = model.features(images)
    backbone = median_ms(backbone_only, args.repeats)
    full = median_ms(from_images, args.repeats)
    cached_step = median_ms(lambda: step(cached), args.repeats * 5)
    print(f"batch {args.batch} at {args.size} px, K=6, M=10, D=64, {torch.get_num_threads()} threads")
    print(f"backbone-only forward     {backbone:8.2f} ms")
    print(f"stage-2 step from images  {full:8.2f} ms   ratio {full / backbone:.2f}x (target <= 1.3x)")
    print(f"stage-2 step, cached f    {cached_step:8.2f} ms   ({backbone / cached_step:.0f}x cheaper than the backbone)")


if __name__ == "__main__":
    main()
