"""Validation on held-out images (`--validation_split`, `--validate_every_n_steps`,
`--validate_every_n_epochs`, `--max_validation_steps`), as sd-scripts validates.

A round runs every held-out batch (the first `--max_validation_steps` of them) at sd-scripts' four
fixed timesteps, evenly spaced inside [--min_timestep, --max_timestep] (200, 400, 600, 800 of 1000),
with noise drawn afresh from `--validation_seed` (else `--seed`) each round: every round sees the same
images, captions, noise and timesteps, so its value moves only because the adapter does. Logged with
sd-scripts' tags, `loss/validation/{step,epoch}_average` (the main term) and `..._divergence` (that
minus the mean training main term over the last epoch's worth of steps), and for CAT runs
`loss/validation/cat`: the preservation term on the held-out images, the counterpart of the training
`loss/cat`. FLUX.1's flow-matching timesteps are fixed the same way (sigma = t / 1000), where
sd-scripts' FLUX.1 validation draws them at random.

A round changes nothing in training (`SideTrip.outside_training`); it runs on the main process only,
as the drift probe does. Held-out latents are encoded once, at the first round, and kept on the CPU.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

from library.cat.objective import held_out_losses
from library.config.train_config import TrainConfig
from library.data.batch_loader import EpochBatches, LoadedBatch
from library.data.latents import encode, sample_latents
from library.data.loss_masks import batch_loss_mask
from library.data.run_data import free_caption, training_caption
from library.data.training_data import Sample, TrainingData
from library.sampling.side_trip import SideTrip
from library.training.caption_tokens import CaptionTokens
from library.training.trackers import log_values
from library.training.train_batch import Noising, image_geometry

logger = logging.getLogger(__name__)

NUM_VALIDATION_TIMESTEPS = 4  # sd-scripts' number
EPOCH = 1  # the held-out samples' fixed epoch: their captions and images are drawn once, the same every round
CAT_TAG = "loss/validation/cat"


def validation_timesteps(min_timestep: int | None, max_timestep: int | None, num_train_timesteps: int) -> list[int]:
    """sd-scripts' fixed timesteps: NUM_VALIDATION_TIMESTEPS points spaced evenly inside the range, ends excluded."""
    low = 0 if min_timestep is None else min_timestep
    high = num_train_timesteps if max_timestep is None else max_timestep
    return [int(t) for t in np.linspace(low, high, NUM_VALIDATION_TIMESTEPS + 2, dtype=int)[1:-1]]


@dataclass
class _HeldOutBatch:
    samples: list[Sample]
    latents: torch.Tensor  # on the CPU, in the denoiser's space
    trigger_ids: torch.Tensor
    free_ids: torch.Tensor
    conditioning: dict[str, torch.Tensor]  # the family's image conditioning
    loss_mask: torch.Tensor | None  # --masked_loss / alpha_mask, as training weights its main term


