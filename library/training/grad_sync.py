"""Gradient averaging across data-parallel processes, once per optimizer step.

The network is not wrapped in DistributedDataParallel: DDP arms its gradient hooks in `forward`,
and a LoRA network's forward is never called (its adapters run inside the U-Net and the text
encoder), so under DDP the processes silently train apart. CAT's sequential mode also runs two
backward passes per batch. Averaging the adapters' gradients by hand, in one flat buffer, right
before the optimizer step, gives exactly one collective per optimizer step in every mode.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


def average_gradients(params: Iterable[torch.nn.Parameter], world_size: int) -> None:
    """Replace each parameter's gradient by its mean over the `world_size` processes."""
    if world_size <= 1:
        return
    params = [p for p in params if p.requires_grad]
    for p in params:
        if p.grad is None:  # e.g. module dropout skipped it here but not on another process
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat.div_(world_size)
    for grad, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
        grad.copy_(synced)
