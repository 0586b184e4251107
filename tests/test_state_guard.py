"""`outside_training`: a side computation leaves every random stream, the multiplier and the modes as they were."""

import random

import numpy as np
import pytest
import torch
from torch import nn

from library.sampling.state_guard import outside_training


class Adapter(nn.Module):
    """The part of the network contract the guard uses: a multiplier and set_multiplier."""

    def __init__(self) -> None:
        super().__init__()
        self.dropout = nn.Dropout(0.5)
        self.multiplier = 0.75

    def set_multiplier(self, multiplier: float) -> None:
        self.multiplier = multiplier


def _draws(generator: torch.Generator) -> tuple:
    return (torch.rand(3).tolist(), random.random(), np.random.rand(), torch.rand(2, generator=generator).tolist())


def test_random_streams_multiplier_and_modes_come_back():
    unet = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.1))
    unet.train()
    unet[0].eval()  # a mixed state must come back exactly, module by module
    network, generator = Adapter(), torch.Generator().manual_seed(5)
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    expected = _draws(generator)

    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    generator.manual_seed(5)
    with outside_training(unet, network=network, generator=generator):
        assert not unet.training and not unet[1].training and not network.dropout.training
        assert not torch.is_grad_enabled()
        _draws(generator)
        network.set_multiplier(0.0)
    assert _draws(generator) == expected
    assert network.multiplier == 0.75
    assert (unet.training, unet[0].training, unet[1].training, network.training) == (True, False, True, True)


def test_streams_come_back_when_the_side_computation_fails():
    network, generator = Adapter(), torch.Generator().manual_seed(1)
    state = torch.get_rng_state()
    with pytest.raises(RuntimeError):
        with outside_training(network=network, generator=generator):
            torch.rand(4)
            network.set_multiplier(0.0)
            raise RuntimeError("boom")
    assert torch.equal(torch.get_rng_state(), state) and network.multiplier == 0.75
