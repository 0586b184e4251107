"""Latents: the cache (memory or .npz beside the images) gives exactly the latents encoded on the fly;
disk files are reused only when they fit the bucket, resize, flip and image."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from library.data.buckets import Placement
from library.data.image_loading import Augmentation, load_image
from library.data.latents import LatentCache, disk_path, encode, key_for, sample_latents
from library.testing.tiny_sd import build_tiny_sd


@pytest.fixture(scope="module")
def vae():
    return build_tiny_sd(seed=0).vae


@pytest.fixture()
def images(tmp_path):
    paths = []
    for index in range(3):
        path = tmp_path / f"{index}.png"
        Image.fromarray(np.random.default_rng(index).integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


PLACEMENT = Placement((64, 64), (96, 64), 0.5)


class Loader:
    """Counts the images the cache had to read (and so encode)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, key):
        self.calls += 1
        return load_image(key.path, key.bucket, key.resized, Augmentation(flip=key.flip))


def test_cached_latents_equal_the_ones_encoded_on_the_fly(vae, images):
    keys = [key_for(p, PLACEMENT, flip) for p in images for flip in (False, True)]
    cache = LatentCache(to_disk=False)
    cache.fill(keys, Loader(), vae, vae_batch_size=1)
    direct = encode(vae, torch.stack([Loader()(k) for k in keys]), vae_batch_size=1)
    cached = sample_latents(keys, [cache.get(k) for k in keys], 7)
    assert torch.equal(cached, sample_latents(keys, direct, 7))
    assert not torch.equal(cached[0], cached[1]), "the flipped image has its own latent"


def test_disk_cache_is_written_beside_the_images_and_reused(vae, images):
    keys = [key_for(p, PLACEMENT, flip) for p in images for flip in (False, True)]
    first = Loader()
    LatentCache(to_disk=True).fill(keys, first, vae, 1)
    assert first.calls == 6 and all(disk_path(p).is_file() for p in images)
    with np.load(disk_path(images[0])) as npz:
        assert npz["latents"].shape == (4, 8, 8) and "latents_flipped" in npz and list(npz["crop_ltrb"]) == [16, 0, 80, 64]
    again, second = LatentCache(to_disk=True), Loader()
    again.fill(keys, second, vae, 1)
    assert second.calls == 0, "valid files are read, not re-encoded"
    memory = LatentCache(to_disk=False)
    memory.fill(keys, Loader(), vae, 1)
    assert all(torch.equal(again.get(k).mean, memory.get(k).mean) for k in keys)


def test_stale_files_are_rewritten(vae, images):
    plain = [key_for(p, PLACEMENT) for p in images]
    LatentCache(to_disk=True).fill(plain, Loader(), vae, 1)
    flips = Loader()
    LatentCache(to_disk=True).fill(plain + [key_for(images[0], PLACEMENT, True)], flips, vae, 1)
    assert flips.calls == 1, "only the flipped latent that the file lacks is encoded"
    other_bucket = Loader()
    LatentCache(to_disk=True).fill([key_for(images[1], Placement((32, 32), (48, 32), 0.5))], other_bucket, vae, 1)
    assert other_bucket.calls == 1
    stamp = disk_path(images[2]).stat().st_mtime
    os.utime(images[2], (stamp + 10, stamp + 10))  # the image was edited after it was cached
    edited = Loader()
    LatentCache(to_disk=True).fill(plain, edited, vae, 1)
    # image 2 was edited; image 1's file holds the other bucket now (one file per image, as in sd-scripts).
    assert edited.calls == 2


def test_cache_groups_chunks_by_bucket(vae, images):
    """--vae_batch_size above 1 with buckets: each VAE call holds one image size."""
    other = Placement((32, 32), (48, 32), 0.5)
    keys = [key_for(images[0], PLACEMENT), key_for(images[1], other), key_for(images[2], PLACEMENT)]
    cache = LatentCache(to_disk=False)
    cache.fill(keys, Loader(), vae, vae_batch_size=4)
    assert cache.get(keys[1]).mean.shape == (4, 4, 4) and cache.get(keys[0]).mean.shape == (4, 8, 8)


def test_a_cache_file_of_another_image_with_the_same_stem_is_not_used(vae, tmp_path):
    Image.new("RGB", (96, 64), (255, 0, 0)).save(tmp_path / "a.png")
    LatentCache(to_disk=True).fill([key_for(tmp_path / "a.png", PLACEMENT)], Loader(), vae, 1)
    Image.new("RGB", (96, 64), (0, 0, 255)).save(tmp_path / "a.jpg")
    os.utime(disk_path(tmp_path / "a.png"), (4e9, 4e9))  # newer than either image
    loader = Loader()
    LatentCache(to_disk=True).fill([key_for(tmp_path / "a.jpg", PLACEMENT)], loader, vae, 1)
    assert loader.calls == 1, "a.npz belongs to a.png: a.jpg is encoded, not given a.png's latents"
