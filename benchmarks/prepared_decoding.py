"""Reading VinDr-CXR from its DICOMs against reading the prepared cache (`csr-widgets prepare`).

Writes ``--images`` 12-bit DICOMs of ``--stored`` px (half of them MONOCHROME1; real
VinDr-CXR films are ~3000 px), prepares them at ``--size``, then times one pass over every
item of each, in one process without workers: what each training epoch pays per image.

    python benchmarks/prepared_decoding.py [--images 24] [--stored 2048] [--size 512]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from csr_widgets.data import SyntheticCXR
from csr_widgets.data.exporters import write_vindr
from csr_widgets.data.prepared import prepare
from csr_widgets.data.sources import parse_source


def seconds_per_pass(dataset) -> float:
    start = time.perf_counter()
    for index in range(len(dataset)):
        dataset[index]
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--stored", type=int, default=2048, help="side of the stored DICOMs")
    parser.add_argument("--size", type=int, default=512, help="the training size")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        root, cache = Path(folder) / "vindr", Path(folder) / "cache"
        write_vindr(SyntheticCXR(n=args.images, image_size=64), root, image_size=args.stored, photometric="mixed")
        write_vindr(SyntheticCXR(n=2, image_size=64, split="test"), root, split="test", image_size=args.stored)
        source = parse_source(f"vindr:{root}")
        start = time.perf_counter()
        prepare(source, cache, args.size, roles=("train",), progress=False)
        once = time.perf_counter() - start
        decoded = source.dataset("train", image_size=args.size, channels=1, split="train")
        prepared = parse_source(f"prepared:{cache}").dataset("train", image_size=args.size, channels=1)
        seconds_per_pass(prepared)  # the page cache warm for both: the DICOMs were just written
        dicom, npy = seconds_per_pass(decoded), seconds_per_pass(prepared)
    n = args.images
    print(f"{n} images, {args.stored} px 12-bit DICOM -> {args.size} px")
    print(f"from DICOM:         {1e3 * dicom / n:8.2f} ms/image  ({n / dicom:7.1f} images/s)")
    print(f"from the cache:     {1e3 * npy / n:8.2f} ms/image  ({n / npy:7.1f} images/s)")
    print(f"ratio:              {dicom / npy:8.1f}x faster from the cache")
    print(f"prepare (once):     {1e3 * once / n:8.2f} ms/image")


if __name__ == "__main__":
    main()
