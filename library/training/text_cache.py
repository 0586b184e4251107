"""`--cache_text_encoder_outputs`: the frozen text encoders' outputs for every caption of the run,
computed once before training (sd-scripts' SDXL option), for CAT's two captions alike.

It is exact when the text encoders are not trained (`--network_train_unet_only`, which the flag
needs) and every image always trains on the same caption (no shuffle, dropout or tag dropout):
encoding a caption then always gives the same states, so a table from each caption's token ids (and
their weights, with --weighted_captions: the weighted states are cached, as sd-scripts caches them) to
its states replaces the encoders. CAT's reference reads the same table as the adapted passes: the
encoders carry no adapters, so the reference differs from the adapted prediction only through the
U-Net, as without the cache. Each caption is encoded on its own, under training's autocast.

`--cache_text_encoder_outputs_to_disk` keeps each image's entries beside it
(`<image stem>_cat_te_outputs.safetensors`: the training caption's and the trigger-free caption's
states), with both captions, the token length and a fingerprint of the text encoders; a file is
reused only when all of them match, and rewritten otherwise.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from library.cat.objective import Denoiser
from library.config.train_config import TrainConfig
from library.data.folder_dataset import ImageItem
from library.data.run_data import fixed_caption, free_caption, varying_caption_options
from library.data.training_data import TrainingData
from library.errors import UserInputError
from library.families.prompt_weights import WeightedTokens

DISK_SUFFIX = "_cat_te_outputs.safetensors"
Tokenize = Callable[[list[str]], Tensor]


@dataclass
class TextEncoderCache:
    """Token ids of one caption (as bytes) -> its text states (batch dimension 1, on the CPU)."""

    states: dict[bytes, Any]

    @classmethod
    def of(cls, entries: Iterable[tuple[Tensor, Any]]) -> TextEncoderCache:
        """A cache of (token ids of one caption, its states with batch dimension 1) pairs."""
        return cls({_key(ids): states for ids, states in entries})

    def encode(self, input_ids: Tensor, device: torch.device) -> Any:
        """The cached states of a batch of token ids, stacked in batch order, on `device`."""
        rows = []
        for ids in input_ids:
            key = _key(ids)
            if key not in self.states:
                raise RuntimeError("a caption reached training that was not cached; text-encoder caching needs "
                                   "each image's captions fixed (please report this as a bug)")
            rows.append(self.states[key])
        return _to(_stack(rows), device)


@dataclass
class CachedTextDenoiser:
    """A `Denoiser` whose `encode` reads the cache; `predict` is the model's own."""

    denoiser: Denoiser
    cache: TextEncoderCache
    device: torch.device

    def encode(self, input_ids: Tensor) -> Any:
        return self.cache.encode(input_ids, self.device)

    def predict(self, noisy_latents: Tensor, timesteps: Tensor, text_states: Any, **conditioning: Tensor) -> Tensor:
        return self.denoiser.predict(noisy_latents, timesteps, text_states, **conditioning)


def check_fixed_captions(data: TrainingData) -> None:
    """Refuse, naming the subset, captions that change between steps: their outputs cannot be cached."""
    for subset in data.subsets:
        varying = varying_caption_options(subset)
        if varying:
            raise UserInputError(
                f"--cache_text_encoder_outputs: the subset {subset.folder} has {', '.join(varying)}, so its captions "
                "change from step to step and their text-encoder outputs cannot be cached; turn those off for "
                "this subset or drop --cache_text_encoder_outputs (sd-scripts refuses this too)."
            )


def build_text_cache(config: TrainConfig, data: TrainingData, denoiser: Denoiser, tokenize: Tokenize,
                     text_encoders: Sequence[nn.Module], device: torch.device,
                     autocast: Callable[[], contextlib.AbstractContextManager],
                     prompts: Sequence[str] = ()) -> TextEncoderCache:
    """Encode every image's training and trigger-free captions (or read them from disk) and the
    --cat_prompts `prompts` (in memory) once, `--text_encoder_batch_size` captions a call (default:
    the batch size, as in sd-scripts)."""
    check_fixed_captions(data)
    model = config.model
    fingerprint = _fingerprint(text_encoders, f"max_token_length={model.max_token_length} "
                                              f"t5xxl_max_token_length={model.t5xxl_max_token_length} "
                                              f"apply_t5_attn_mask={model.apply_t5_attn_mask}")
    batch_size = config.data.text_encoder_batch_size or config.data.train_batch_size
    states: dict[bytes, Any] = {}

    def encode(texts: Sequence[str]) -> None:
        """The states of each of `texts` not known yet, into `states`."""
        pending: dict[bytes, Any] = {}
        for text in texts:
            ids = tokenize([text])
            pending.setdefault(_key(ids[0]), ids)
        rows = [(key, ids) for key, ids in pending.items() if key not in states]
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            with torch.no_grad(), autocast():
                encoded = _to(denoiser.encode(torch.cat([ids for _, ids in chunk]).to(device)), torch.device("cpu"))
            states.update((key, _row(encoded, index)) for index, (key, _) in enumerate(chunk))

    encode([""])
    kind = type(next(iter(states.values())))  # what the states of one caption are: a tensor, or a NamedTuple
    to_write: list[tuple[Path, tuple[str, str], dict[str, str]]] = []
    texts: list[str] = list(prompts)
    for item in _unique_items(data):
        caption = fixed_caption(item)
        captions = (caption, free_caption(config, item, caption))
        if config.data.cache_text_encoder_outputs_to_disk:
            wanted = _read_through_disk(item.path, captions, fingerprint, kind, tokenize, states)
            if wanted is None:
                continue
            to_write.append((item.path, captions, wanted))
        texts += captions
    encode(texts)
    for image, captions, wanted in to_write:
        _write_disk(image, [states[_key(tokenize([text])[0])] for text in captions], wanted)
    return TextEncoderCache(states)


