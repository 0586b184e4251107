"""The kohya network-module contract, written down once.

`--network_module some.module` names a Python module with two factory functions
(`NetworkModuleFactory`); they return a network object (`Network`). The trainer depends on these
Protocols, not on `hasattr` checks scattered through the loop. sd-scripts also calls a few optional
methods (`prepare_network`, `on_step_start`); this trainer needs none of them.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator, Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class Network(Protocol):
    """What a network object returned by `create_network` must offer."""

    multiplier: float  # the strength every adapter runs at; `multiplier_set_to` reads it to restore it

    def apply_to(self, text_encoder: Any, unet: nn.Module, apply_text_encoder: bool = True, apply_unet: bool = True) -> None:
        """Attach the adapters to the models (only the parts asked for)."""

    def load_weights(self, file: str) -> Any:
        """Load adapter weights from a file (`--network_weights`), ignoring missing/extra layers."""

    def prepare_optimizer_params(
        self, text_encoder_lr: float | list[float] | None, unet_lr: float | None, default_lr: float | None
    ) -> tuple[list[dict], list[str]] | list[dict]:
        """Optimizer parameter groups (and, optionally, a description of each)."""

    def enable_gradient_checkpointing(self) -> None:
        """Prepare the adapters for a model trained with gradient checkpointing."""

    def prepare_grad_etc(self, text_encoder: Any, unet: nn.Module) -> None:
        """Make the adapter parameters trainable."""

    def on_epoch_start(self, text_encoder: Any, unet: nn.Module) -> None:
        """Called at every epoch start (puts the adapters in training mode)."""

    def get_trainable_params(self) -> Iterable[nn.Parameter]:
        """The parameters to clip gradients of."""

    def save_weights(self, file: str, dtype: torch.dtype | None, metadata: dict[str, str] | None) -> None:
        """Write the adapter file, every tensor cast to `dtype`."""

    def set_multiplier(self, multiplier: float) -> None:
        """Set the strength of every adapter; 0 must give the base model."""

    def apply_max_norm_regularization(self, max_norm_value: float, device: torch.device) -> tuple[int, float, float]:
        """Scale adapters whose norm exceeds `max_norm_value`: (keys scaled, mean norm, max norm)."""

    def merge_to(self, text_encoder: Any, unet: nn.Module, weights_sd: dict[str, torch.Tensor], dtype: Any, device: Any) -> None:
        """Fold the adapters of `weights_sd` into the base weights (`--base_weights`)."""

    def is_mergeable(self) -> bool:
        """Whether `merge_to` is supported."""


@runtime_checkable
class NetworkModuleFactory(Protocol):
    """What the module named by `--network_module` must offer."""

    def create_network(
        self, multiplier: float, network_dim: int | None, network_alpha: float | None, vae: nn.Module,
        text_encoder: Any, unet: nn.Module, neuron_dropout: float | None = None, **kwargs: Any,
    ) -> Network: ...

    def create_network_from_weights(
        self, multiplier: float, file: str, vae: nn.Module, text_encoder: Any, unet: nn.Module,
        weights_sd: dict[str, torch.Tensor] | None = None, for_inference: bool = False, **kwargs: Any,
    ) -> tuple[Network, dict[str, torch.Tensor]]: ...


def unwrap_network(network: Any) -> Any:
    """The network itself, out of DistributedDataParallel / DataParallel / torch.compile wrappers.

    The multiplier must be switched on this object: a data-parallel wrapper has no
    `set_multiplier`, and calling it there crashes multi-GPU runs.
    """
    while True:
        if isinstance(network, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            network = network.module
        elif hasattr(network, "_orig_mod"):
            network = network._orig_mod
        else:
            return network


@contextlib.contextmanager
def multiplier_set_to(network: Any, multiplier: float) -> Iterator[None]:
    """Set the (unwrapped) network's multiplier inside the block, then restore the previous one.

    The previous value is read from the network, never assumed to be 1.0. `multiplier_set_to(net, 0)`
    is the base model: every adapter off, in the U-Net and in the text encoder.
    """
    network = unwrap_network(network)
    previous = network.multiplier
    network.set_multiplier(multiplier)
    try:
        yield
    finally:
        network.set_multiplier(previous)
