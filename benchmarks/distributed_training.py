"""Stage-1 throughput: one process against two (torch.distributed, gloo, on this CPU).

Stage 1 (backbone and concept head, forward + backward + AdamW) over the same in-memory
images, timed for: one process with one thread, one process with two threads, and two
processes of one thread each (DistributedDataParallel, a DistributedSampler, the same
global batch). Reports images per second and the ratios. The images are rendered before
the clock starts, so decoding is not part of it (benchmarks/prepared_decoding.py is).

    python benchmarks/distributed_training.py [--images 256] [--size 128] [--batch 32] [--epochs 2]
"""
from __future__ import annotations

import argparse
import os
import socket
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from csr_widgets import CSRConfig, CSRModel
from csr_widgets._distributed import launch, shutdown
from csr_widgets.data import SyntheticCXR
from csr_widgets.training import TrainingPlan
from csr_widgets.training.fitting import train_concepts


class InMemory(torch.utils.data.Dataset):
    """SyntheticCXR items rendered once, so that the timing is the training step alone."""

    def __init__(self, images: int, size: int):
        source = SyntheticCXR(n=images, image_size=size)
        self.items = [source[i] for i in range(images)]
        self.concepts, self.classes = source.concepts, source.classes

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


def images_per_second(args, batch: int) -> float:
    data = InMemory(args.images, args.size)
    torch.manual_seed(0)
    model = CSRModel(CSRConfig(concepts=data.concepts, classes=data.classes, feature_stage=2, image_size=args.size,
                               prototypes_per_concept=10, embedding_dim=64))
    plan = TrainingPlan(concept_epochs=args.epochs, batch_size=batch)
    start = time.perf_counter()
    train_concepts(model, data, None, plan, progress=False)
    return args.images * args.epochs / (time.perf_counter() - start)


def _process(rank: int, port: int, args, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    group = launch(backend="gloo")
    try:
        rate = images_per_second(args, args.batch // 2)  # the same global batch
        if group.is_main:
            Path(out).write_text(str(rate))
    finally:
        shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32, help="global batch (two processes: half each)")
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    rates = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        rates[f"1 process, {threads} thread(s)"] = images_per_second(args, args.batch)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as folder:
        out = f"{folder}/rate"
        mp.spawn(_process, args=(port, args, out), nprocs=2, join=True)
        rates["2 processes, 1 thread each"] = float(Path(out).read_text())
    for name, rate in rates.items():
        print(f"{name:<28} {rate:7.1f} images/s")
    two = rates["2 processes, 1 thread each"]
    print(f"2 processes / 1 process 1 thread:  {two / rates['1 process, 1 thread(s)']:.2f}x")
    print(f"2 processes / 1 process 2 threads: {two / rates['1 process, 2 thread(s)']:.2f}x")


if __name__ == "__main__":
    main()
