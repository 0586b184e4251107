"""The `--network_module` network of a run: imported, built on the model family's parts, attached,
and its optimizer parameter groups (the kohya network-module contract, `library.cat.network_protocol`)."""

from __future__ import annotations

import importlib
import logging
import time

import torch

from library.config.train_config import TrainConfig
from library.errors import UserInputError
from library.families.family import ModelFamily
from library.training.network_errors import (
    check_adapts_something,
    creation_error,
    network_description,
    off_advice,
)
from library.training.network_guard import OffProbe

logger = logging.getLogger(__name__)

# --mixed_precision -> the weights' dtype (the frozen models; the network too with --full_fp16/--full_bf16)
DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# sd-scripts' own module names, which GUIs write (networks.lora_flux for FLUX.1): ours is the drop-in
# with the same files and args.
NETWORK_MODULE_ALIASES = {"networks.lora": "networks.lora_cat", "networks.lora_flux": "networks.lora_cat"}


def import_network_module(name: str):
    """The `--network_module`: sd-scripts' `networks.lora` and `networks.lora_flux` mean ours; anything else
    is imported as named."""
    name = NETWORK_MODULE_ALIASES.get(name, name)
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        raise UserInputError(
            f"--network_module {name}: cannot import it ({error}); use networks.lora_cat, or install the package "
            "that provides it (e.g. pip install lycoris-lora for lycoris.kohya)."
        ) from None


def build_network(config: TrainConfig, models: ModelFamily, device: torch.device):
    """The `--network_module` network, built, attached to `models` and trainable (with --base_weights merged
    in first and --network_weights loaded), on `device`; refused with a sentence when its arguments do not
    fit this model or when its multiplier 0 is not the base model (`library.training.network_guard`)."""
    module = import_network_module(config.network.module)
    vae, text_encoder, unet = models.vae, models.network_text_encoder, models.unet
    for path, multiplier in zip(config.network.base_weights, config.network.base_weights_multiplier):
        merger, weights_sd = module.create_network_from_weights(multiplier, path, vae, text_encoder, unet, for_inference=True)
        merger.merge_to(text_encoder, unet, weights_sd, None, device)
        logger.info("merged --base_weights %s at multiplier %s", path, multiplier)
    # The base model's own prediction, taken before the network exists: nothing of it can leak in.
    started = time.perf_counter()
    probe = OffProbe.of_bare_model(models, device, config.model.clip_skip, config.model.max_token_length,
                                   _autocast_dtype(config))
    probe_seconds = time.perf_counter() - started
    network = _create_network(module, config, vae, text_encoder, unet)
    train_unet = not config.network.train_text_encoder_only
    train_text_encoder = not config.network.train_unet_only
    network.apply_to(text_encoder, unet, train_text_encoder, train_unet)
    check_adapts_something(network, config.network.module, config.network.args, train_unet)
    if config.network.weights:
        network.load_weights(config.network.weights)
    if config.run.gradient_checkpointing:
        network.enable_gradient_checkpointing()
    network.prepare_grad_etc(text_encoder, unet)
    if config.run.full_fp16 or config.run.full_bf16:
        network.to(DTYPES[config.run.mixed_precision])
    network = network.to(device)
    started = time.perf_counter()
    difference = probe.check(network, network_description(config.network.module, config.network.args),
                             off_advice(config.network.module, config.network.args))
    logger.info("multiplier 0 is the base model (max difference %.3g on a probe batch; checked in %.2f s)",
                difference, probe_seconds + time.perf_counter() - started)
    return network


def _create_network(module, config: TrainConfig, vae, text_encoder, unet):
    """`create_network` (or `create_network_from_weights` for --dim_from_weights); the module's refusals
    of its arguments (asserts, failed conversions) become sentences (`library.training.network_errors`)."""
    kwargs = dict(config.network.args)
    if "dropout" not in kwargs:
        kwargs["dropout"] = config.network.dropout
    try:
        if config.network.dim_from_weights:
            network, _ = module.create_network_from_weights(1.0, config.network.weights, vae, text_encoder, unet, **kwargs)
            return network
        return module.create_network(1.0, config.network.dim, config.network.alpha, vae, text_encoder, unet, **kwargs)
    except Exception as error:
        sentence = creation_error(config.network.module, config.network.args, error)
        if sentence is None or sentence is error:
            raise
        raise sentence from None


def _autocast_dtype(config: TrainConfig) -> torch.dtype | None:
    """The dtype training's autocast computes in (accelerate's, from --mixed_precision)."""
    return None if config.run.mixed_precision == "no" else DTYPES[config.run.mixed_precision]


def optimizer_groups(network, config: TrainConfig) -> tuple[list[dict], list[str]]:
    result = network.prepare_optimizer_params(
        config.optimizer.text_encoder_lr, config.optimizer.unet_lr, config.optimizer.learning_rate
    )
    if isinstance(result, tuple):
        return result
    return result, [f"group{i}" for i in range(len(result))]
