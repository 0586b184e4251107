"""The images `evaluate_kps.py` generates: which ones, the file each is cached in, and generating them.

For every adapter (and the base model, no adapter) and every seed:
- `with_trigger`: from each trigger prompt `y_T`;
- `without_trigger`: from its trigger-free prompt `y`, with the same seed, so the two images of a
  pair start from the same noise (KPS, paper Eq. 8);
- `identity`: from each training image's own caption (IS, Eq. 6).

Prompts are encoded by the model family's own code (`ModelFamily.prompt_kwargs`, the trainer's
text conditioning), with each adapter's clip skip and token length (`kps_conditioning`).

An image file is named by a hash of everything that decides its pixels (model files, model family
and pipeline, LoRA bytes, clip skip and token length, prompt, seed, sampler, steps, guidance, size, dtype, device type,
diffusers version), so a re-run reuses what exists, and two roles that ask for the same image share
one file.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import diffusers
import torch
from torch import Tensor
from tqdm import tqdm

from library.evaluation.kps_conditioning import Conditioning

ROLES = ("with_trigger", "without_trigger", "identity")

PromptKwargs = Callable[[str, str, int | None, int], dict[str, Tensor]]
"""`ModelFamily.prompt_kwargs`: (prompt, negative prompt, clip skip, max token length) -> the pipeline's embeddings
(SD's `prompt_embeds`, SDXL's pooled ones too), as the pipeline's keyword arguments."""


@dataclass(frozen=True)
class Adapter:
    """One row of the results: a LoRA file, or the base model (`path` None), and how its prompts are encoded."""

    name: str
    path: Path | None
    fingerprint: str | None  # sha256 of the LoRA file's bytes
    conditioning: Conditioning


@dataclass(frozen=True)
class PromptPair:
    """A trigger prompt `y_T`, its trigger-free prompt `y`, and the caption part `P` that PS compares."""

    with_trigger: str
    without_trigger: str
    caption_part: str
    source: str  # where it was read: "prompts.txt line 3", or a caption file


@dataclass(frozen=True)
class PlannedImage:
    """One image to generate; `source` indexes the prompt pairs, or the training images for `identity`."""

    adapter: str
    role: str
    prompt: str
    seed: int
    source: int


@dataclass(frozen=True)
class GenerationSettings:
    """Everything besides the adapter, prompt and seed that decides an image's pixels."""

    model: str  # fingerprint of the base model's files (and --vae, --model_config, flags)
    family: str  # the model family and variant (`ModelFamily.model_version`) and the pipeline class that samples
    sampler: str
    steps: int
    guidance_scale: float
    width: int
    height: int
    dtype: str
    device_type: str


def plan_images(
    adapters: Sequence[Adapter], pairs: Sequence[PromptPair], identity_captions: Sequence[str], seeds: Sequence[int]
) -> list[PlannedImage]:
    """Every image the scores need, adapter by adapter."""
    planned = []
    for adapter in adapters:
        for index, pair in enumerate(pairs):
            for seed in seeds:
                planned.append(PlannedImage(adapter.name, "with_trigger", pair.with_trigger, seed, index))
                planned.append(PlannedImage(adapter.name, "without_trigger", pair.without_trigger, seed, index))
        for index, caption in enumerate(identity_captions):
            planned.extend(PlannedImage(adapter.name, "identity", caption, seed, index) for seed in seeds)
    return planned


def cache_key(image: PlannedImage, adapter: Adapter, settings: GenerationSettings) -> str:
    """The hex digest naming the image's file: role and source do not change pixels, so they are not in it."""
    decided_by = {
        **asdict(settings), "lora": adapter.fingerprint, **asdict(adapter.conditioning), "prompt": image.prompt,
        "seed": image.seed, "diffusers": diffusers.__version__,
    }
    return hashlib.sha256(json.dumps(decided_by, sort_keys=True).encode()).hexdigest()[:24]


def files_fingerprint(*paths: Path | None) -> str:
    """A cheap fingerprint of model files: path, size and modification time of every file under `paths`.

    Hashing the bytes of a multi-GB checkpoint on every run would take longer than the check is worth;
    a rewritten file gets a new modification time.
    """
    entries = []
    for path in paths:
        if path is None:
            entries.append(None)
            continue
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        entries.extend((str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


def bytes_fingerprint(path: Path) -> str:
    """sha256 of a (LoRA-sized) file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def generate_images(
    pipe, prompt_kwargs: PromptKwargs, adapters: Sequence[Adapter], planned: Sequence[PlannedImage],
    settings: GenerationSettings, image_dir: Path,
) -> tuple[dict[PlannedImage, Path], int]:
    """Generate the images of `planned` that are not cached yet: ({image: file}, number generated).

    Each LoRA is loaded with diffusers' own `load_lora_weights`, as users load it, and unloaded before
    the next; an adapter whose images are all cached is not loaded at all. `prompt_kwargs` encodes the
    prompts with the adapter's text encoder on, under the adapter's conditioning.
    """
    image_dir.mkdir(parents=True, exist_ok=True)
    by_name = {adapter.name: adapter for adapter in adapters}
    files = {image: image_dir / f"{cache_key(image, by_name[image.adapter], settings)}.png" for image in planned}
    generated, seen = 0, set()
    with tqdm(total=len(set(files.values())), desc="generating", unit="image") as bar:
        for adapter in adapters:
            # Two byte-identical LoRA files ask for the same images: the first one makes them.
            mine = (image for image in planned if image.adapter == adapter.name and files[image] not in seen)
            wanted = {files[image]: image for image in mine}
            seen.update(wanted)
            missing = {path: image for path, image in wanted.items() if not path.is_file()}
            bar.update(len(wanted) - len(missing))
            if not missing:
                continue
            if adapter.path is not None:
                pipe.load_lora_weights(str(adapter.path), adapter_name="kps")
            try:
                for path, image in missing.items():
                    save_png(_generate(pipe, prompt_kwargs, image, adapter.conditioning, settings), path)
                    generated += 1
                    bar.update(1)
            finally:
                if adapter.path is not None:
                    pipe.unload_lora_weights()
    return files, generated


@torch.no_grad()
def _generate(pipe, prompt_kwargs: PromptKwargs, image: PlannedImage, conditioning: Conditioning,
              settings: GenerationSettings):
    # The empty negative prompt is what the pipeline itself would use for classifier-free guidance.
    embeddings = prompt_kwargs(image.prompt, "", conditioning.clip_skip, conditioning.max_token_length)
    # A CPU generator draws the same starting noise on every device: y and y_T of a pair share it.
    generator = torch.Generator("cpu").manual_seed(image.seed)
    return pipe(
        **embeddings, num_inference_steps=settings.steps, guidance_scale=settings.guidance_scale,
        width=settings.width, height=settings.height, generator=generator,
    ).images[0]


def save_png(image, path: Path) -> None:
    """Write atomically: an interrupted run never leaves a truncated image that a re-run would reuse."""
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)
