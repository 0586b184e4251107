"""The data side of a training run: which images, checked how, and what each sample trains on.

- `load_training_data(config)`: the datasets from `--dataset_config` or the folders, every problem
  (folder names, empty folders, unreadable images, CAT triggers missing from captions, cache with
  per-step augmentations, face crops that cannot be made) gathered and reported in one error before
  any model loads.
- `training_caption`, `free_caption`, `augmentation`: what one sample of one epoch trains on. Each
  draws from its own seeded stream, so a resumed run and a cached run see exactly the same.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Callable

from library.data.buckets import BucketSettings, check_bucket_settings
from library.data.caption_transforms import sample_rng, transform_caption
from library.cat.caption_weights import weight_syntax_problem
from library.cat.captions import class_word_from_tokens, contains_trigger, tidy_caption, trigger_free_caption
from library.data.dataset_config import cli_subset_values, load_dataset_config, subset_options
from library.errors import UserInputError
from library.data.folder_dataset import ImageItem, Subset, scan_folders, subset_from_metadata
from library.data.loss_masks import mask_problems
from library.data.face_crop import FaceCrop, face_crop, face_crop_problem, face_position
from library.data.image_loading import COLOR_AUG_RATE, GAMMA_RANGE, MAX_HUE_SHIFT, Augmentation, image_size
from library.config.train_config import TrainConfig
from library.data.training_data import DatasetSpec, Sample, TrainingData, place_datasets
from library.data.validation_split import split_for_validation

logger = logging.getLogger(__name__)


def load_training_data(config: TrainConfig, run_seed: int = 0) -> TrainingData:
    """The datasets, every image checked and placed in its bucket; all problems in one error. Images
    held out by a validation split (drawn with `run_seed` where a dataset sets no validation_seed)
    are its `validation` data."""
    problems: list[str] = []
    specs = _dataset_specs(config, problems)
    for spec in specs:
        for subset in spec.subsets:
            problems += _cache_problems(config, subset)
            problems += _face_crop_problems(config, spec, subset)
            problems += mask_problems(subset, spec.buckets.enable)
            if config.cat.enabled:
                problems += _cat_problems(config, subset)
            if config.model.weighted_captions:
                problems += _weight_problems(subset)
    problems += _masked_loss_problems(config, [subset for spec in specs for subset in spec.subsets])
    training, held_out = split_for_validation(specs, run_seed)
    placed = place_datasets(training + held_out, problems).datasets
    if any(spec.validation_split for spec in specs) and not held_out:
        logger.warning("validation_split holds out no image (each subset keeps ceil(images x (1 - split)) to train "
                       "on): there is no validation; raise the split or add images.")
    validation = TrainingData(placed[len(training):]) if held_out else None
    return TrainingData(placed[: len(training)], validation=validation)


def _dataset_specs(config: TrainConfig, problems: list[str]) -> list[DatasetSpec]:
    data = config.data
    if data.dataset_config:
        return load_dataset_config(data.dataset_config, data, problems)
    options = subset_options(cli_subset_values(data))
    if data.in_json:  # sd-scripts' older fine-tune method: captions from a metadata file
        try:
            subsets = [subset_from_metadata(Path(data.in_json), Path(data.train_data_dir), data.dataset_repeats,
                                            options=options)]
        except UserInputError as error:
            problems.append(f"--in_json: {error}")
            subsets = []
    else:
        subsets = scan_folders(data.train_data_dir, data.caption_extension, False, options, problems)
    if data.reg_data_dir:
        subsets += scan_folders(data.reg_data_dir, data.caption_extension, True, options, problems)
    if data.resolution is None:
        raise UserInputError("No resolution: give --resolution (e.g. 512) or resolution in the dataset config.")
    buckets = BucketSettings(data.resolution, data.enable_bucket, data.min_bucket_reso, data.max_bucket_reso,
                             data.bucket_reso_steps, data.bucket_no_upscale)
    problems += check_bucket_settings(buckets, "the command line", data.bucket_reso_multiple)
    return [DatasetSpec(tuple(subsets), data.train_batch_size, buckets, data.validation_split, data.validation_seed)]


def _masked_loss_problems(config: TrainConfig, subsets: list[Subset]) -> list[str]:
    """--masked_loss needs a mask somewhere (sd-scripts silently trains unmasked without one)."""
    has_masks = any(s.options.alpha_mask or any(item.mask_path for item in s.items) for s in subsets)
    if not config.data.masked_loss or has_masks:
        return []
    return ["--masked_loss is on but no image has a mask: set conditioning_data_dir (a folder of masks named like "
            "the images) in the subsets of --dataset_config, or use the images' alpha channel with --alpha_mask "
            "(or alpha_mask = true in a subset)"]


def _cache_problems(config: TrainConfig, subset: Subset) -> list[str]:
    """Cached latents are encoded once, so they cannot follow per-step random crops or colour shifts
    (sd-scripts refuses the same; flips are cached both ways). On disk, `a.png` and `a.jpg` would
    share `a.npz`."""
    problems = []
    cached = config.data.cache_latents or config.data.cache_latents_to_disk
    if cached and (subset.options.color_aug or subset.options.random_crop):
        problems.append(f"{subset.folder}: --cache_latents cannot be used with color_aug or random_crop, because "
                        "cached latents are encoded once; turn the cache or those augmentations off")
    if config.data.cache_latents_to_disk:
        stems: dict[Path, list[str]] = {}
        for item in subset.items:
            stems.setdefault(item.path.with_suffix(""), []).append(item.path.name)
        problems += [f"{stem.parent}: {' and '.join(names)} would share the latent cache file {stem.name}.npz; "
                     "rename one of them" for stem, names in stems.items() if len(names) > 1]
    return problems


def _face_crop_problems(config: TrainConfig, spec: DatasetSpec, subset: Subset) -> list[str]:
    """face_crop_aug_range crops each step's image around its face, without buckets (sd-scripts ignores it
    with buckets and with cached latents: refused here); names it cannot read and images it would have
    to enlarge stop sd-scripts at their batch: found here, before training."""
    if subset.options.face_crop_aug_range is None:
        return []
    where = f"{subset.folder}: face_crop_aug_range"
    if spec.buckets.enable:
        return [f"{where} crops without buckets only (sd-scripts ignores it with enable_bucket); turn enable_bucket "
                "off for this dataset, or remove face_crop_aug_range"]
    if config.data.cache_latents or config.data.cache_latents_to_disk:
        return [f"{where} changes every step's crop, and cached latents are encoded once (sd-scripts ignores the "
                "face crop when caching); turn the cache or face_crop_aug_range off"]
    if subset.options.alpha_mask or any(item.mask_path for item in subset.items):
        return [f"{where}: loss masks do not follow face crops yet; turn the masks or face_crop_aug_range off"]
    problems = []
    for item in subset.items:
        try:
            problem = face_crop_problem(item.path, image_size(item.path), spec.buckets.resolution)
        except UserInputError as error:
            problem = str(error)
        except (OSError, ValueError):
            continue  # an unreadable image is reported with the others
        if problem:
            problems.append(problem)
    return problems


def _cat_problems(config: TrainConfig, subset: Subset) -> list[str]:
    """Every training subset needs a trigger that its captions contain, and a class word in class mode."""
    triggers = subset_triggers(config, subset.cat_triggers)
    if subset.is_reg or config.cat.caption == "empty":
        return []
    if not triggers:
        return [f"CAT is on but {subset.folder} has no trigger: give --cat_trigger, or cat_trigger in its "
                "dataset-config subset, or use --cat_caption empty"]
    if not any(contains_trigger(item.caption, triggers) for item in subset.items):
        return [f"the trigger {list(triggers)} appears in none of the {len(subset.items)} captions of "
                f"{subset.folder}; put the trigger in the captions (or the folder's class tokens), or fix "
                "--cat_trigger / cat_trigger"]
    if config.cat.caption == "class" and not class_word(config, subset.class_tokens, triggers, subset.cat_class_word):
        return [f"--cat_caption class needs a class word, and the folder {subset.folder} gives none (its class "
                f"tokens '{subset.class_tokens}' are only the trigger); add --cat_class_word (or cat_class_word in "
                "the dataset config), or rename the folder e.g. '10_sks teapot'"]
    return []


def _weight_problems(subset: Subset) -> list[str]:
    """--weighted_captions: every caption's weights must be numbers (sd-scripts stops mid-run on one that is not)."""
    found = ((item, weight_syntax_problem(item.caption)) for item in subset.items)
    return [f"--weighted_captions: {item.path}: {problem}" for item, problem in found if problem]


