"""`--cat_prompts FILE`: trigger-free prompts the CAT term preserves besides each sample's own
trigger-free caption (`library.cat.objective`, `CATBatch.prompt_ids`).

The training captions' trigger-free versions only cover what the captions say; a LoRA can still
bleed into prompts that match neither the trigger nor the class (another subject, another scene).
Each batch draws `--cat_prompts_per_step` K prompts from the file, without repeats, from its own
seeded stream (the run's seed, the epoch and the batch's place in it), so a resumed run draws the same;
every sample of the batch is also conditioned on each of them, at its own noisy latent and timestep,
and the base model's prediction there (every adapter off) is the target. A prompt that contains a
trigger would teach the LoRA to leave the trigger alone, so one is refused.
"""

from __future__ import annotations

from collections.abc import Iterable

from library.cat.captions import contains_trigger
from library.data.caption_transforms import sample_rng
from library.errors import UserInputError
from library.sampling.prompt_files import read_prompts


def read_cat_prompts(path: str, shown: str = "--cat_prompts") -> tuple[str, ...]:
    """The prompts of a --cat_prompts file (library.sampling.prompt_files); missing or empty is refused."""
    return read_prompts(path, shown)


class CatPrompts:
    """The file's prompts and the K drawn for each batch."""

    def __init__(self, path: str, per_step: int, triggers: Iterable[str]):
        self.path, self.per_step = path, per_step
        self.prompts = read_cat_prompts(path)
        triggers = tuple(triggers)
        with_trigger = [p for p in self.prompts if triggers and contains_trigger(p, triggers)]
        if with_trigger:
            raise UserInputError(
                f"--cat_prompts {path}: {len(with_trigger)} prompt(s) contain a trigger {list(triggers)}, e.g. "
                f"{with_trigger[0]!r}; the file is for prompts the LoRA must leave alone, so remove the trigger "
                "from them."
            )

    def draw(self, seed: int, epoch: int, position: int) -> list[str]:
        """The K prompts of the batch whose first sample is at `position` of `epoch`."""
        return sample_rng(seed, epoch, position, "cat_prompts").sample(self.prompts, self.per_step)
