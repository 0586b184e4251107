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
from typing import TYPE_CHECKING

import torch

from library.cat.preservation import FixedNoise, prediction_drift
from library.sampling.prompt_files import read_prompt_lines
from library.families.prompt_tokens import tokenize
from library.families.sd.denoiser import SDDenoiser
from library.sampling.state_guard import outside_training

if TYPE_CHECKING:
    from library.training.trainer import Run

DRIFT_TAG = "preservation/drift"
CHUNK = 8  # prompts per U-Net call: bounded memory for long prompt files


def read_preservation_prompts(path: str | Path, shown: str = "--preservation_prompts") -> tuple[str, ...]:
    """The file's trigger-free prompts (`library.sampling.prompt_files`); a missing or empty file is refused."""
    return tuple(prompt for _, prompt in read_prompt_lines(path, shown))


class PreservationDrift:
    """The training loop's probe: `measure` at the start, `after_step` after every optimizer step."""

    def __init__(self, run: "Run") -> None:
        self.run = run
        self.every = run.config.preservation.every_n_steps
        path = run.config.preservation.prompts
        self.prompts = read_preservation_prompts(path) if path else ()
        self.last: float | None = None
        if self.prompts and run.accelerator.is_main_process:
            self._inputs = self._fixed_inputs()

    def measure(self, step: int, bar) -> None:
        """Compute, log and show the drift now (main process; the others go on to the next collective)."""
        run = self.run
        if not self.prompts or not run.accelerator.is_main_process:
            return
        ids, latents, fixed = self._inputs
        with outside_training(run.sd.unet, run.sd.text_encoder, network=run.network, generator=run.generator):
            with run.accelerator.autocast():
                denoiser = SDDenoiser(run.sd.unet, run.sd.text_encoder, run.config.model.clip_skip)
                parts = [
                    (prediction_drift(denoiser, run.network, ids[i : i + CHUNK], latents[i : i + CHUNK],
                                      FixedNoise(fixed.noise[i : i + CHUNK], fixed.timesteps[i : i + CHUNK]),
                                      run.schedule.train), len(ids[i : i + CHUNK]))
                    for i in range(0, len(ids), CHUNK)
                ]
        self.last = sum(drift * count for drift, count in parts) / len(ids)
        if run.config.log.log_with:
            run.accelerator.log({DRIFT_TAG: self.last}, step=step)
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

    def _fixed_inputs(self) -> tuple[torch.Tensor, torch.Tensor, FixedNoise]:
        """Token ids, latents and noise/timesteps, drawn once from the run's seed on generators of their own."""
        run = self.run
        sd, device, dtype = run.sd, run.accelerator.device, run.sd.unet.dtype
        width, height = run.resolution
        factor = 2 ** (len(sd.vae.config.block_out_channels) - 1)
        shape = (len(self.prompts), sd.unet.config.in_channels, height // factor, width // factor)
        latents = torch.randn(shape, generator=torch.Generator().manual_seed(run.facts.seed))
        fixed = FixedNoise.draw(shape, run.facts.seed + 1, sd.noise_scheduler.config.num_train_timesteps)
        ids = tokenize(sd.tokenizer, list(self.prompts), run.config.model.max_token_length).to(device)
        return ids, latents.to(device, dtype), FixedNoise(fixed.noise.to(device, dtype), fixed.timesteps.to(device))
