"""Prompts and training images for `evaluate_kps.py`, read simply and on their own.

- A prompt file: `library.sampling.prompt_files` (one prompt a line, sd-scripts' inline options cut off).
- Training images (for the Identity Score): from `--train_data_dir` or `--dataset_config`, read by
  the trainer's dataset code (`library.data.folder_dataset`, `library.data.dataset_config`), regularisation
  subsets left out.
"""

from __future__ import annotations

from pathlib import Path

from library.data.dataset_config import load_dataset_config
from library.errors import UserInputError
from library.data.folder_dataset import scan_folders
from library.sampling.prompt_files import read_prompt_lines
from library.cli.to_config import dataset_defaults

def read_prompt_file(path: Path) -> list[tuple[int, str]]:
    """(line number, prompt) for each prompt line of `path`."""
    return read_prompt_lines(path, "--prompt_file")


def training_images(
    train_data_dir: Path | None = None, dataset_config: Path | None = None, caption_extension: str = ".txt"
) -> list[tuple[Path, str]]:
    """(image path, caption) of every training image (regularisation images left out), read by the
    trainer's own dataset code, so evaluation sees the captions training saw (before its per-step
    transforms: prefix, shuffle, dropout)."""
    data = dataset_defaults(caption_extension=caption_extension, resolution=(512, 512))
    if dataset_config is not None:
        subsets = [s for spec in load_dataset_config(dataset_config, data) for s in spec.subsets]
    else:
        subsets = scan_folders(train_data_dir, caption_extension, is_reg=False)
    pairs = [(item.path, item.caption) for subset in subsets if not subset.is_reg for item in subset.items]
    for image, caption in pairs:
        if not caption:
            raise UserInputError(
                f"The training image {image} has no caption: {image.stem}{caption_extension} is missing or empty "
                "and its subset has no class_tokens; write a caption file or set class_tokens."
            )
    return pairs