def subset_triggers(config: TrainConfig, own: tuple[str, ...]) -> tuple[str, ...]:
    """A subset's own triggers (multi-concept dataset configs), else --cat_trigger."""
    return own or config.cat.triggers


def class_word(config: TrainConfig, class_tokens: str, triggers: tuple[str, ...], own: str | None = None) -> str:
    """The class word for --cat_caption class: the subset's, --cat_class_word, else its class tokens without the trigger."""
    if own or config.cat.class_word:
        return own or config.cat.class_word
    return class_word_from_tokens(class_tokens, triggers) if triggers else class_tokens


def trigger_free_prompt(config: TrainConfig, data: TrainingData) -> Callable[[str], str]:
    """A prompt -> the prompt as CAT's preservation term would see it (--cat_caption, --cat_trigger),
    for prompts written outside the dataset (sample prompts, read with weights where the family's
    samples have them)."""
    cat = config.cat
    triggers = cat.triggers or tuple(t for subset in data.subsets for t in subset.cat_triggers)
    # --cat_caption class takes the class word of the first training subset that has one.
    words = (class_word(config, s.class_tokens, triggers, s.cat_class_word) for s in data.subsets if not s.is_reg)
    word = next((word for word in words if word), None) if cat.caption == "class" and triggers else None
    mode = cat.caption if word or cat.caption != "class" else "strip"

    def rewrite(prompt: str) -> str:
        if cat.caption == "empty":
            return ""
        if not triggers:
            return prompt
        return trigger_free_caption(prompt, triggers, mode, word, config.data.caption_separator,
                                    weighted=config.sample.defaults.weights)

    return rewrite


