"""VAE latents of the training images, encoded now or cached (`--cache_latents`, `--cache_latents_to_disk`).

What is encoded is the VAE's distribution (mean and standard deviation) of one image at one bucket,
flipped or not. The latent trained on is `(mean + std * noise) * scaling_factor`, with the noise
drawn from a stream seeded by the run's seed and the image's folder, name, bucket and flip. So
caching never changes what is trained: the same run with and without the cache, in memory or on
disk, gives the same latents up to float rounding. Without a cache the VAE encodes each training
batch in one call (as sd-scripts does); the cache encodes `--vae_batch_size` images of one bucket
per call, and a VAE may round differently on batches of other sizes, so the LoRA is bitwise the
same only when both calls hold the same images (e.g. batch size 1 and `--vae_batch_size 1`).

The disk cache is sd-scripts' layout, `<image stem>.npz` beside the image, with its keys (`latents`,
`original_size`, `crop_ltrb`, `latents_flipped`, and with `alpha_mask` the unflipped loss mask
`alpha_mask`) plus the standard deviations. A file is reused only if it matches the bucket, the resize
and the `resize_interpolation` (recorded as `resize_interpolation`), (with `flip_aug` / `alpha_mask`)
holds the flipped latents / the mask, and is newer than the image; otherwise it is rewritten.
"""

from __future__ import annotations

import logging
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from library.data.buckets import Placement, crop_box
from library.data.image_loading import image_size

logger = logging.getLogger(__name__)

# The npz's `resize_interpolation` for an image resized the default way (sd-scripts' area-or-lanczos rule).
DEFAULT_RECORD = "default"


@dataclass(frozen=True)
class LatentKey:
    """What determines an image's latent: the image, its bucket and resize, and the flip."""

    path: Path
    bucket: tuple[int, int]
    resized: tuple[int, int]
    flip: bool = False
    alpha_mask: bool = False  # the entry also holds the image's alpha channel, its loss mask (not in the seed)
    interpolation: str | None = None  # resize_interpolation (None: the default); not in the seed

    def noise_seed(self, seed: int) -> int:
        """A seed from the run's seed and the image's folder and file name (not its absolute path:
        results do not depend on where the dataset lives), bucket and flip."""
        name = f"{self.path.parent.name}/{self.path.name}|{self.bucket}|{int(self.flip)}"
        return (seed ^ zlib.crc32(name.encode())) & 0xFFFF_FFFF_FFFF


@dataclass(frozen=True)
class Distribution:
    """The VAE posterior of one image (unscaled latent space)."""

    mean: Tensor
    std: Tensor


def key_for(path: Path, placement: Placement, flip: bool = False, alpha_mask: bool = False,
            interpolation: str | None = None) -> LatentKey:
    return LatentKey(path, placement.bucket, placement.resized, flip, alpha_mask, interpolation)


def sample_latents(keys: list[LatentKey], dists: list[Distribution], seed: int) -> Tensor:
    """The VAE latents of a batch, each drawn with its own seeded noise (unscaled: the model family
    maps them into its latent space)."""
    latents = []
    for key, dist in zip(keys, dists):
        noise = torch.randn(dist.mean.shape, generator=torch.Generator().manual_seed(key.noise_seed(seed)))
        # In float32 whatever the VAE's dtype, so latents read back from disk (float32) match.
        latents.append(dist.mean.float() + dist.std.float() * noise.to(dist.mean.device))
    return torch.stack(latents)


@torch.no_grad()
def encode(vae, pixels: Tensor, vae_batch_size: int, dtype: torch.dtype | None = None) -> list[Distribution]:
    """The VAE distributions of (B, 3, H, W) pixels in [-1, 1], encoded `vae_batch_size` at a time;
    `dtype` is the VAE's, looked up when not given (diffusers walks every parameter for it)."""
    device, dtype = vae.device, dtype or vae.dtype
    dists = []
    for start in range(0, len(pixels), vae_batch_size):
        chunk = pixels[start : start + vae_batch_size].to(device, dtype)
        posterior = vae.encode(chunk).latent_dist
        dists += [Distribution(m, s) for m, s in zip(posterior.mean, posterior.std)]
    return dists


