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
from accelerate.utils import reduce


def average_gradients(params: Iterable[torch.nn.Parameter], world_size: int) -> None:
    """Replace each parameter's gradient by its mean over the `world_size` processes (one all-reduce).

    A parameter no process gave a gradient keeps none, as with one process (an optimizer then
    leaves it alone, weight decay included); one that only some processes used averages their
    gradients with zeros from the others, as DistributedDataParallel does.
    """
    if world_size <= 1:
        return
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    dtype = next((p.grad.dtype for p in params if p.grad is not None), params[0].dtype)
    used = torch.tensor([p.grad is not None for p in params], dtype=dtype, device=params[0].device)
    grads = [p.grad if p.grad is not None else torch.zeros_like(p, dtype=dtype) for p in params]
    total = reduce(torch.cat([used] + [grad.reshape(-1) for grad in grads]), reduction="sum")
    counts, offset = total[: len(params)], len(params)
    for param, count in zip(params, counts.tolist()):
        size = param.numel()
        param.grad = None if count == 0 else (total[offset : offset + size] / world_size).view_as(param).to(dtype)
        offset += size