class Validation:
    """The training loop's validation: `record` each step's main loss, `after_step` after each
    optimizer step, `at_epoch_end` after each epoch. Without held-out images it does nothing."""

    def __init__(self, side: SideTrip, config: TrainConfig, data: TrainingData | None, *, run_seed: int,
                 noising: Noising, tokens: CaptionTokens, steps_per_epoch: int, latent_dtype: torch.dtype) -> None:
        self.side, self.config, self.noising, self.tokens = side, config, noising, tokens
        self.run_seed, self.latent_dtype = run_seed, latent_dtype
        args = config.validation
        self.every_n_steps, self.every_n_epochs = args.validate_every_n_steps, args.validate_every_n_epochs
        # Read as training reads its batches (resize, masks), at a fixed epoch, augmentations off.
        self.loader = EpochBatches(data, run_seed, 1, 0, load_pixels=True) if data else None
        self.count = min(len(self.loader.batches(EPOCH)), args.max_validation_steps or 10**9) if data else 0
        self.seed = run_seed if config.data.validation_seed is None else config.data.validation_seed
        self.timesteps = validation_timesteps(config.noise.min_timestep, config.noise.max_timestep,
                                              noising.num_train_timesteps)
        self.training_losses: deque[float] = deque(maxlen=steps_per_epoch)
        self._batches: list[_HeldOutBatch] | None = None
        if not data and (args.validate_every_n_steps or args.validate_every_n_epochs or args.max_validation_steps):
            logger.warning("--validate_every_n_* / --max_validation_steps: no images are held out, so there is no "
                           "validation; set --validation_split (or validation_split in the dataset config).")

    @property
    def enabled(self) -> bool:
        return self.count > 0

    def record(self, main_loss: float) -> None:
        """One training step's main term, for the divergence."""
        self.training_losses.append(main_loss)

    def after_step(self, step: int, epoch: int, bar) -> None:
        if self.enabled and self.every_n_steps and step % self.every_n_steps == 0:
            self.run("step", step, epoch, bar)

    def at_epoch_end(self, epoch: int, step: int, bar) -> None:
        if self.enabled and (self.every_n_epochs is None or epoch % self.every_n_epochs == 0):
            self.run("epoch", step, epoch, bar)

    def run(self, kind: str, step: int, epoch: int, bar) -> dict[str, float] | None:
        """One round: the losses on every held-out batch at every fixed timestep, logged under `kind`
        at global `step` during epoch `epoch` (epoch rounds at the epoch on TensorBoard's axis, as
        sd-scripts logs them)."""
        side = self.side
        if not self.enabled or not side.accelerator.is_main_process:
            return None
        with side.outside_training(with_vae=self._batches is None), side.accelerator.autocast():
            if self._batches is None:
                self._batches = [self._prepare(self.loader[EPOCH, index]) for index in range(self.count)]
            main, cat = self._losses()
        values = {f"loss/validation/{kind}_average": main}
        if self.training_losses:
            values[f"loss/validation/{kind}_divergence"] = main - sum(self.training_losses) / len(self.training_losses)
        if self.config.cat.enabled:
            values[CAT_TAG] = cat
        logger.info("validation (%s %d): %s", kind, step, ", ".join(f"{k} {v:.6f}" for k, v in values.items()))
        if bar is not None:
            bar.set_postfix(val=f"{main:.4f}")
        if self.config.log.log_with:
            log_values(side.accelerator, values, step=step, epoch=epoch,
                       tensorboard_step=epoch if kind == "epoch" else None)
        return values

    def _losses(self) -> tuple[float, float]:
        """Mean main and CAT terms over batches x timesteps, each batch weighted by its size."""
        side, config = self.side, self.config
        denoiser = side.models.denoiser(side.clip_skip)
        generator = torch.Generator().manual_seed(self.seed)  # the same noise every round
        device = side.accelerator.device
        totals = torch.zeros(2, dtype=torch.float64)
        count = 0
        for batch in self._batches:
            mask = None if batch.loss_mask is None else batch.loss_mask.to(device)
            for timestep in self.timesteps:
                cat_batch, loss_fn = self.noising.batch(
                    batch.latents.to(device, self.latent_dtype), batch.trigger_ids, batch.free_ids,
                    torch.ones(len(batch.samples)), config.noise, config.loss, generator,
                    conditioning=batch.conditioning, timestep=timestep, loss_mask=mask,
                )
                losses = held_out_losses(denoiser, side.network, cat_batch, config.cat.weight, loss_fn)
                totals += torch.stack([losses.main, losses.cat]).double().cpu() * len(batch.samples)
                count += len(batch.samples)
        main, cat = (totals / count).tolist()
        return main, cat

    def _prepare(self, batch: LoadedBatch) -> _HeldOutBatch:
        """A held-out batch's latents, token ids, conditioning and mask, made once."""
        side, samples = self.side, batch.samples
        dists = encode(side.models.vae, batch.pixels, len(batch.pixels))
        latents = side.models.latents_from_vae(sample_latents(batch.latent_keys(), dists, self.run_seed)).cpu()
        captions = [training_caption(self.run_seed, s, EPOCH) for s in samples]
        free = [free_caption(self.config, s.item, c) for s, c in zip(samples, captions)]
        conditioning = side.models.image_conditioning([image_geometry(s, a) for s, a in zip(samples, batch.augmentations)])
        return _HeldOutBatch(samples, latents, self.tokens(captions), self.tokens(free), conditioning,
                             batch_loss_mask(batch.masks, samples[0].placement.bucket))
