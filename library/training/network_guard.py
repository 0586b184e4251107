"""`OffProbe`: refuse a `--network_module` network whose multiplier 0 is not the base model.

CAT's reference (`library.cat.objective.base_prediction`), the drift probe and the base images of
`--sample_cat_compare` all take "the network at multiplier 0" as the base model. A module can break
that silently: LyCORIS' DoRA (`dora_wd=true`) keeps its weight decomposition at multiplier 0.

So before training, one small probe batch (random latents, timesteps and two captions) goes through
the bare model, before the network is even created, and again through the model with the network
attached and at multiplier 0. A freshly built adapter is usually zero (LoRA's `up` weights), which
makes "off" equal "base" trivially; for the second pass every network parameter is therefore set to
random values, and put back exactly afterwards. The probe draws from its own generator; every global
random stream, each module's train/eval flag and the multiplier are left as they were, so a run
trains bitwise the same with the guard as without it.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from library.cat.network_protocol import multiplier_set_to, unwrap_network
from library.errors import UserInputError
from library.families.family import ModelFamily, compute_dtype

PROBE_SEED = 2404_07554  # the CAT paper's arXiv id: any fixed number would do
PROBE_CAPTIONS = ("a photo of a teapot on a wooden table", "")
PROBE_PIXELS = 64  # width and height of the probe images: 8x8 latents, enough for SD-family U-Nets
# Random adapter values of this size make a multiplier-0 path that still depends on them (DoRA) move
# the output by about its own magnitude, while a true switch stays bitwise at the base model.
PERTURBATION_STD = 0.5


@dataclass(frozen=True)
class OffProbe:
    """A fixed random batch and the bare model's prediction on it, taken before the network exists."""

    models: ModelFamily
    clip_skip: int | None
    autocast: torch.dtype | None  # the dtype training's autocast uses, None without mixed precision
    latents: Tensor
    timesteps: Tensor
    input_ids: Tensor
    bare: Tensor

    @classmethod
    def of_bare_model(cls, models: ModelFamily, device: torch.device, clip_skip: int | None = None,
                      max_token_length: int | None = None, autocast: torch.dtype | None = None) -> OffProbe:
        """Draw the probe batch and run the bare model on it, its captions encoded as training encodes
        them (clip skip, long-prompt windows); call before the network is created."""
        generator = torch.Generator().manual_seed(PROBE_SEED)
        shape = models.latent_shape(len(PROBE_CAPTIONS), PROBE_PIXELS, PROBE_PIXELS)
        latents = torch.randn(shape, generator=generator).to(device, compute_dtype(models.unet))
        steps = getattr(getattr(models.noise_scheduler, "config", None), "num_train_timesteps", 1000)
        timesteps = torch.randint(0, steps, (shape[0],), generator=generator).to(device)
        input_ids = models.tokenize(list(PROBE_CAPTIONS), max_token_length).to(device)
        with _untouched(models):
            bare = _prediction(models, clip_skip, autocast, latents, timesteps, input_ids)
        return cls(models, clip_skip, autocast, latents, timesteps, input_ids, bare)

    def off_difference(self, network: Any) -> float:
        """max |prediction with `network` at multiplier 0 - bare prediction|, with every network
        parameter set to random values for the pass (and restored bitwise after it)."""
        network = unwrap_network(network)
        with _untouched(self.models, network), _random_parameters(network), multiplier_set_to(network, 0.0):
            off = _prediction(self.models, self.clip_skip, self.autocast, self.latents, self.timesteps, self.input_ids)
        return _max_difference(off.float(), self.bare.float())

    def tolerance(self) -> float:
        """What "equal" allows: a few ulps of the output's dtype at its magnitude (a GPU kernel may
        round differently between two calls), never less than 1e-4 of it."""
        scale = max(1.0, self.bare.float().abs().max().item())
        return max(1e-4, 8 * torch.finfo(self.bare.dtype).eps) * scale

    def check(self, network: Any, description: str, advice: str = "") -> float:
        """The measured difference; a `UserInputError` naming `description` when it is not equality."""
        network = unwrap_network(network)
        if not (hasattr(network, "multiplier") and callable(getattr(network, "set_multiplier", None))):
            raise UserInputError(
                f"{description}: the network has no multiplier switch (a `multiplier` attribute and "
                "`set_multiplier(m)`); CAT's reference is the base model, taken as this network at multiplier 0. "
                "Use a module that has one, e.g. networks.lora_cat or lycoris.kohya."
            )
        difference, tolerance = self.off_difference(network), self.tolerance()
        if not difference <= tolerance:  # NaN is refused too
            raise UserInputError(
                f"{description}: at multiplier 0 this network is not the base model (max |off - base| = "
                f"{difference:.3g} on a probe batch with its adapters set to random values; at most "
                f"{tolerance:.2g} is allowed), so CAT's reference, the drift probe and the base images of "
                f"samples would silently be wrong. {advice}Use a network whose multiplier 0 switches every "
                "adapter off, e.g. networks.lora_cat, or LyCORIS algo=locon, loha or lokr without dora_wd."
            )
        return difference


def _prediction(models: ModelFamily, clip_skip: int | None, autocast: torch.dtype | None, latents: Tensor,
                timesteps: Tensor, input_ids: Tensor) -> Tensor:
    denoiser = models.denoiser(clip_skip)
    with torch.no_grad(), torch.autocast(latents.device.type, dtype=autocast, enabled=autocast is not None):
        return denoiser.predict(latents, timesteps, denoiser.encode(input_ids))


def _max_difference(off: Tensor, bare: Tensor) -> float:
    same = (off == bare) | (off.isnan() & bare.isnan())
    return torch.where(same, torch.zeros_like(off), (off - bare).abs()).max().item()


@contextlib.contextmanager
def _untouched(models: ModelFamily, network: nn.Module | None = None) -> Iterator[None]:
    """Inside: every model (and the network) in eval mode. After: each module's train/eval flag and
    every global random stream exactly as before."""
    parts = [models.unet, *models.text_encoders, *([network] if network is not None else [])]
    modes = [(module, module.training) for part in parts for module in part.modules()]
    cuda = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=cuda):
            for part in parts:
                part.eval()
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        for module, training in modes:
            module.training = training


@contextlib.contextmanager
def _random_parameters(network: nn.Module) -> Iterator[None]:
    """Every floating-point parameter set to seeded random values inside; every parameter and buffer
    copied back bitwise after (in place, so parameter identities, and what holds them, stay valid)."""
    tensors = [*network.parameters(), *network.buffers()]
    saved = [tensor.detach().clone() for tensor in tensors]
    generator = torch.Generator().manual_seed(PROBE_SEED + 1)
    try:
        with torch.no_grad():
            for parameter in network.parameters():
                if parameter.is_floating_point():
                    noise = torch.randn(parameter.shape, generator=generator) * PERTURBATION_STD
                    parameter.copy_(noise.to(parameter.device, parameter.dtype))
        yield
    finally:
        with torch.no_grad():
            for tensor, value in zip(tensors, saved):
                tensor.copy_(value)
