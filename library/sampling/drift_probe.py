"""A cheap preservation signal during training (`--preservation_prompts`, `--preservation_every_n_steps`).

Every N optimizer steps (and once before the first), the mean squared difference between the adapted
and the base U-Net's predictions on the file's trigger-free prompts (`library.cat.preservation.
prediction_drift`), logged as `preservation/drift` and shown on the progress bar. The inputs are the
same at every evaluation: latents of the training resolution and noise and timesteps drawn once from
the run's seed, so the curve moves only because the adapter does. A fresh LoRA starts at exactly 0
(its up-projections are zero); plain LoRA training usually climbs, CAT holds it down. Measuring
changes nothing in training (`library.sampling.state_guard.outside_training`).
"""

from __future__ import annotations

from pathlib import Path
import torch

from library.cat.preservation import FixedNoise, prediction_drift
from library.config.train_config import PreservationArgs
from library.sampling.prompt_files import read_prompts
from library.sampling.side_trip import SideTrip
from library.families.family import compute_dtype

DRIFT_TAG = "preservation/drift"
CHUNK = 8  # prompts per U-Net call: bounded memory for long prompt files


def read_preservation_prompts(path: str | Path, shown: str = "--preservation_prompts") -> tuple[str, ...]:
    """The file's trigger-free prompts (`library.sampling.prompt_files`); a missing or empty file is refused."""
    return read_prompts(path, shown)


class PreservationDrift:
    """The training loop's probe: `measure` at the start, `after_step` after every optimizer step.

    `resolution` is the latents' size in pixels (the first dataset's), `noising` noises as training
    does (`add_noise`, `num_train_timesteps`); `log` sends the value to the run's trackers.
    """

    def __init__(self, side: SideTrip, args: PreservationArgs, *, resolution: tuple[int, int], run_seed: int,
                 noising, log: bool) -> None:
        self.side, self.every, self.log = side, args.every_n_steps, log
        self.noising = noising
        self.prompts = read_preservation_prompts(args.prompts) if args.prompts else ()
        self.last: float | None = None
        if self.prompts and side.accelerator.is_main_process:
            self._inputs = self._fixed_inputs(resolution, run_seed)

    def measure(self, step: int, bar) -> None:
        """Compute, log and show the drift now (main process; the others go on to the next collective)."""
        side = self.side
        if not self.prompts or not side.accelerator.is_main_process:
            return
        ids, latents, fixed = self._inputs
        with side.outside_training(), side.accelerator.autocast():
            denoiser = side.models.denoiser(side.clip_skip)
            parts = [
                (prediction_drift(denoiser, side.network, ids[i : i + CHUNK], latents[i : i + CHUNK],
                                  FixedNoise(fixed.noise[i : i + CHUNK], fixed.timesteps[i : i + CHUNK]),
                                  self.noising), len(ids[i : i + CHUNK]))
                for i in range(0, len(ids), CHUNK)
            ]
        self.last = sum(drift * count for drift, count in parts) / len(ids)
        if self.log:
            side.accelerator.log({DRIFT_TAG: self.last}, step=step)
        self.show(bar)

    def after_step(self, step: int, bar) -> None:
        if self.prompts and step % self.every == 0:
            self.measure(step, bar)
        else:
            self.show(bar)

    def show(self, bar) -> None:
        """Add the latest drift to the progress bar's text (the loss logging rewrites it every step)."""
        if self.last is not None:
            bar.set_postfix_str(", ".join(part for part in (bar.postfix, f"drift={self.last:.3g}") if part))

    def _fixed_inputs(self, resolution: tuple[int, int], seed: int) -> tuple[torch.Tensor, torch.Tensor, FixedNoise]:
        """Token ids, latents and noise/timesteps, drawn once from the run's seed on generators of their own."""
        models, device = self.side.models, self.side.accelerator.device
        dtype = compute_dtype(models.unet)
        width, height = resolution
        shape = models.latent_shape(len(self.prompts), width, height)
        latents = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
        fixed = FixedNoise.draw(shape, seed + 1, self.noising.num_train_timesteps)
        ids = models.tokenize(list(self.prompts), self.side.max_token_length).to(device)
        return ids, latents.to(device, dtype), FixedNoise(fixed.noise.to(device, dtype), fixed.timesteps.to(device))
