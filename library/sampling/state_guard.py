"""`outside_training`: run a side computation (sample images, a metric) in the middle of training
without changing what training does next.

Training draws from four global random streams (torch CPU, CUDA, Python `random`, NumPy) and from
the run's own generator, reads the network's multiplier, and behaves differently in train and eval
mode (dropout, gradient checkpointing). A side computation may touch any of these; the block puts
every one of them back, so a run with samples ends with bitwise the same LoRA as a run without.
"""

from __future__ import annotations

import contextlib
import random
from typing import Iterator

import numpy as np
import torch
from torch import nn

from library.cat.network_protocol import multiplier_set_to, unwrap_network


@contextlib.contextmanager
def outside_training(*models: nn.Module, network, generator: torch.Generator) -> Iterator[None]:
    """Inside: no gradients, `models` and `network` in eval mode. After: every random stream, the
    multiplier and each submodule's train/eval flag exactly as before."""
    modes = [(module, module.training) for model in (*models, unwrap_network(network)) for module in model.modules()]
    streams = _random_streams(generator)
    try:
        with torch.no_grad(), multiplier_set_to(network, unwrap_network(network).multiplier):
            for model in (*models, unwrap_network(network)):
                model.eval()
            yield
    finally:
        _restore_random_streams(streams, generator)
        for module, training in modes:
            module.training = training


def _random_streams(generator: torch.Generator) -> dict:
    streams = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
               "generator": generator.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        streams["cuda"] = torch.cuda.get_rng_state_all()
    return streams


def _restore_random_streams(streams: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(streams["torch"])
    random.setstate(streams["python"])
    np.random.set_state(streams["numpy"])
    generator.set_state(streams["generator"])
    if "cuda" in streams:
        torch.cuda.set_rng_state_all(streams["cuda"])
