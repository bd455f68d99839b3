"""The process group: one process, or many launched by torchrun, seen through one object.

``launch()`` reads torchrun's environment variables (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT), refuses a half-configured launch with a message that names
what is missing, starts torch.distributed (NCCL on CUDA, gloo on the CPU) and makes the
group ``current()``. Without those variables the group is a single process, and every
collective below is the identity: library code calls them unconditionally, never
``if rank == 0``.

How the work is split (docs/training.md#how-the-work-is-split):
- ``shard(n, unit)``: a contiguous range of rows for this process, cut at multiples of
  ``unit`` (a batch size), so that every image is computed in the same batch as in one
  process and gathered results come back in dataset order, without padding duplicates.
- ``gather_rows``: every process's rows, concatenated in rank order (lengths may differ).
- ``total``: an element-wise sum over processes; ``broadcast_module``: rank 0's weights.
- ``is_main``: the process that writes files, prints and shows progress bars.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

# torchrun's variables, and what each launch needs besides RANK and WORLD_SIZE.
_ADDRESS = ("MASTER_ADDR", "MASTER_PORT")
_LAUNCH_HINT = ("launch every process with torchrun (`torchrun --nproc_per_node=N -m csr_widgets ...`, which sets "
                "RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT), or unset RANK and WORLD_SIZE to run one process")


class LaunchError(RuntimeError):
    """A distributed launch whose environment cannot work (the message says what to set)."""


@dataclass(frozen=True)
class ProcessGroup:
    """This process's place in the run: rank in [0, world_size), its GPU (local_rank)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None  # None: a single process, torch.distributed not started

    @property
    def is_main(self) -> bool:
        """The process that writes the run folder, prints and shows progress bars."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def device(self) -> torch.device:
        """Where this process's collectives run: its GPU for NCCL, else the CPU."""
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")

    # ------------------------------------------------------------------ splitting work
    def shard(self, n: int, unit: int = 1) -> range:
        """This process's contiguous rows of ``n``: whole blocks of ``unit`` rows (the last
        block may be short), dealt out in order, the first ranks taking one more when they
        do not divide evenly. Ranks beyond the last block get an empty range."""
        if unit < 1:
            raise ValueError(f"unit must be >= 1, got {unit}.")
        blocks = -(-n // unit)
        per, extra = divmod(blocks, self.world_size)
        first = self.rank * per + min(self.rank, extra)
        last = first + per + (self.rank < extra)
        return range(min(first * unit, n), min(last * unit, n))

    # ------------------------------------------------------------------ collectives
    def gather_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every process's ``tensor`` (n_r, ...) concatenated along dim 0 in rank order.
        The row counts may differ; the other dimensions must agree."""
        if not self.distributed:
            return tensor
        source = tensor.device
        local = tensor.to(self.device).contiguous()
        cast = local.dtype == torch.bool  # gloo and NCCL move numbers, not bools
        if cast:
            local = local.to(torch.uint8)
        counts = [torch.zeros(1, dtype=torch.long, device=self.device) for _ in range(self.world_size)]
        dist.all_gather(counts, torch.tensor([len(local)], device=self.device))
        counts = [int(c) for c in counts]
        padded = local.new_zeros((max(counts), *local.shape[1:]))
        padded[: len(local)] = local
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        rows = torch.cat([part[:count] for part, count in zip(parts, counts)])
        return (rows.bool() if cast else rows).to(source)

    def total(self, tensor: torch.Tensor) -> torch.Tensor:
        """The element-wise sum of ``tensor`` over all processes (a new tensor)."""
        if not self.distributed:
            return tensor.clone()
        summed = tensor.to(self.device).clone()
        dist.all_reduce(summed)
        return summed.to(tensor.device)

    def mean(self, value: float) -> float:
        """The mean of a number over all processes (e.g. each one's mean loss)."""
        return float(self.total(torch.tensor([float(value)], dtype=torch.float64))) / self.world_size

    def broadcast_module(self, module: nn.Module) -> None:
        """Every parameter and buffer of ``module`` set to rank 0's values."""
        if not self.distributed:
            return
        with torch.no_grad():
            for tensor in list(module.parameters()) + list(module.buffers()):
                value = tensor.detach().to(self.device).clone()
                dist.broadcast(value, src=0)
                tensor.copy_(value.to(tensor.device))

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier(device_ids=[self.local_rank] if self.backend == "nccl" else None)

    @contextmanager
    def main_first(self) -> Iterator[None]:
        """Run the block on rank 0, then on the others (e.g. a download that fills a cache)."""
        if not self.is_main:
            self.barrier()
        try:
            yield
        finally:
            if self.is_main:
                self.barrier()

    def gather_frame(self, frame):
        """A pandas DataFrame of every process's rows, in rank order (a process without rows
        may pass an empty frame without columns). Numeric and boolean columns travel as
        float64 tensors (exact for floats and for integers below 2**53), other columns as
        JSON; dtypes are restored from the first process with rows. Nothing is pickled."""
        if not self.distributed:
            return frame
        import pandas as pd

        schema = [[str(name), str(dtype)] for name, dtype in frame.dtypes.items()] if len(frame) else None
        schemas = [json.loads(text) for text in self._gather_texts(json.dumps(schema))]
        schema = next((s for s in schemas if s is not None), None)
        if schema is None:
            return frame
        columns = {}
        for name, dtype in schema:
            numeric = pd.api.types.is_numeric_dtype(pd.Series(dtype=dtype)) or dtype == "bool"
            values = frame[name] if len(frame) else pd.Series([], dtype=dtype)
            if numeric:
                columns[name] = self.gather_rows(torch.tensor(values.to_numpy(np.float64))).numpy()
            else:
                columns[name] = [v for text in self._gather_texts(json.dumps(values.tolist())) for v in json.loads(text)]
        result = pd.DataFrame(columns).astype({name: dtype for name, dtype in schema if dtype != "object"})
        result.attrs.update(frame.attrs)
        return result

    def _gather_texts(self, text: str) -> list[str]:
        data = torch.frombuffer(bytearray(text.encode()), dtype=torch.uint8)
        lengths = self.gather_rows(torch.tensor([len(data)])).tolist()
        joined = bytes(self.gather_rows(data).numpy())
        bounds = np.cumsum([0] + lengths)
        return [joined[a:b].decode() for a, b in zip(bounds[:-1], bounds[1:])]


_CURRENT = ProcessGroup()


def current() -> ProcessGroup:
    """The process group of this run (a single process unless ``launch`` started one)."""
    return _CURRENT


def launch(environ: Mapping[str, str] | None = None, backend: str | None = None,
           timeout: timedelta = timedelta(minutes=30)) -> ProcessGroup:
    """Join the run torchrun launched, from its environment variables; a single process
    when none are set. Makes the group ``current()`` and returns it.

    backend: None picks NCCL when CUDA is available, else gloo. timeout: how long a
    collective waits for the slowest process (stages 2-3 run on every process, so no
    process waits long for another).
    """
    global _CURRENT
    environ = os.environ if environ is None else environ
    if dist.is_available() and dist.is_initialized():  # already running (e.g. a second command in one process)
        return _CURRENT
    group = _from_environment(environ, backend)
    if group.distributed:
        if group.backend == "nccl":
            torch.cuda.set_device(group.local_rank)
        dist.init_process_group(group.backend, rank=group.rank, world_size=group.world_size, timeout=timeout)
    _CURRENT = group
    return group


def shutdown() -> None:
    """Leave the process group (at the end of a command); ``current()`` is one process again."""
    global _CURRENT
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _CURRENT = ProcessGroup()


def _from_environment(environ: Mapping[str, str], backend: str | None) -> ProcessGroup:
    """The group torchrun's variables describe, or a LaunchError naming what is missing."""
    given = {name: environ.get(name) for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", *_ADDRESS)}
    if given["RANK"] is None and given["WORLD_SIZE"] is None:
        return ProcessGroup()
    for name in ("RANK", "WORLD_SIZE"):
        if given[name] is None:
            other = "WORLD_SIZE" if name == "RANK" else "RANK"
            raise LaunchError(f"{other}={given[other]} is set but {name} is not: a half-configured launch; {_LAUNCH_HINT}.")
    numbers = {}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        if given[name] is not None:
            try:
                numbers[name] = int(given[name])
            except ValueError:
                raise LaunchError(f"{name}={given[name]!r} is not an integer; {_LAUNCH_HINT}.") from None
    rank, world = numbers["RANK"], numbers["WORLD_SIZE"]
    if world < 1 or not 0 <= rank < world:
        raise LaunchError(f"RANK={rank} and WORLD_SIZE={world}: need 0 <= RANK < WORLD_SIZE; {_LAUNCH_HINT}.")
    if world == 1:
        return ProcessGroup()
    missing = [name for name in _ADDRESS if not given[name]]
    if missing:
        raise LaunchError(f"WORLD_SIZE={world} but {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set: "
                          f"the processes cannot find each other; {_LAUNCH_HINT}.")
    local_rank = numbers.get("LOCAL_RANK", rank)
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and local_rank >= torch.cuda.device_count():
        raise LaunchError(f"LOCAL_RANK={local_rank} but this machine has {torch.cuda.device_count()} GPU(s): "
                          "start at most one process per GPU (--nproc_per_node).")
    return ProcessGroup(rank, world, local_rank, backend)
