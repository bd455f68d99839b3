"""How fast SyntheticCXR makes images on one core (the target is >= 200 images/s at 224 px).

    python benchmarks/synthetic_speed.py [--size 224] [--images 1000] [--shortcut marker]
"""
from __future__ import annotations

import argparse
import os

# one core: keep every numeric library single-threaded before it is imported
for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

import time  # noqa: E402

import torch  # noqa: E402

from csr_widgets.data import SyntheticCXR  # noqa: E402


def measure(size: int, images: int, shortcut: str | None, masks: bool) -> float:
    """Images per second over ``images`` items, after a short warm-up."""
    data = SyntheticCXR(n=images + 20, image_size=size, shortcut=shortcut, masks=masks)
    for index in range(20):
        data[index]
    start = time.perf_counter()
    for index in range(20, images + 20):
        data[index]
    return images / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--shortcut", choices=["marker", "pacemaker"], default=None)
    parser.add_argument("--masks", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rate = measure(args.size, args.images, args.shortcut, args.masks)
    print(f"SyntheticCXR {args.size}px shortcut={args.shortcut} masks={args.masks}: {rate:.0f} images/s (one core)")


if __name__ == "__main__":
    main()
