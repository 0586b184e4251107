"""Prompts and training images for `evaluate_kps.py`, read simply and on their own.

- A prompt file: one prompt a line; blank lines and `#` comments skipped; sd-scripts' sample-prompt
  options (" --n ...", " --w ...") cut off, so the file used for sample images works here too.
- Training images (for the Identity Score): sd-scripts' `<repeats>_<class tokens>` folders under
  `--train_data_dir`, or the `[[datasets.subsets]] image_dir` entries of a `--dataset_config`
  (regularisation subsets skipped). A caption is the first line of `<stem><caption_extension>`,
  else the folder's class tokens.

Deliberately independent of the trainer's dataset code: evaluation only needs (image, caption).
"""

from __future__ import annotations

import re
from pathlib import Path

import toml

from library.errors import UserInputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
DREAMBOOTH_FOLDER = re.compile(r"^\d+_(.*)$")
SAMPLE_PROMPT_OPTION = re.compile(r"\s--\w")


def read_prompt_file(path: Path) -> list[tuple[int, str]]:
    """(line number, prompt) for each prompt line of `path`."""
    if not path.is_file():
        raise UserInputError(f"The --prompt_file {path} does not exist; give a text file with one prompt a line.")
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        prompt = SAMPLE_PROMPT_OPTION.split(line, maxsplit=1)[0].strip()
        if prompt and not prompt.startswith("#"):
            prompts.append((number, prompt))
    if not prompts:
        raise UserInputError(f"The --prompt_file {path} holds no prompt; write one prompt a line.")
    return prompts


def training_images(
    train_data_dir: Path | None = None, dataset_config: Path | None = None, caption_extension: str = ".txt"
) -> list[tuple[Path, str]]:
    """(image path, caption) of every training image, in a stable order."""
    if dataset_config is not None:
        folders = _config_folders(dataset_config, caption_extension)
    else:
        folders = _dreambooth_folders(train_data_dir, caption_extension)
    pairs = [
        (image, _caption(image, class_tokens, extension))
        for folder, class_tokens, extension in folders
        for image in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    ]
    if not pairs:
        source = dataset_config if dataset_config is not None else train_data_dir
        raise UserInputError(f"No training image ({', '.join(IMAGE_SUFFIXES)}) was found from {source}; check the path.")
    return pairs


def _dreambooth_folders(root: Path, extension: str) -> list[tuple[Path, str | None, str]]:
    """(folder, class tokens, caption extension) of each `<repeats>_<class tokens>` folder of `root`."""
    if not root.is_dir():
        raise UserInputError(
            f"The --train_data_dir {root} is not a folder; give the folder holding `10_sks teapot`-style folders."
        )
    folders = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        match = DREAMBOOTH_FOLDER.match(folder.name)
        if match:
            folders.append((folder, match.group(1).strip() or None, extension))
    if not folders:
        raise UserInputError(
            f"The --train_data_dir {root} has no `<repeats>_<class tokens>` folder (e.g. `10_sks teapot`); "
            "sd-scripts reads images only from such folders."
        )
    return folders


def _config_folders(path: Path, extension: str) -> list[tuple[Path, str | None, str]]:
    """(image_dir, class_tokens, caption extension) of each non-regularisation subset of a dataset config."""
    if not path.is_file():
        raise UserInputError(f"The --dataset_config {path} does not exist; give the TOML file used for training.")
    try:
        config = toml.load(path)
    except toml.TomlDecodeError as err:
        raise UserInputError(f"The --dataset_config {path} is not valid TOML ({err}).") from None
    general = config.get("general", {})
    folders = []
    for d, dataset in enumerate(config.get("datasets", [])):
        for s, subset in enumerate(dataset.get("subsets", [])):
            if subset.get("is_reg", False):
                continue
            if "image_dir" not in subset:
                raise UserInputError(
                    f"{path}: datasets[{d}].subsets[{s}] has no image_dir; evaluation reads images from folders only."
                )
            # The most specific level wins: subset, then dataset, then [general], then the flag.
            ext = next((level["caption_extension"] for level in (subset, dataset, general) if "caption_extension" in level),
                       extension)
            folders.append((Path(subset["image_dir"]), subset.get("class_tokens"), ext))
    for folder, _, _ in folders:
        if not folder.is_dir():
            raise UserInputError(f"{path}: image_dir {folder} is not a folder; fix the path in the file.")
    return folders


def _caption(image: Path, class_tokens: str | None, extension: str) -> str:
    caption_file = image.with_name(image.stem + extension)
    if caption_file.is_file():
        lines = caption_file.read_text(encoding="utf-8").splitlines()
        if lines and lines[0].strip():
            return lines[0].strip()
    if class_tokens:
        return class_tokens
    raise UserInputError(
        f"The training image {image} has no caption: {caption_file.name} is missing or empty and its subset has "
        "no class_tokens; write a caption file or set class_tokens."
    )