def training_caption(seed: int, sample: Sample, epoch: int, step: int = 0, max_train_steps: int = 0) -> str:
    """The caption this sample trains on this epoch (its subset's prefix, dropout, shuffle...), at global
    `step` (optimizer steps done) of a run of `max_train_steps` (token warmup)."""
    rng = sample_rng(seed, epoch, sample.position)
    return transform_caption(sample.item.caption, rng, sample.item.options.captions, epoch, step, max_train_steps)


def varying_caption_options(subset: Subset) -> list[str]:
    """The caption options of `subset` that make its captions change from step to step (none: each
    image always trains on the same caption, which text-encoder output caching needs)."""
    captions = subset.options.captions
    options = {"shuffle_caption": captions.shuffle, "caption_dropout_rate": captions.dropout_rate > 0,
               "caption_dropout_every_n_epochs": captions.dropout_every_n_epochs > 0,
               "caption_tag_dropout_rate": captions.tag_dropout_rate > 0, "enable_wildcard": captions.wildcard,
               "token_warmup_step": captions.token_warmup_step > 0}
    return [name for name, varies in options.items() if varies]


def fixed_caption(item: ImageItem) -> str:
    """The caption `item` trains on at every step, for a subset without `varying_caption_options`."""
    return transform_caption(item.caption, random.Random(0), item.options.captions)


def free_caption(config: TrainConfig, item: ImageItem, caption: str) -> str:
    """The trigger-free caption y of this sample's training caption (the same caption when CAT is off);
    each sample strips its own trigger."""
    triggers = subset_triggers(config, item.cat_triggers)
    if not config.cat.enabled or (config.cat.caption != "empty" and not triggers):
        return caption
    word = class_word(config, item.class_tokens, triggers, item.cat_class_word) if config.cat.caption == "class" else None
    separator = item.options.captions.separator
    free = trigger_free_caption(caption, triggers, config.cat.caption, word, separator,
                                weighted=config.model.weighted_captions)
    # Shuffled or thinned captions are joined back with ", " whatever the subset's separator.
    return tidy_caption(free, ",") if separator.strip() not in ("", ",") else free


def augmentation(seed: int, sample: Sample, epoch: int) -> Augmentation:
    """This sample's random crop, flip and colour change, from its own stream (apart from the caption's).
    Colour as sd-scripts: a third of the samples, half of those a hue shift, half a gamma. With
    face_crop_aug_range, an image with a face position is face-cropped (from a stream of its own)."""
    options = sample.item.options
    rng = sample_rng(seed, epoch, sample.position, "image")
    crop = (rng.random(), rng.random()) if options.random_crop else None
    flip = options.flip_aug and rng.random() < 0.5
    hue, gamma = 0.0, 1.0
    if options.color_aug and rng.random() <= COLOR_AUG_RATE:
        if rng.random() > 0.5:
            hue = rng.uniform(-MAX_HUE_SHIFT, MAX_HUE_SHIFT)
        else:
            gamma = rng.uniform(*GAMMA_RANGE)
    return Augmentation(crop, flip, hue, gamma, _face_crop(seed, sample, epoch))


def _face_crop(seed: int, sample: Sample, epoch: int) -> FaceCrop | None:
    """The face crop of this sample this epoch, or None (no face_crop_aug_range, or no face position)."""
    options, placement = sample.item.options, sample.placement
    face = face_position(sample.item.path) if options.face_crop_aug_range and placement.original else None
    if face is None:
        return None
    rng = sample_rng(seed, epoch, sample.position, "face")
    return face_crop(placement.original, face, placement.bucket, options.face_crop_aug_range, options.random_crop, rng)