def _row(value: Any, index: int) -> Any:
    """Row `index` of encoded states, batch dimension 1 kept (a NamedTuple's None parts stay None)."""
    if isinstance(value, Tensor):
        return value[index : index + 1]
    return type(value)(*(None if part is None else part[index : index + 1] for part in value))


def _read_through_disk(image: Path, captions: tuple[str, str], fingerprint: str, kind: type, tokenize: Tokenize,
                       states: dict[bytes, Any]) -> dict[str, str] | None:
    """Take the image's cache file into `states` if it holds these captions for these encoders (None);
    else the metadata its new file must carry, for `_write_disk` once the captions are encoded."""
    path = image.with_name(image.stem + DISK_SUFFIX)
    ids = [tokenize([text])[0] for text in captions]
    wanted = {"captions": json.dumps(list(captions)), "fingerprint": fingerprint, "kind": kind.__qualname__,
              "ids": hashlib.sha256(b"".join(_key(row) for row in ids)).hexdigest()}
    stored = _read_disk(path, kind)
    if stored is not None and all(stored[0].get(key) == value for key, value in wanted.items()):
        for index, row in enumerate(ids):
            states[_key(row)] = stored[1][index]
        return None
    return wanted


def _write_disk(image: Path, encoded: list[Any], wanted: dict[str, str]) -> None:
    path = image.with_name(image.stem + DISK_SUFFIX)
    tensors = {f"{index}.{part}": tensor.contiguous() for index, value in enumerate(encoded)
               for part, tensor in enumerate(_parts(value)) if tensor is not None}
    save_file(tensors, path, metadata={**wanted, "fields": str(len(_parts(encoded[0])))})


def _read_disk(path: Path, kind: type) -> tuple[dict[str, str], list[Any]] | None:
    """(metadata, the two captions' states) of a cache file; None when there is none or it is unreadable."""
    if not path.is_file():
        return None
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(path)
        fields = int(metadata["fields"])
        values = []
        for index in range(2):
            parts = [tensors.get(f"{index}.{part}") for part in range(fields)]  # absent: a None part (no mask)
            values.append(parts[0] if kind is Tensor else kind(*parts))
    except Exception:  # a damaged or foreign file is encoded anew and overwritten
        return None
    return metadata, values


def _unique_items(data: TrainingData) -> Iterable[ImageItem]:
    seen = set()
    for subset in data.subsets:
        for item in subset.items:
            if item.path not in seen:
                seen.add(item.path)
                yield item


def _fingerprint(text_encoders: Sequence[nn.Module], options: str) -> str:
    """A hash of every text-encoder parameter's shape and a strided sample of its values, and of the
    options that change what they give (token lengths, T5's mask)."""
    digest = hashlib.sha256(options.encode())
    for encoder in text_encoders:
        for name, parameter in encoder.state_dict().items():
            flat = parameter.detach().flatten()
            digest.update(f"{name}{tuple(parameter.shape)}".encode())
            digest.update(flat[:: max(1, flat.numel() // 256)].float().cpu().numpy().tobytes())
    return digest.hexdigest()


def _key(ids: Tensor | WeightedTokens) -> bytes:
    """The bytes of one caption's ids (and of their weights, for --weighted_captions: "(dog:1.2)" and "dog"
    have the same ids)."""
    if isinstance(ids, WeightedTokens):
        return _key(ids.ids) + ids.weights.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    return ids.detach().to("cpu", torch.int64).contiguous().numpy().tobytes()


# Text states are a tensor (SD) or a NamedTuple of tensors (SDXL's states and pooled embedding; FLUX.1's
# states, pooled embedding and T5 mask, which is None without --apply_t5_attn_mask).

def _parts(value: Any) -> list[Tensor | None]:
    return [value] if isinstance(value, Tensor) else list(value)


def _stack(rows: list[Any]) -> Any:
    if isinstance(rows[0], Tensor):
        return torch.cat(rows)
    return type(rows[0])(*(None if parts[0] is None else torch.cat(parts) for parts in zip(*rows)))


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, Tensor):
        return value.to(device)
    return type(value)(*(None if part is None else part.to(device) for part in value))
