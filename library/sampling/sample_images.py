"""Sample images while training (`--sample_prompts`), and CAT's three-way comparison strip.

When (sd-scripts' rule): `--sample_at_first` before the first step; `--sample_every_n_epochs N` at the
end of every N-th epoch, the last one included; otherwise `--sample_every_n_steps N` after every N-th
optimizer step (step sampling is ignored when epoch sampling is set, as in sd-scripts).

Where: `{output_dir}/sample/{output_name}_{e000001|000100}_{index:02d}_{YYYYmmddHHMMSS}[_{seed}].png`,
sd-scripts' names (no `{output_name}_` when --output_name is not given; `_{seed}` when the prompt
sets `--d`); with a wandb tracker, also there as `sample_{index}`. With `--sample_cat_compare` each file is a strip of three images from the same noise:
the base model (every adapter off) and the adapted model on the trigger-free prompt, then the
adapted model on the prompt as written. The first two differ only by the adapter, so they show what
CAT preserves; the last two differ only by the trigger, so they show what the LoRA learned.

How: the family's diffusers pipeline on the training models, the sampler built from the model's
own noise-schedule config, prompts encoded as sd-scripts' samples encode them (clip skip; `(word:1.2)`
weights on SD 1.x/2.x and SDXL, as `ModelFamily.prompt_kwargs(weighted=True)` reads them), a
generator of its own per prompt; the main process samples while the others wait. Training is left
exactly as it was (`library.sampling.state_guard.outside_training`). The models come as a
`library.families.family.ModelFamily`: its pipeline, prompt embeddings and decoder.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Callable, Iterator

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from library.cat.network_protocol import multiplier_set_to
from library.config.train_config import SampleArgs
from library.families.family import ModelFamily
from library.sampling.sample_prompts import SamplePrompt, canonical_sampler, load_sample_prompts
from library.sampling.samplers import inference_scheduler
from library.sampling.side_trip import SideTrip

logger = logging.getLogger(__name__)

STRIP_ORDER = "base model, trigger-free prompt | adapted, trigger-free prompt | adapted, prompt as written"


def sample_file_name(output_name: str | None, epoch: int | None, step: int, index: int, seed: int | None,
                     timestamp: str) -> str:
    """sd-scripts' sample file name: epoch samples are `e{epoch:06d}`, the others `{step:06d}`."""
    number = f"e{epoch:06d}" if epoch is not None else f"{step:06d}"
    prefix = "" if output_name is None else f"{output_name}_"
    suffix = "" if seed is None else f"_{seed}"
    return f"{prefix}{number}_{index:02d}_{timestamp}{suffix}.png"


def due_after_step(sample: SampleArgs, step: int) -> bool:
    """Step sampling: every N steps, unless epoch sampling is set (sd-scripts then ignores it)."""
    return sample.every_n_epochs is None and sample.every_n_steps is not None and step % sample.every_n_steps == 0


def due_at_epoch_end(sample: SampleArgs, epoch: int) -> bool:
    """Epoch sampling: at the end of every N-th epoch (counted from 1)."""
    return sample.every_n_epochs is not None and epoch % sample.every_n_epochs == 0


def default_seed(run_seed: int, index: int) -> int:
    """The seed of a prompt without `--d`: fixed per run and prompt, so every sampling point of a
    prompt starts from the same noise and the images show training, not a new draw (sd-scripts draws
    a fresh random seed each time)."""
    return (run_seed + index) % 2**32


def scheduled_sample_prompts(sample: SampleArgs) -> tuple[SamplePrompt, ...]:
    """The prompts to sample, read and checked now; none when no sampling is scheduled (sd-scripts then
    ignores the prompt file, which GUIs always name, so it is not read)."""
    scheduled = sample.at_first or sample.every_n_steps or sample.every_n_epochs
    if sample.prompts and not scheduled:
        logger.info("--sample_prompts without --sample_every_n_steps/--sample_every_n_epochs/--sample_at_first: "
                    "no samples are made, as in sd-scripts.")
    elif scheduled and not sample.prompts:
        logger.warning("sampling is scheduled but no --sample_prompts file is given: no samples are made.")
    return load_sample_prompts(sample.prompts, sample.defaults) if sample.prompts and scheduled else ()


def side_by_side(images: list[Image.Image]) -> Image.Image:
    """One image of `images` placed left to right."""
    strip = Image.new("RGB", (sum(image.width for image in images), max(image.height for image in images)))
    left = 0
    for image in images:
        strip.paste(image, (left, 0))
        left += image.width
    return strip


