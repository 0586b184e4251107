"""Sentences for a `--network_module` that refuses its `--network_args` or this model.

kohya-style network modules (sd-scripts' own, LyCORIS) check their input with `assert` and plain
`float(...)`, so a user's mistake reaches us as a bare AssertionError or ValueError.
`creation_error` turns what `create_network` raised into a `UserInputError` that names the module,
the args and a fix. For LyCORIS (`lycoris.kohya`, PyPI `lycoris-lora`) it knows which presets fit
diffusers' U-Net; `check_adapts_something` refuses a network that adapts nothing it is asked to train,
and `off_advice` says what to change when the multiplier-0 guard (`network_guard`) refuses one.
"""

from __future__ import annotations

import re
import traceback
from collections.abc import Mapping
from typing import Any

from library.errors import UserInputError

LYCORIS = "lycoris.kohya"
LYCORIS_DEFAULT_PRESET = "full"

# Measured with lycoris-lora 4.1.3 on diffusers' UNet2DConditionModel (tests/test_lycoris_presets.py
# checks both lists against the installed LyCORIS). These presets target diffusers' TimestepEmbedding
# block by class and its `time_embedding.linear_1` by name, so LyCORIS builds that layer twice and stops.
LYCORIS_DUPLICATING_PRESETS = ("full", "full-lin", "unet-only")
# These match no layer of diffusers' U-Net: attn-only names the classes CrossAttention/SelfAttention
# (diffusers' is `Attention`), ia3 matches layer names from the start of their full path.
LYCORIS_NO_UNET_PRESETS = ("attn-only", "ia3")
LYCORIS_WORKING_PRESETS = ("attn-mlp", "unet-transformer-only", "unet-convblock-only")

LYCORIS_PRESET_ADVICE = (
    "use --network_args preset=attn-mlp (the U-Net's transformer blocks and time embedding, and the text "
    "encoder) or preset=unet-convblock-only (the U-Net's ResNet and sampler convolutions), e.g. "
    "--network_args algo=locon preset=attn-mlp; for the layers of both, give preset=<file>.toml listing "
    "them (README, \"LyCORIS\")"
)

_DUPLICATED = re.compile(r"duplicated lora name: (\S+)")


def network_description(module_name: str, args: Mapping[str, str]) -> str:
    """`--network_module X --network_args k=v ...` as the user wrote it, for error sentences."""
    text = f"--network_module {module_name}"
    if args:
        text += " --network_args " + " ".join(f"{key}={value}" for key, value in args.items())
    return text


def lycoris_preset(args: Mapping[str, str]) -> str:
    return args.get("preset") or LYCORIS_DEFAULT_PRESET


def creation_error(module_name: str, args: Mapping[str, str], error: Exception) -> UserInputError | None:
    """The sentence for what `create_network` raised, or None when it looks like a bug, not input."""
    if isinstance(error, UserInputError):
        return error
    where = network_description(module_name, args)
    if module_name == LYCORIS:
        sentence = _lycoris_sentence(args, error)
        if sentence:
            return UserInputError(f"{where}: {sentence}")
    if isinstance(error, (AssertionError, ValueError)):
        reason = str(error) or f"an assert without a message, {_origin(error)}"
        return UserInputError(f"{where}: the network module refused these arguments ({reason}); "
                              "check the values against that module's documentation.")
    return None


def _lycoris_sentence(args: Mapping[str, str], error: Exception) -> str | None:
    preset = lycoris_preset(args)
    duplicated = _DUPLICATED.search(str(error)) if isinstance(error, AssertionError) else None
    if duplicated:
        default = " (LyCORIS' default)" if "preset" not in args else ""
        because = (
            " it targets the time embedding both by class (TimestepEmbedding) and by name "
            "(time_embedding.linear_1), so" if preset in LYCORIS_DUPLICATING_PRESETS else ""
        )
        return (
            f"preset={preset}{default} does not fit diffusers' U-Net:{because} LyCORIS builds the layer "
            f"{duplicated.group(1)} twice and stops (\"duplicated lora name\"). The presets "
            f"{_and(LYCORIS_DUPLICATING_PRESETS)} all do this here; {LYCORIS_PRESET_ADVICE}."
        )
    if isinstance(error, AssertionError) and not str(error) and "preset" in args:
        return (f"preset={preset} is neither one of LyCORIS' presets ({', '.join(_lycoris_preset_names())}) "
                "nor a preset .toml file it could read; check the name or the path.")
    if isinstance(error, KeyError) and "algo" in args and error.args and error.args[0] == args["algo"].lower():
        return (f"algo={args['algo']} is not a LyCORIS algorithm; use one of {', '.join(_lycoris_algo_names())} "
                "(e.g. algo=locon, loha or lokr).")
    return None


def check_adapts_something(network: Any, module_name: str, args: Mapping[str, str], train_unet: bool) -> None:
    """Refuse a network with nothing to train, or a LyCORIS preset that adapts no layer of this U-Net."""
    where = network_description(module_name, args)
    if module_name == LYCORIS and train_unet and not getattr(network, "unet_loras", True):
        raise UserInputError(
            f"{where}: preset={lycoris_preset(args)} adapts no layer of diffusers' U-Net (the presets "
            f"{_and(LYCORIS_NO_UNET_PRESETS)} match nothing there); {LYCORIS_PRESET_ADVICE}; "
            "or pass --network_train_text_encoder_only to train the text encoder alone."
        )
    if not any(True for _ in network.parameters()):
        extra = f" ({LYCORIS_PRESET_ADVICE})" if module_name == LYCORIS else ""
        raise UserInputError(f"{where}: the network adapts no layer of this model, so there is nothing to "
                             f"train; choose targets that exist in it{extra}.")


def off_advice(module_name: str, args: Mapping[str, str]) -> str:
    """What to change when the guard finds this network's multiplier 0 is not the base model ("" if unknown)."""
    if module_name == LYCORIS and str(args.get("dora_wd", "")).lower() in ("true", "1", "yes"):
        return "LyCORIS' DoRA (dora_wd=true) keeps its weight decomposition at multiplier 0: drop dora_wd. "
    return ""


def _and(names: tuple[str, ...]) -> str:
    return ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else "".join(names)


def _origin(error: Exception) -> str:
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return "at an unknown place"
    frame = frames[-1]
    return f"at {frame.filename.split('site-packages/')[-1]} line {frame.lineno}"


def _lycoris_preset_names() -> list[str]:
    # Imported here: reached only after lycoris.kohya itself was imported.
    from lycoris.config import PRESET

    return sorted(PRESET)


def _lycoris_algo_names() -> list[str]:
    from lycoris.wrapper import network_module_dict

    return sorted(network_module_dict)
