"""Does a kohya LoRA file fit this model? Checked before use, because loaders forgive too much.

diffusers' `load_lora_weights` skips keys that name no layer of the model (with at most a log
line), so a LoRA trained for another base model can leave the images untouched and still produce
scores. Every layer of the file must name an adaptable layer of this U-Net or text encoder, with
that layer's input and output sizes: the adapter's own rule (`networks.lora_cat.fit`), which its
network applies when it loads a file. A file of the other model family (an SD 1.x/2.x LoRA on SDXL,
or the reverse) is named as such first, told by layer names alone (`fit.file_family`) on both sides.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

from torch import nn

from library.errors import UserInputError
from networks.lora_cat.file_format import describe_lora_state_dict, read_lora_file
from networks.lora_cat.fit import file_family, fits, lora_shapes


def check_lora_fits(path: Path, layers: dict[str, nn.Module], aliases: Mapping[str, str] | None = None) -> None:
    """Raise a `UserInputError` naming the first layer of the file at `path` that the model lacks or cannot
    take; `layers` are the model's adaptable layers by kohya name (`ModelFamily.lora_layers`), `aliases`
    other names a file may give them (SDXL: diffusers-layout U-Net names, which diffusers loads too)."""
    tensors, _ = read_lora_file(path)
    as_written = describe_lora_state_dict(tensors, str(path))
    if not as_written:
        raise UserInputError(f"The LoRA file {path} holds no LoRA layer; check that it is a LoRA.")
    _check_family(path, as_written, layers)  # by the names as written: aliases would blur the family
    aliases = aliases or {}
    entries = {aliases.get(name, name): entry for name, entry in as_written.items()}
    unknown = [name for name in entries if name not in layers]
    if unknown:
        raise UserInputError(
            f"The LoRA file {path} has {len(unknown)} of its {len(entries)} layers that this model does not have "
            f"(e.g. {unknown[0]}); it was trained for another base model (check the model path and --v2)."
        )
    for name, entry in entries.items():
        if not fits(entry, layers[name]):
            expected = lora_shapes(layers[name], entry.rank)
            raise UserInputError(
                f"The LoRA file {path} has {name} with down {entry.down_shape} / up {entry.up_shape}, but this "
                f"model's layer needs down {expected[0]} / up {expected[1]}; it was trained for another base "
                "model (check the model path and --v2)."
            )



def _check_family(path: Path, lora_names: Iterable[str], layers: dict[str, nn.Module]) -> None:
    """Refuse a LoRA whose layer names are of the other model family than the model's own layers."""
    found, model = file_family(lora_names), file_family(layers)
    if found is not None and model is not None and found[0] != model[0]:
        file_is, example = found
        raise UserInputError(
            f"The LoRA file {path} is for {file_is} (it has layers such as {example}), but the base model is "
            f"{model[0]}; give a LoRA trained on {model[0]}, or the {file_is} model it was trained on "
            "(--pretrained_model_name_or_path)."
        )
