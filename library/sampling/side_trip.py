"""`SideTrip`: what a side computation during training (sample images, the drift probe) uses of the run."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from accelerate import Accelerator

from library.families.family import ModelFamily
from library.sampling.state_guard import outside_training


@dataclass(frozen=True)
class SideTrip:
    """The models and the network being trained, where they run, the run's generator, and how
    prompts are encoded (`--clip_skip`, `--max_token_length`)."""

    models: ModelFamily
    network: Any
    accelerator: Accelerator
    generator: torch.Generator
    clip_skip: int | None = None
    max_token_length: int | None = None

    @contextlib.contextmanager
    def outside_training(self, with_vae: bool = False) -> Iterator[None]:
        """No gradients, eval mode, the text encoders beside the U-Net (cached text-encoder outputs
        leave them on the CPU during training); afterwards training goes on exactly as if nothing had
        run (`library.sampling.state_guard`)."""
        models = (self.models.unet, *self.models.text_encoders, *((self.models.vae,) if with_vae else ()))
        with outside_training(*models, network=self.network, generator=self.generator), \
                _text_encoders_on(self.models.text_encoders, self.models.unet.device):
            yield


@contextlib.contextmanager
def _text_encoders_on(text_encoders: list[torch.nn.Module], device: torch.device) -> Iterator[None]:
    """Each text encoder on `device` for the block, then back where it was."""
    places = [encoder.device for encoder in text_encoders]
    for encoder in text_encoders:
        encoder.to(device)
    try:
        yield
    finally:
        for encoder, place in zip(text_encoders, places):
            encoder.to(place)
