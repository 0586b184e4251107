"""The CLIP model that embeds prompts and images for the scores, loaded with open_clip.

`model` is an open_clip model name (e.g. "ViT-L-14", or "hf-hub:org/repo") or the path of an
open_clip model-config JSON (`embed_dim`, `vision_cfg`, `text_cfg`); `pretrained` is a local weights
file (open_clip's state dicts, or OpenAI's TorchScript archives such as `ViT-L-14.pt`), or an
open_clip pretrained tag (e.g. "openai"), which open_clip downloads. Random CLIP
weights give meaningless scores, so weights are required, except for an hf-hub model (they come
with it).
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import open_clip
import torch
from PIL import Image
from torch import Tensor

from library.errors import UserInputError


@dataclass
class ClipEmbedder:
    """An open_clip model with its image preprocessing and tokenizer, on one device."""

    model: torch.nn.Module
    preprocess: Callable[[Image.Image], Tensor]
    tokenizer: Callable[[list[str]], Tensor]
    device: torch.device

    @torch.no_grad()
    def images(self, paths: Sequence[Path], batch_size: int = 32) -> Tensor:
        """E_img of the image files at `paths`, one row each (float32, not normalised)."""
        rows = []
        for start in range(0, len(paths), batch_size):
            batch = [self.preprocess(_load_rgb(p)) for p in paths[start:start + batch_size]]
            rows.append(self.model.encode_image(torch.stack(batch).to(self.device)).float().cpu())
        return torch.cat(rows) if rows else torch.empty(0)

    @torch.no_grad()
    def texts(self, texts: Sequence[str], batch_size: int = 64) -> Tensor:
        """E_txt of `texts`, one row each (float32, not normalised)."""
        rows = []
        for start in range(0, len(texts), batch_size):
            tokens = self.tokenizer(list(texts[start:start + batch_size])).to(self.device)
            rows.append(self.model.encode_text(tokens).float().cpu())
        return torch.cat(rows) if rows else torch.empty(0)


def load_clip(model: str, pretrained: str | None, device: torch.device | str) -> ClipEmbedder:
    """Load the open_clip model `model` with the weights `pretrained` (see the module docstring)."""
    name = _register_model(model)
    checkpoint = _checkpoint(name, pretrained)
    if checkpoint is not None and _is_torchscript(checkpoint):
        return _load_openai_archive(name, checkpoint, device)
    try:
        clip, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=checkpoint, device=device)
    except RuntimeError as err:
        raise UserInputError(
            f"The CLIP weights {checkpoint} could not be loaded into the open_clip model {model} ({_first_line(err)}); "
            "give --clip_pretrained weights trained for that --clip_model."
        ) from None
    clip.eval()
    return ClipEmbedder(clip, preprocess, open_clip.get_tokenizer(name), torch.device(device))


def _is_torchscript(path: str) -> bool:
    """OpenAI's own CLIP files (e.g. ViT-L-14.pt) are TorchScript archives: zips holding `constants.pkl`."""
    if not (Path(path).is_file() and zipfile.is_zipfile(path)):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(entry.endswith("constants.pkl") for entry in archive.namelist())


def _load_openai_archive(name: str, path: str, device: torch.device | str) -> ClipEmbedder:
    """open_clip's loader for OpenAI's files, which torch.load refuses with weights_only.

    It rebuilds the architecture from the weights (QuickGELU, as every OpenAI model); `name` gives the
    tokenizer and must agree on the embedding size.
    """
    try:
        clip = open_clip.load_openai_model(path, precision="fp32", device=device)
    except (RuntimeError, KeyError) as err:
        raise UserInputError(
            f"The --clip_pretrained archive {path} is not an OpenAI CLIP model ({_first_line(err)})."
        ) from None
    embed_dim = open_clip.get_model_config(name)["embed_dim"]
    if clip.text_projection.shape[1] != embed_dim:
        raise UserInputError(
            f"The --clip_pretrained archive {path} holds a CLIP model with {clip.text_projection.shape[1]}-dim "
            f"embeddings, but --clip_model {name} has {embed_dim}; give the --clip_model of these weights."
        )
    preprocess = open_clip.image_transform(clip.visual.image_size, is_train=False)
    return ClipEmbedder(clip.eval(), preprocess, open_clip.get_tokenizer(name), torch.device(device))


def _register_model(model: str) -> str:
    """The open_clip name of `model`; a config JSON is registered with open_clip under its file stem."""
    if model.endswith(".json"):
        path = Path(model)
        if not path.is_file():
            raise UserInputError(
                f"The --clip_model config {path} does not exist; give an open_clip model name or config JSON."
            )
        if not {"embed_dim", "vision_cfg", "text_cfg"} <= set(json.loads(path.read_text())):
            raise UserInputError(
                f"The --clip_model config {path} lacks embed_dim, vision_cfg or text_cfg; give an open_clip model config."
            )
        open_clip.add_model_config(path)
        return path.stem
    if not model.startswith("hf-hub:") and model.replace("/", "-") not in open_clip.list_models():
        raise UserInputError(
            f"The --clip_model {model!r} is not an open_clip model name (e.g. ViT-L-14, ViT-B-32) nor a config JSON; "
            "see open_clip.list_models()."
        )
    return model


def _checkpoint(name: str, pretrained: str | None) -> str | None:
    """The weights argument for open_clip: a file that exists, a pretrained tag, or None for hf-hub models."""
    if name.startswith("hf-hub:"):
        return None  # the weights come with the hub model; open_clip ignores `pretrained` for it
    if pretrained is None:
        raise UserInputError(
            f"--clip_pretrained is missing for the CLIP model {name}: random CLIP weights give meaningless scores; "
            "give the weights file (e.g. ViT-L-14 weights) or an open_clip pretrained tag."
        )
    if Path(pretrained).is_file() or pretrained in open_clip.list_pretrained_tags_by_model(name):
        return pretrained
    tags = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none"
    raise UserInputError(
        f"The --clip_pretrained weights file {pretrained} does not exist (and it is not one of {name}'s open_clip "
        f"pretrained tags: {tags}); check the path."
    )


def _load_rgb(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