def send_to_wandb(accelerator, index: int, image: Image.Image, prompt: str, step: int) -> None:
    """With a wandb tracker, the image goes there too, as sd-scripts sends it: `sample_<index>`, captioned
    with its prompt (at the training step, beside that step's losses)."""
    if "wandb" not in [tracker.name for tracker in accelerator.trackers]:
        return
    import wandb

    accelerator.get_tracker("wandb").log({f"sample_{index}": wandb.Image(image, caption=prompt)}, step=step)


class SampleImages:
    """The training loop's sampler: call `at_first`, `after_step` and `at_epoch_end`; each writes the
    prompt file's images when sd-scripts' schedule says so, and does nothing otherwise.

    `trigger_free` rewrites a prompt as CAT's preservation term sees it (for `--sample_cat_compare`).
    """

    def __init__(self, side: SideTrip, args: SampleArgs, prompts: tuple[SamplePrompt, ...], *, folder: Path,
                 output_name: str | None, run_seed: int, trigger_free: Callable[[str], str]) -> None:
        self.side, self.args, self.prompts = side, args, prompts
        self.folder, self.output_name, self.run_seed = folder, output_name, run_seed
        self.trigger_free = trigger_free
        self.default_sampler = canonical_sampler(args.sampler, "--sample_sampler")

    def at_first(self, step: int) -> None:
        if self.args.at_first:
            self._sample(epoch=0, step=step)

    def after_step(self, step: int) -> None:
        if due_after_step(self.args, step):
            self._sample(epoch=None, step=step)

    def at_epoch_end(self, epoch: int, step: int) -> None:
        if due_at_epoch_end(self.args, epoch):
            self._sample(epoch=epoch, step=step)

    def _sample(self, epoch: int | None, step: int) -> list[Path]:
        accelerator = self.side.accelerator
        written: list[Path] = []
        if self.prompts and accelerator.is_main_process:
            self.folder.mkdir(parents=True, exist_ok=True)
            with self.side.outside_training(with_vae=True), _vae_beside_unet(self.side.models):
                pipe = self.side.models.pipeline()
                pipe.set_progress_bar_config(disable=True)
                for prompt in self.prompts:
                    written.append(self._write(pipe, prompt, epoch, step))
            logger.info("wrote %d sample images to %s", len(written), self.folder)
        if self.prompts:
            accelerator.wait_for_everyone()
        return written

    def _write(self, pipe, prompt: SamplePrompt, epoch: int | None, step: int) -> Path:
        seed = prompt.seed if prompt.seed is not None else default_seed(self.run_seed, prompt.index)
        generate = self._text_to_image(pipe, prompt, seed)
        info = PngInfo()
        info.add_text("prompt", prompt.prompt)
        guidance = "" if prompt.guidance is None else f", guidance {prompt.guidance}"
        info.add_text("parameters", f"seed {seed}, {prompt.steps} steps, scale {prompt.scale}{guidance}, "
                                    f"{prompt.width}x{prompt.height}, sampler {prompt.sampler or self.default_sampler}")
        if self.args.cat_compare:
            free = self.trigger_free(prompt.prompt)
            with multiplier_set_to(self.side.network, 0.0):
                base = generate(free)
            image = side_by_side([base, generate(free), generate(prompt.prompt)])
            info.add_text("cat_compare", f"{STRIP_ORDER}; trigger-free prompt: {free}")
        else:
            image = generate(prompt.prompt)
        timestamp = time.strftime("%Y%m%d%H%M%S", time.localtime())
        path = self.folder / sample_file_name(self.output_name, epoch, step, prompt.index, prompt.seed, timestamp)
        image.save(path, pnginfo=info)
        send_to_wandb(self.side.accelerator, prompt.index, image, prompt.prompt, step)
        return path

    def _text_to_image(self, pipe, prompt: SamplePrompt, seed: int) -> Callable[[str], Image.Image]:
        """A function text -> image with this prompt's settings, starting each time from the same noise."""
        side, models = self.side, self.side.models
        pipe.scheduler = inference_scheduler(prompt.sampler or self.default_sampler, models.noise_scheduler)

        def generate(text: str) -> Image.Image:
            with side.accelerator.autocast():
                embeds = models.prompt_kwargs(text, prompt.negative_prompt or "", side.clip_skip, side.max_token_length,
                                              weighted=self.args.defaults.weights)
                latents = models.sample_latents(
                    pipe, embeds, width=prompt.width, height=prompt.height, steps=prompt.steps, scale=prompt.scale,
                    guidance=prompt.guidance, generator=torch.Generator().manual_seed(seed),
                )
            return models.decode_image(latents)

        return generate


@contextlib.contextmanager
def _vae_beside_unet(models: ModelFamily) -> Iterator[None]:
    """The pipeline runs on the device of its first model, the VAE: keep it beside the U-Net while sampling."""
    device = models.vae.device
    models.vae.to(models.unet.device)
    try:
        yield
    finally:
        models.vae.to(device)
