"""How the package runs a model outside training: eval mode, no autograd, one thread.

``evaluating(model)`` is the one place that puts a model in eval mode for a block of work
and restores it afterwards, also when the block raises. It restores every submodule's own
flag, not one flag for all: training keeps frozen parts in eval mode while others train
(``training.stages.set_stage``), and a blanket ``model.train(flag)`` afterwards would
wake the frozen backbone's batch norm.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
from torch import nn


@contextmanager
def evaluating(model: nn.Module,
               autograd: Callable[[], AbstractContextManager] | None = torch.inference_mode) -> Iterator[nn.Module]:
    """Eval mode for the block (batch norm on its running statistics, no dropout); each
    submodule's training flag as it was afterwards, whatever happens inside.

    autograd: the block's grad mode. ``torch.inference_mode`` (default: nothing computed
    inside ever enters autograd; widgets and evaluation), ``torch.no_grad`` (the results
    may feed a later training step, e.g. cached features), or None (gradients flow, e.g.
    the grid probe differentiates a backbone in eval mode).
    """
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with autograd() if autograd is not None else nullcontext():
            yield model
    finally:
        for module, training in flags:
            module.training = training


@contextmanager
def single_threaded() -> Iterator[None]:
    """Run tiny torch operations on one thread, restoring the thread count afterwards.

    For the widgets' per-event work (``reason`` on one image, a heatmap) a thread pool
    only adds overhead: threaded BLAS measured 5x slower (docs/decisions.md#one-thread-per-event).
    """
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
