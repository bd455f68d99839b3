"""How much cheaper is an interaction than a forward pass? (issue 2)

Paper size: resnet18 at 224 px, K=14 concepts, M=100 prototypes, D=256, CPU, batch of 1.
Reports the median of `forward` and of `reason` on a cached encoding with one box and one
rejected concept, their ratio, and the memory of one Encoding. Ratios come from one run,
so machine noise affects both sides alike.

    python benchmarks/interaction.py [--repeats 50] [--threads 1]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from csr_widgets import Box, CSRConfig, CSRModel, Interaction

FINDINGS = [
    "aortic_enlargement", "atelectasis", "calcification", "cardiomegaly", "consolidation", "ild",
    "infiltration", "lung_opacity", "nodule", "other_lesion", "pleural_effusion",
    "pleural_thickening", "pneumothorax", "pulmonary_fibrosis",
]


def median_ms(fn, repeats: int) -> tuple[float, float]:
    """Median and p95 of the calling thread's CPU time: unlike wall time it does not count
    the moments the thread waits for a core, which on a shared machine are most of the noise."""
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.thread_time()
        fn()
        times.append((time.thread_time() - start) * 1e3)
    times.sort()
    return statistics.median(times), times[int(0.95 * (len(times) - 1))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = CSRConfig(concepts=FINDINGS, classes=["no_finding", "finding"], backbone="resnet18",
                       image_size=224, prototypes_per_concept=100, embedding_dim=256)
    model = CSRModel(config).eval()
    images = torch.rand(1, 1, 224, 224)
    interaction = Interaction(boxes=[Box(40, 60, 120, 150)], rejected={"nodule"})
    with torch.inference_mode():
        encoding = model.encode(images)
        forward, forward_p95 = median_ms(lambda: model(images, interaction), args.repeats)
        reason, reason_p95 = median_ms(lambda: model.reason(encoding, interaction), args.repeats * 10)
    print(f"threads           {args.threads}")
    print(f"forward   median  {forward:8.3f} ms   p95 {forward_p95:8.3f} ms")
    print(f"reason    median  {reason:8.3f} ms   p95 {reason_p95:8.3f} ms")
    print(f"ratio forward/reason  {forward / reason:6.0f}x  (target >= 200x)")
    print(f"encoding memory   {encoding.nbytes / 1024:.0f} KiB per image "
          f"(similarity maps {tuple(encoding.similarity_maps.shape)})")


if __name__ == "__main__":
    main()