class LatentCache:
    """Distributions of every key, computed once before training; optionally kept on disk."""

    def __init__(self, to_disk: bool):
        self.to_disk = to_disk
        self.dists: dict[LatentKey, Distribution] = {}
        self.masks: dict[LatentKey, Tensor] = {}  # the alpha masks of the keys with `alpha_mask`

    def fill(self, keys: Iterable[LatentKey], load_pixels: Callable[[LatentKey], Tensor], vae, vae_batch_size: int,
             write: bool = True, load_mask: Callable[[LatentKey], Tensor] | None = None) -> None:
        """Encode every key not cached yet (reading valid disk files first), and keep the alpha mask
        `load_mask` gives of each key with `alpha_mask`. `write`: this process writes the disk files
        (the main process; the others read them afterwards)."""
        keys = sorted(set(keys), key=lambda k: (k.bucket, k.resized, str(k.path), k.flip))
        missing = [k for k in keys if not self._read(k)]
        # A chunk holds one bucket only: the VAE takes images of one size per call.
        chunks = [group[i : i + vae_batch_size] for group in _by_bucket(missing) for i in range(0, len(group), vae_batch_size)]
        for chunk in tqdm(chunks, desc="caching latents", disable=not chunks):
            pixels = torch.stack([load_pixels(k) for k in chunk])
            for key, dist in zip(chunk, encode(vae, pixels, vae_batch_size)):
                self.dists[key] = Distribution(dist.mean.cpu(), dist.std.cpu())
                if key.alpha_mask:
                    self.masks[key] = load_mask(key)
        if self.to_disk and write:
            by_path: dict[Path, list[LatentKey]] = {}
            for key in keys:
                by_path.setdefault(key.path, []).append(key)
            for path in sorted({k.path for k in missing}):
                self._write(path, by_path[path])

    def get(self, key: LatentKey) -> Distribution:
        return self.dists[key]

    def mask(self, key: LatentKey) -> Tensor | None:
        """The alpha mask of a key with `alpha_mask`, None for others."""
        return self.masks.get(key)

    def _read(self, key: LatentKey) -> bool:
        if not self.to_disk:
            return False
        found = read_npz(disk_path(key.path), key)
        mask = read_npz_alpha_mask(disk_path(key.path), key) if found is not None and key.alpha_mask else None
        if found is None or (key.alpha_mask and mask is None):  # a file without the mask is written again
            return False
        self.dists[key] = found
        if mask is not None:
            self.masks[key] = mask
        return True

    def _write(self, path: Path, keys: list[LatentKey]) -> None:
        plain = [k for k in keys if not k.flip]
        flipped = [k for k in keys if k.flip]
        if not plain:  # a file always holds the unflipped latents
            return
        write_npz(disk_path(path), plain[0], self.dists[plain[0]], self.dists[flipped[0]] if flipped else None,
                  self.masks.get(plain[0]))


def _by_bucket(keys: list[LatentKey]) -> list[list[LatentKey]]:
    groups: dict[tuple, list[LatentKey]] = {}
    for key in keys:
        groups.setdefault((key.bucket, key.resized), []).append(key)
    return list(groups.values())


def disk_path(image: Path) -> Path:
    """sd-scripts' cache file of an image: `<stem>.npz` beside it."""
    return image.with_suffix(".npz")


def write_npz(path: Path, key: LatentKey, dist: Distribution, flipped: Distribution | None,
              alpha_mask: Tensor | None = None) -> None:
    """Write one image's cache file atomically (a reader never sees half a file); `alpha_mask`, the
    unflipped (H, W) mask, under sd-scripts' key `alpha_mask`."""
    arrays = {
        "latents": dist.mean.float().numpy(), "latents_std": dist.std.float().numpy(),
        "original_size": np.array(image_size(key.path)), "crop_ltrb": np.array(crop_box(key.resized, key.bucket)),
        "resized_size": np.array(key.resized), "image_name": np.array(key.path.name),
        "resize_interpolation": np.array(key.interpolation or DEFAULT_RECORD),
    }
    if flipped is not None:
        arrays.update(latents_flipped=flipped.mean.float().numpy(), latents_flipped_std=flipped.std.float().numpy())
    if alpha_mask is not None:
        arrays["alpha_mask"] = alpha_mask.float().numpy()
    temporary = path.with_name(path.name + ".tmp.npz")
    np.savez(temporary, **arrays)
    os.replace(temporary, path)


def read_npz(path: Path, key: LatentKey) -> Distribution | None:
    """The cached distribution of `key`, or None when the file is missing, stale or for other settings."""
    if not path.is_file() or path.stat().st_mtime < key.path.stat().st_mtime:
        return None
    try:
        with np.load(path) as npz:
            names = ("latents_flipped", "latents_flipped_std") if key.flip else ("latents", "latents_std")
            if not all(n in npz for n in (*names, "resized_size", "image_name")):
                return None
            if str(npz["image_name"]) != key.path.name:  # a.png and a.jpg share a.npz
                return None
            # Files without the key (older ones, sd-scripts') may have been resized another way: re-encoded.
            interpolation = str(npz["resize_interpolation"]) if "resize_interpolation" in npz else None
            if interpolation != (key.interpolation or DEFAULT_RECORD):
                return None
            mean, std = npz[names[0]], npz[names[1]]
            expected = (key.bucket[1] // 8, key.bucket[0] // 8)
            if mean.shape[1:] != expected or tuple(npz["resized_size"]) != key.resized:
                return None
            return Distribution(torch.from_numpy(mean), torch.from_numpy(std))
    except (OSError, ValueError) as error:
        logger.warning("latent cache %s cannot be read (%s); it is rewritten", path, error)
        return None


def read_npz_alpha_mask(path: Path, key: LatentKey) -> Tensor | None:
    """The alpha mask in a cache file that `read_npz` accepted for `key` (flipped for a flipped key),
    or None when the file holds none of the bucket's size."""
    try:
        with np.load(path) as npz:
            if "alpha_mask" not in npz or npz["alpha_mask"].shape != (key.bucket[1], key.bucket[0]):
                return None
            mask = torch.from_numpy(npz["alpha_mask"].astype(np.float32))
    except (OSError, ValueError):
        return None
    return mask.flip(-1) if key.flip else mask
