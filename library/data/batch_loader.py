"""Batches of an epoch read by DataLoader workers (`--max_data_loader_n_workers`,
`--persistent_data_loader_workers`), as sd-scripts reads them: the workers decode, resize, crop
and augment the images while the main process trains; the VAE stays in the main process.

Everything a worker does is a pure function of (seed, epoch, position), so the number of workers
never changes what is trained. With data parallelism each process reads every n-th batch of the
epoch, the epoch cut to a multiple of the number of processes so that all run the same steps.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from library.data.image_loading import Augmentation, load_image
from library.data.latents import LatentKey, key_for
from library.data.loss_masks import load_loss_mask
from library.data.run_data import augmentation
from library.data.training_data import Sample, TrainingData


@dataclass(frozen=True)
class LoadedBatch:
    """One batch: its samples, their augmentations, their pixels (None when latents are cached) and
    their loss masks (None for a sample without one, or whose alpha mask comes with its cached latents)."""

    samples: list[Sample]
    augmentations: list[Augmentation]
    pixels: torch.Tensor | None
    masks: list[torch.Tensor | None] = field(default_factory=list)

    def latent_keys(self) -> list[LatentKey]:
        """Each sample's latent-cache key (which also seeds its latent's noise)."""
        return [key_for(s.item.path, s.placement, a.flip, s.item.options.alpha_mask, s.item.options.resize_interpolation)
                for s, a in zip(self.samples, self.augmentations)]


class EpochBatches(Dataset):
    """This process's batches of any epoch, indexed by (epoch, batch index)."""

    def __init__(self, data: TrainingData, seed: int, processes: int, rank: int, load_pixels: bool):
        self.data, self.seed, self.processes, self.rank, self.load_pixels = data, seed, processes, rank, load_pixels
        self._epoch, self._batches = 0, []

    def batches(self, epoch: int) -> list[list[Sample]]:
        if epoch != self._epoch:  # each worker keeps the epoch it is reading
            batches = self.data.epoch_batches(epoch, self.seed)
            batches = batches[: len(batches) - len(batches) % self.processes]
            self._epoch, self._batches = epoch, batches[self.rank :: self.processes]
        return self._batches

    def __len__(self) -> int:
        return len(self.batches(1))

    def __getitem__(self, key: tuple[int, int]) -> LoadedBatch:
        epoch, index = key
        samples = self.batches(epoch)[index]
        augmentations = [augmentation(self.seed, s, epoch) for s in samples]
        pixels = None
        if self.load_pixels:
            pixels = torch.stack([load_image(s.item.path, s.placement.bucket, s.placement.resized, a,
                                             s.item.options.resize_interpolation)
                                  for s, a in zip(samples, augmentations)])
        return LoadedBatch(samples, augmentations, pixels, [self._mask(s, a) for s, a in zip(samples, augmentations)])

    def _mask(self, sample: Sample, augmentation: Augmentation) -> torch.Tensor | None:
        # Cached latents carry their alpha mask; a conditioning mask is read at every step, as sd-scripts does.
        if not self.load_pixels and sample.item.mask_path is None:
            return None
        return load_loss_mask(sample.item, sample.placement, augmentation)


class EpochSampler(Sampler):
    """Yields (epoch, index) for the batches of the epoch set last, from `skip` on (resuming)."""

    def __init__(self, batches: EpochBatches):
        self.source, self.epoch, self.skip = batches, 1, 0

    def start(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def __iter__(self):
        return iter([(self.epoch, i) for i in range(self.skip, len(self.source.batches(self.epoch)))])

    def __len__(self) -> int:
        return len(self.source.batches(self.epoch)) - self.skip


def batch_loader(batches: EpochBatches, workers: int, persistent: bool) -> tuple[DataLoader, EpochSampler]:
    """A DataLoader over `batches` with at most `workers` workers (no more than the CPU count, as
    sd-scripts does), and its sampler to point at an epoch before each pass."""
    sampler = EpochSampler(batches)
    workers = min(workers, os.cpu_count() or 1)
    loader = DataLoader(
        batches, sampler=sampler, batch_size=None, num_workers=workers,
        persistent_workers=persistent and workers > 0, collate_fn=_as_is,
        # Its own generator: starting an epoch must not draw from torch's global stream, which the
        # adapters' dropout uses and a resumed run restores (nothing a worker does is random).
        generator=torch.Generator().manual_seed(batches.seed),
    )
    return loader, sampler


def _as_is(batch: LoadedBatch) -> LoadedBatch:
    """A batch is already a batch: no collation."""
    return batch
