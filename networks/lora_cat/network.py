"""`LoRANetwork` and its two factories: every adapter of one model, as the kohya contract wants them.

It honours the whole network-module contract (`library.cat.network_protocol` in the CAT trainer),
writes files in the kohya format, and its multiplier is the switch CAT relies on: `set_multiplier(0)`
(or `with network.adapters_off():`) is exactly the base model, U-Net and text encoder alike.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections import defaultdict
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from .errors import UserInputError
from .file_format import LoRAFileEntry, describe_lora_state_dict, read_lora_file, save_lora_file
from .fit import FLUX, SD, SDXL, file_family, fits
from .flux_names import is_flux_transformer
from .fused_layer import FusedLoRAModule, LinearGroup
from .layer import LoRAModule
from .metadata import with_model_hashes
from .sgm_names import is_sdxl_unet
from .targets import (
    UNET_PREFIX,
    LoRATarget,
    diffusers_layout_unet_names,
    model_text_encoder_targets,
    unet_targets,
)
from .network_args import LoRANetworkConfig, parse_network_config

logger = logging.getLogger(__name__)


def create_network(
    multiplier: float,
    network_dim: int | None,
    network_alpha: float | None,
    vae: nn.Module,
    text_encoder: nn.Module | Sequence[nn.Module],
    unet: nn.Module,
    neuron_dropout: float | None = None,
    **kwargs: Any,
) -> "LoRANetwork":
    """Build a fresh LoRA network; `kwargs` are the `--network_args` (strings)."""
    config = parse_network_config(network_dim, network_alpha, neuron_dropout, kwargs)
    return LoRANetwork(_as_list(text_encoder), unet, config, multiplier)


def create_network_from_weights(
    multiplier: float,
    file: str | os.PathLike | None,
    vae: nn.Module,
    text_encoder: nn.Module | Sequence[nn.Module],
    unet: nn.Module,
    weights_sd: Mapping[str, torch.Tensor] | None = None,
    for_inference: bool = False,
    **kwargs: Any,
) -> tuple["LoRANetwork", dict[str, torch.Tensor]]:
    """Build the network a LoRA file describes (ranks, alphas, conv ranks from the file).

    The weights are not loaded here (the contract leaves that to `load_weights` / `merge_to`); the
    returned dict has this network's names (an SDXL file's diffusers-layout U-Net names become SGM).
    """
    if weights_sd is None:
        weights_sd, _ = read_lora_file(file)
    source = str(file) if file is not None else "weights_sd"
    family = model_family(unet)
    weights_sd = _in_network_layout(weights_sd, family, diffusers_layout_unet_names(unet), source)
    entries = describe_lora_state_dict(weights_sd, source)
    config = parse_network_config(None, None, kwargs.pop("dropout", None), kwargs)
    network = LoRANetwork(_as_list(text_encoder), unet, config, multiplier, file_entries=entries)
    _check_file_fits(network, entries, source)
    return network, dict(weights_sd)


class LoRANetwork(nn.Module):
    """All LoRA adapters of one model; registered under their kohya names."""

    def __init__(
        self,
        text_encoders: list[nn.Module],
        unet: nn.Module,
        config: LoRANetworkConfig,
        multiplier: float = 1.0,
        file_entries: Mapping[str, LoRAFileEntry] | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.multiplier = float(multiplier)
        self.gradient_checkpointing = False
        self.family = model_family(unet)
        # Some tools write SDXL U-Net layers under diffusers-layout names; files are read under SGM names.
        self._sgm_names = diffusers_layout_unet_names(unet)
        if self.family != SD and config.block_lr is not None:
            raise UserInputError(
                "network_args down_lr_weight/mid_lr_weight/up_lr_weight: block-wise learning rates are defined "
                f"here for the SD 1.x/2.x U-Net only, not yet for {self.family}'s; remove them for this model."
            )
        with_conv = config.conv_rank is not None or file_entries is not None
        # A file's own layers decide what exists (T5's `lora_te3_` included); else train_t5xxl does.
        te_targets = model_text_encoder_targets(unet, text_encoders, config.train_t5xxl or file_entries is not None)
        self.text_encoder_loras = self._create_modules(te_targets, file_entries)
        self.unet_loras = self._create_modules(unet_targets(unet, with_conv), file_entries)
        for lora in self.text_encoder_loras + self.unet_loras:
            self.add_module(lora.lora_name, lora)
        logger.info(
            "LoRA network: %d text-encoder and %d U-Net modules", len(self.text_encoder_loras), len(self.unet_loras)
        )

    def _create_modules(self, targets: list[LoRATarget], file_entries: Mapping[str, LoRAFileEntry] | None) -> list[LoRAModule]:
        modules = []
        for target in targets:
            rank_alpha = self._rank_alpha(target, file_entries)
            if rank_alpha is None:
                continue
            kind = FusedLoRAModule if isinstance(target.module, LinearGroup) else LoRAModule
            modules.append(
                kind(
                    target.lora_name, target.module, rank_alpha[0], rank_alpha[1], self.multiplier,
                    self.config.dropout, self.config.rank_dropout, self.config.module_dropout,
                )
            )
        return modules

    def _rank_alpha(self, target: LoRATarget, file_entries: Mapping[str, LoRAFileEntry] | None) -> tuple[int, float | None] | None:
        """(rank, alpha) for a target, or None when it gets no adapter."""
        if file_entries is not None:
            entry = file_entries.get(target.lora_name)
            return (entry.rank, entry.alpha) if entry else None
        block_lr = self.config.block_lr
        if block_lr is not None and target.lora_name.startswith(UNET_PREFIX) and block_lr.is_zero(target.lora_name):
            return None  # sd-scripts does not create modules of blocks trained at lr weight 0
        if target.is_conv_kxk:
            return (self.config.conv_rank, self.config.conv_alpha) if self.config.conv_rank else None
        return self.config.rank, self.config.alpha

    @property
    def all_loras(self) -> list[LoRAModule]:
        return self.text_encoder_loras + self.unet_loras

    # --- the contract: attaching and training ----------------------------------------------------

    def apply_to(self, text_encoder: Any, unet: nn.Module, apply_text_encoder: bool = True, apply_unet: bool = True) -> None:
        """Attach the adapters; parts not applied are dropped from the network (and from its file)."""
        if not apply_text_encoder:
            self._drop(self.text_encoder_loras)
            self.text_encoder_loras = []
        if not apply_unet:
            self._drop(self.unet_loras)
            self.unet_loras = []
        for lora in self.all_loras:
            lora.apply_to()

    def _drop(self, loras: list[LoRAModule]) -> None:
        for lora in loras:
            lora.restore()
            delattr(self, lora.lora_name)

    def restore(self) -> None:
        """Detach every adapter: the models run their own forward again."""
        for lora in self.all_loras:
            lora.restore()

    def prepare_grad_etc(self, text_encoder: Any, unet: nn.Module) -> None:
        self.requires_grad_(True)

    def on_epoch_start(self, text_encoder: Any, unet: nn.Module) -> None:
        self.train()

    def get_trainable_params(self) -> list[nn.Parameter]:
        return list(self.parameters())

    def enable_gradient_checkpointing(self) -> None:
        """Nothing to wrap: the adapters run inside the blocks that the model itself checkpoints.

        The recomputation reads the multiplier of the moment, which is why the CAT step finishes
        its no-grad reference and restores the multiplier before any back-propagated pass.
        """
        self.gradient_checkpointing = True

    def prepare_optimizer_params(
        self, text_encoder_lr: float | list[float] | None, unet_lr: float | None, default_lr: float | None
    ) -> tuple[list[dict], list[str]]:
        """Parameter groups: each text encoder, U-Net (per block with block lr weights), LoRA+ `up` groups.

        `text_encoder_lr` is one rate for every text encoder or one per text encoder (SDXL: TE1, TE2;
        a list shorter than the encoders gives the rest its first rate). A group whose learning rate
        is 0 is left out, so its adapters stay at their initial value.
        """
        self.requires_grad_(True)
        groups: list[dict] = []
        descriptions: list[str] = []
        for index, (label, loras) in enumerate(self._text_encoder_groups()):
            te_lr = _per_text_encoder(text_encoder_lr, index)
            self._add_groups(groups, descriptions, loras, _lr_or(te_lr, default_lr), label, True)
        for label, loras, weight in self._unet_lr_blocks():
            self._add_groups(groups, descriptions, loras, _scaled(_lr_or(unet_lr, default_lr), weight), label, False)
        return groups, descriptions

    def _text_encoder_groups(self) -> list[tuple[str, list[LoRAModule]]]:
        """(label, adapters) per text encoder, in file order: "textencoder", or "textencoder1", "textencoder2"."""
        by_prefix: dict[str, list[LoRAModule]] = {}
        for lora in self.text_encoder_loras:
            by_prefix.setdefault(lora.lora_name.split("_")[1], []).append(lora)  # "te", "te1", "te2"
        if len(by_prefix) <= 1 and all(prefix == "te" for prefix in by_prefix):
            return [("textencoder", loras) for loras in by_prefix.values()]
        return [(f"textencoder{prefix.removeprefix('te')}", by_prefix[prefix]) for prefix in sorted(by_prefix)]

    def _unet_lr_blocks(self) -> list[tuple[str, list[LoRAModule], float]]:
        if not self.unet_loras:
            return []
        block_lr = self.config.block_lr
        if block_lr is None:
            return [("unet", self.unet_loras, 1.0)]
        blocks: dict[int | None, list[LoRAModule]] = defaultdict(list)
        for lora in self.unet_loras:
            blocks[block_lr.block_index(lora.lora_name)].append(lora)
        return [
            ("unet" if idx is None else f"unet_block{idx}", loras, block_lr.weight_for(loras[0].lora_name))
            for idx, loras in sorted(blocks.items(), key=lambda kv: -1 if kv[0] is None else kv[0])
        ]

    def _add_groups(self, groups, descriptions, loras, lr, label, text_encoder) -> None:
        ratio = self.config.loraplus_ratio(text_encoder)
        plain = [p for lora in loras for n, p in lora.named_parameters() if ratio is None or "lora_up" not in n]
        plus = [p for lora in loras for n, p in lora.named_parameters() if ratio is not None and "lora_up" in n]
        for params, group_lr, suffix in ((plain, lr, ""), (plus, _scaled(lr, ratio), " plus")):
            if not params or group_lr == 0:
                continue
            group = {"params": params}
            if group_lr is not None:
                group["lr"] = group_lr
            groups.append(group)
            descriptions.append(label + suffix)

    # --- the multiplier: the CAT switch ----------------------------------------------------------

    def set_multiplier(self, multiplier: float) -> None:
        self.multiplier = float(multiplier)
        for lora in self.all_loras:
            lora.multiplier = self.multiplier

    @contextlib.contextmanager
    def adapters_off(self) -> Iterator[None]:
        """Every adapter off (U-Net and text encoder) inside the block; the previous multiplier after."""
        previous = self.multiplier
        self.set_multiplier(0.0)
        try:
            yield
        finally:
            self.set_multiplier(previous)

    # --- files -----------------------------------------------------------------------------------

    def save_weights(self, file: str | os.PathLike, dtype: torch.dtype | None, metadata: Mapping[str, str] | None) -> None:
        """Write the kohya file; every tensor (`.alpha` too) cast to `dtype`; `sshs_*` hashes added."""
        state_dict = {k: v.detach().clone().cpu() for k, v in self.state_dict().items()}
        if dtype is not None:
            state_dict = {k: v.to(dtype) for k, v in state_dict.items()}
        # Like sd-scripts, the hashes are always there (also without training metadata).
        save_lora_file(file, state_dict, with_model_hashes(state_dict, metadata or {}))

    def load_weights(self, file: str | os.PathLike) -> dict[str, list[str]]:
        """Load a kohya file; layers missing from either side are skipped (sd-scripts' strict=False)."""
        weights_sd, _ = read_lora_file(file)
        weights_sd = _in_network_layout(weights_sd, self.family, self._sgm_names, str(file))
        entries = describe_lora_state_dict(weights_sd, str(file))
        _check_file_fits(self, entries, str(file))
        own = self.state_dict()
        result = self.load_state_dict({k: v for k, v in weights_sd.items() if k in own}, strict=False)
        unexpected = sorted(k for k in weights_sd if k not in own)
        if unexpected:
            logger.warning("%s: %d tensors have no layer in this network and were skipped (e.g. %s)",
                           file, len(unexpected), unexpected[0])
        return {"missing_keys": list(result.missing_keys), "unexpected_keys": unexpected}

    def merge_to(self, text_encoder: Any, unet: nn.Module, weights_sd: Mapping[str, torch.Tensor], dtype=None, device=None) -> None:
        """Fold the layers of `weights_sd` into the base weights at this network's multiplier."""
        weights_sd = _in_network_layout(weights_sd, self.family, self._sgm_names, "weights_sd")
        for lora in self.all_loras:
            sd = {k[len(lora.lora_name) + 1:]: v for k, v in weights_sd.items() if k.startswith(lora.lora_name + ".")}
            if not sd:
                continue
            lora.load_state_dict(sd, strict=False)
            lora.merge_into_base(self.multiplier, dtype, device)
        logger.info("merged %d LoRA layers into the base model", len(self.all_loras))

    def is_mergeable(self) -> bool:
        return True

    def merge(self) -> None:
        """Merge every applied adapter into its base weight (inference)."""
        for lora in self.all_loras:
            lora.merge()

    def unmerge(self) -> None:
        for lora in self.all_loras:
            lora.unmerge()

    @torch.no_grad()
    def apply_max_norm_regularization(self, max_norm_value: float, device: Any) -> tuple[int, float, float]:
        """sd-scripts `--scale_weight_norms`: (layers scaled, mean norm, max norm) after scaling."""
        results = [lora.apply_max_norm(max_norm_value) for lora in self.all_loras]
        if not results:
            return 0, 0.0, 0.0
        norms = [norm for _, norm in results]
        return sum(scaled for scaled, _ in results), sum(norms) / len(norms), max(norms)


def model_family(unet: nn.Module) -> str:
    """`FLUX`, `SDXL` or `SD`: which family's names the network and its files use."""
    if is_flux_transformer(unet):
        return FLUX
    return SDXL if is_sdxl_unet(unet) else SD


def _in_network_layout(
    weights_sd: Mapping[str, torch.Tensor], family: str, sgm_names: Mapping[str, str], source: str
) -> dict[str, torch.Tensor]:
    """`weights_sd` under this network's names, refused with a sentence when it is for the other model family.

    `sgm_names` (SDXL only) renames diffusers-layout U-Net layers to the SGM names the network uses.
    """
    found = file_family(key.split(".", 1)[0] for key in weights_sd)
    if found is not None and found[0] != family:
        file_is, example = found
        raise UserInputError(
            f"{source}: this LoRA is for {file_is} (it has layers such as {example}) but the model is {family}; "
            f"use a LoRA trained on {family}, or load the {file_is} model it was trained on "
            "(--pretrained_model_name_or_path)."
        )
    renamed = {}
    for key, tensor in weights_sd.items():
        name, dot, rest = key.partition(".")
        renamed[sgm_names.get(name, name) + dot + rest] = tensor
    converted = sum(1 for key in weights_sd if key.partition(".")[0] in sgm_names)
    if converted:
        logger.info("%s: %d tensors renamed from diffusers-layout to SGM U-Net names", source, converted)
    return renamed


def _check_file_fits(network: LoRANetwork, entries: Mapping[str, LoRAFileEntry], source: str) -> None:
    """Every layer of the file that names a layer of this network must fit the base layer (`fit.fits`) at the
    network's rank."""
    modules = {lora.lora_name: lora for lora in network.all_loras}
    matched = [name for name in entries if name in modules]
    for name in matched:
        entry, lora = entries[name], modules[name]
        if not fits(entry, lora.org_module[0]):
            down, up = tuple(lora.lora_down.weight.shape), tuple(lora.lora_up.weight.shape)
            raise UserInputError(
                f"{source}: {name}.lora_down.weight {entry.down_shape} / lora_up.weight {entry.up_shape} do not fit "
                f"this model's layer (needs down {down}, up {up}); the LoRA was trained for another base model "
                "(check --v2 and --pretrained_model_name_or_path)."
            )
        if entry.rank != lora.rank:
            raise UserInputError(
                f"{source}: {name} has rank {entry.rank} but this network has rank {lora.rank}; pass "
                "--network_dim (and conv_dim) matching the file, or --dim_from_weights."
            )
    if entries and not matched:
        raise UserInputError(
            f"{source}: none of its {len(entries)} layers exist in this network (e.g. {next(iter(entries))}); "
            "the LoRA was trained for another architecture, or for a part this run does not train."
        )


def _per_text_encoder(rates: float | Sequence[float] | None, index: int) -> float | None:
    """The rate of text encoder `index` (0-based) from one rate or one per encoder."""
    if not isinstance(rates, (list, tuple)):
        return rates
    if not rates:
        return None
    return rates[index] if index < len(rates) else rates[0]


def _as_list(text_encoder: nn.Module | Sequence[nn.Module] | None) -> list[nn.Module]:
    if text_encoder is None:
        return []
    if isinstance(text_encoder, nn.Module):
        return [text_encoder]
    return list(text_encoder)


def _lr_or(lr: float | None, default: float | None) -> float | None:
    return lr if lr is not None else default


def _scaled(lr: float | None, factor: float | None) -> float | None:
    if lr is None or factor is None:
        return lr
    return lr * factor
