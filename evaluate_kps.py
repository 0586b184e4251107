"""Measure how well LoRAs preserve the base model: PS, IS and KPS (arXiv 2404.07554, Section 3).

    python evaluate_kps.py --pretrained_model_name_or_path sd15.safetensors \
        --lora plain.safetensors cat.safetensors --trigger sks --train_data_dir data/train \
        --clip_model ViT-L-14 --clip_pretrained ViT-L-14.pt --seed 0 --images_per_prompt 2 --output_dir kps

For each LoRA (loaded with diffusers' `load_lora_weights`, as users load it) and for the base model,
it generates images from the trigger prompts (`y_T`), from the same prompts without the trigger
(`y`, same seed), and from each training image's caption; then scores them with open_clip and
writes results.json, results.md and grid_<adapter>.png to --output_dir. A re-run with the same
arguments reuses the images already generated. Prompts are encoded as training encoded them, with
each LoRA's clip skip and token length from its metadata unless --clip_skip / --max_token_length
say otherwise; the base model takes the first LoRA's (library/evaluation/kps_conditioning.py).
The base model is Stable Diffusion 1.x/2.x, SDXL or FLUX.1, as the checkpoint itself says
(library/families/detect.py); its LoRAs must be of the same family. A FLUX.1 transformer file is given
with --clip_l, --t5xxl and --ae, as for training; its --guidance_scale is FLUX.1-dev's guidance input
(diffusers' FluxPipeline `guidance_scale`, default 3.5; no classifier-free guidance).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch

import library  # noqa: F401  (before diffusers: quiets an irrelevant bitsandbytes import warning)
from library.cat.captions import CAPTION_MODES, contains_trigger, trigger_free_caption
from library.errors import UserInputError
from library.evaluation.kps_clip import load_clip
from library.evaluation.kps_conditioning import TOKEN_LENGTHS, choose_conditionings
from library.evaluation.kps_data import read_prompt_file, training_images
from library.evaluation.kps_images import (
    Adapter, GenerationSettings, PlannedImage, PromptPair, bytes_fingerprint, files_fingerprint, generate_images,
    plan_images,
)
from library.evaluation.kps_report import results_json, results_table, write_grid, write_text
from library.evaluation.kps_scoring import score_adapters
from library.evaluation.lora_fit import check_lora_fits
from library.config.training_script import FLUX_SCRIPT, SDXL_SCRIPT, TrainingScript
from library.sampling.samplers import SAMPLERS, inference_scheduler
from library.families.detect import detect_family
from library.families.family import ModelFamily
from library.families.flux.models import load_flux
from library.families.sd.models import load_stable_diffusion
from library.families.sdxl.models import load_sdxl
from networks.lora_cat.file_format import read_lora_file
from networks.lora_cat.targets import diffusers_layout_unet_names

logger = logging.getLogger(__name__)

BASE_MODEL = "base model"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class KPSConfig:
    """Everything the evaluation reads from its command line, checked."""

    pretrained_model_name_or_path: Path
    v2: bool
    v_parameterization: bool
    vae: Path | None
    model_config: Path | None
    clip_l: Path | None
    t5xxl: Path | None
    ae: Path | None
    t5xxl_max_token_length: int | None
    apply_t5_attn_mask: bool
    loras: tuple[Path, ...]
    triggers: tuple[str, ...]
    caption_mode: str
    class_word: str | None
    prompt_file: Path | None
    train_data_dir: Path | None
    dataset_config: Path | None
    caption_extension: str
    seeds: tuple[int, ...]
    output_dir: Path
    clip_model: str
    clip_pretrained: str | None
    device: str
    dtype: str
    sampler: str
    sample_steps: int
    guidance_scale: float | None  # None: the family's (7.5 classifier-free; FLUX.1's guidance input 3.5)
    width: int | None
    height: int | None
    clip_skip: int | None  # None: each LoRA's own (its metadata)
    max_token_length: int | None


def parse_args(argv: Sequence[str] | None = None) -> KPSConfig:
    """Read the command line into a `KPSConfig`; conflicting flags stop here with a sentence."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.seeds is not None and (args.seed is not None or args.images_per_prompt is not None):
        parser.error("give either --seeds, or --seed with --images_per_prompt, not both")
    if args.images_per_prompt is not None and args.images_per_prompt < 1:
        parser.error(f"--images_per_prompt must be at least 1, got {args.images_per_prompt}")
    if args.sample_steps < 1:
        parser.error(f"--sample_steps must be at least 1, got {args.sample_steps}")
    if args.clip_skip is not None and args.clip_skip < 1:
        parser.error(f"--clip_skip must be at least 1 (1 is the text encoder's last layer), got {args.clip_skip}")
    if args.train_data_dir is not None and args.dataset_config is not None:
        parser.error("give either --train_data_dir or --dataset_config, not both")
    if args.prompt_file is None and args.train_data_dir is None and args.dataset_config is None:
        parser.error(
            "give --prompt_file, or the training images (--train_data_dir or --dataset_config) whose captions are the prompts"
        )
    if args.cat_caption == "class" and not args.cat_class_word:
        parser.error("--cat_caption class needs --cat_class_word (the word that replaces the trigger)")
    for flag in ("width", "height"):
        if getattr(args, flag) is not None and getattr(args, flag) % 8:
            parser.error(f"--{flag} {getattr(args, flag)} is not a multiple of 8, as the VAE needs")
    seeds = args.seeds or list(range(args.seed or 0, (args.seed or 0) + (args.images_per_prompt or 1)))
    if len(set(seeds)) != len(seeds):
        parser.error(f"--seeds {' '.join(map(str, seeds))} repeats a seed; a repeated seed repeats the same images")
    return KPSConfig(
        pretrained_model_name_or_path=Path(args.pretrained_model_name_or_path), v2=args.v2,
        v_parameterization=args.v_parameterization, vae=_path(args.vae), model_config=_path(args.model_config),
        clip_l=_path(args.clip_l), t5xxl=_path(args.t5xxl), ae=_path(args.ae),
        t5xxl_max_token_length=args.t5xxl_max_token_length, apply_t5_attn_mask=args.apply_t5_attn_mask,
        loras=tuple(Path(p) for p in args.lora), triggers=tuple(args.trigger), caption_mode=args.cat_caption,
        class_word=args.cat_class_word, prompt_file=_path(args.prompt_file), train_data_dir=_path(args.train_data_dir),
        dataset_config=_path(args.dataset_config), caption_extension=args.caption_extension, seeds=tuple(seeds),
        output_dir=Path(args.output_dir), clip_model=args.clip_model, clip_pretrained=args.clip_pretrained,
        device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"), dtype=args.dtype,
        sampler=args.sampler, sample_steps=args.sample_steps, guidance_scale=args.guidance_scale,
        width=args.width, height=args.height, clip_skip=args.clip_skip, max_token_length=args.max_token_length,
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="PS, IS and KPS of LoRAs (arXiv 2404.07554, Section 3)")
    model = parser.add_argument_group("base model (as for training; SD 1.x/2.x, SDXL or FLUX.1, told by the checkpoint)")
    model.add_argument("--pretrained_model_name_or_path", required=True, help="diffusers folder or .safetensors/.ckpt")
    model.add_argument("--v2", action="store_true", help="Stable Diffusion 2.x model (not for SDXL)")
    model.add_argument("--v_parameterization", action="store_true", help="v-prediction model")
    model.add_argument("--vae", default=None, help="replacement VAE (folder or file)")
    model.add_argument("--model_config", default=None, help="architecture config folder for single files")
    model.add_argument("--dtype", choices=DTYPES, default="float32", help="weights and sampling dtype")
    model.add_argument("--clip_l", default=None, help="FLUX.1: CLIP-L file beside a transformer file")
    model.add_argument("--t5xxl", default=None, help="FLUX.1: T5-XXL file beside a transformer file")
    model.add_argument("--ae", default=None, help="FLUX.1: autoencoder file (ae.safetensors) beside a transformer file")
    model.add_argument("--t5xxl_max_token_length", type=int, default=None,
                       help="FLUX.1: T5 token length, as in training (default 512 for dev, 256 for schnell)")
    model.add_argument("--apply_t5_attn_mask", action="store_true", help="FLUX.1: mask T5's padding, as in training")
    what = parser.add_argument_group("what to evaluate")
    what.add_argument("--lora", "--network_weights", nargs="+", required=True, help="kohya LoRA .safetensors files")
    what.add_argument("--trigger", "--cat_trigger", nargs="+", required=True, help="trigger words or phrases")
    what.add_argument("--cat_caption", choices=CAPTION_MODES, default="strip", help="how y is derived from y_T")
    what.add_argument("--cat_class_word", default=None, help="class word for --cat_caption class")
    what.add_argument("--prompt_file", default=None, help="trigger prompts, one a line (default: the training captions)")
    what.add_argument("--train_data_dir", default=None, help="<repeats>_<class tokens> folders (Identity Score)")
    what.add_argument("--dataset_config", default=None, help="dataset TOML (its subsets' image_dir)")
    what.add_argument("--caption_extension", default=".txt", help="caption file suffix (default .txt)")
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds, one image per prompt each")
    sampling.add_argument("--seed", type=int, default=None, help="first seed (default 0)")
    sampling.add_argument("--images_per_prompt", type=int, default=None, help="seeds --seed, --seed+1, ... (default 1)")
    sampling.add_argument("--sampler", choices=SAMPLERS, default="ddim")
    sampling.add_argument("--sample_steps", type=int, default=30)
    sampling.add_argument("--guidance_scale", type=float, default=None,
                          help="classifier-free guidance (default 7.5); FLUX.1: its guidance input (default 3.5)")
    sampling.add_argument("--width", type=int, default=None, help="default: the model's native size")
    sampling.add_argument("--height", type=int, default=None, help="default: the model's native size")
    sampling.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    encoding = parser.add_argument_group("prompt encoding (default: as each LoRA was trained, from its metadata)")
    encoding.add_argument("--clip_skip", type=int, default=None,
                          help="text-encoder layer from the end for every row (default: ss_clip_skip, else 1)")
    encoding.add_argument("--max_token_length", type=int, choices=TOKEN_LENGTHS, default=None,
                          help="prompt length for every row (default: ss_max_token_length, else 75)")
    scoring = parser.add_argument_group("scoring")
    scoring.add_argument("--clip_model", default="ViT-L-14", help="open_clip model name or model-config JSON")
    scoring.add_argument("--clip_pretrained", default=None, help="CLIP weights file (or an open_clip pretrained tag)")
    parser.add_argument("--output_dir", required=True)
    return parser


def evaluate(config: KPSConfig) -> dict:
    """Generate (or reuse) the images, score them, write the results; returns results.json's content."""
    # Check every input before the slow parts: a mistake found after an hour of sampling costs the hour.
    family = _model_family(config)
    training = _training_images(config)
    pairs = _prompt_pairs(config, training)
    adapters, conditioning = _adapters(config, family)
    embedder = load_clip(config.clip_model, config.clip_pretrained, config.device)
    models = _load_model(config, family)
    for adapter in adapters[1:]:
        check_lora_fits(adapter.path, models.lora_layers(), diffusers_layout_unet_names(models.unet))

    pipe = _pipeline(models, config)
    settings = _settings(config, models, pipe, family)
    planned = plan_images(adapters, pairs, [caption for _, caption in training], config.seeds)
    files, generated = generate_images(pipe, models.prompt_kwargs, adapters, planned, settings, config.output_dir / "images")
    scores = score_adapters(embedder, [a.name for a in adapters], files, pairs, [path for path, _ in training])

    settings_json = _jsonable(asdict(config)) | {"width": settings.width, "height": settings.height,
                                                 "guidance_scale": settings.guidance_scale}
    results = results_json(settings_json, conditioning, scores, files, pairs, generated)
    _write_outputs(config, results, results_table(scores), adapters, files, len(pairs))
    return results


def _write_outputs(
    config: KPSConfig, results: dict, table: str, adapters: Sequence[Adapter], files: dict[PlannedImage, Path],
    prompt_count: int,
) -> None:
    """results.json, results.md and a grid per LoRA; the table is printed too."""
    out = config.output_dir
    write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    write_text(out / "results.md", table)
    for adapter in adapters[1:]:
        write_grid(out / f"grid_{adapter.name}.png", adapter.name, BASE_MODEL, files, prompt_count, config.seeds[0])
    reused = results["images_reused"]
    print(f"{results['images_generated']} images generated, {reused} reused; results in {out}")
    print(table)


def _training_images(config: KPSConfig) -> list[tuple[Path, str]]:
    """(image, caption) pairs for the Identity Score; each caption must hold a trigger."""
    if config.train_data_dir is None and config.dataset_config is None:
        return []
    pairs = training_images(config.train_data_dir, config.dataset_config, config.caption_extension)
    for image, caption in pairs:
        if not contains_trigger(caption, config.triggers):
            raise UserInputError(
                f"The caption of the training image {image}, {caption!r}, holds none of the triggers "
                f"{list(config.triggers)}; add the trigger to its caption or pass the trigger the captions use."
            )
    return pairs


def _prompt_pairs(config: KPSConfig, training: list[tuple[Path, str]]) -> list[PromptPair]:
    """The trigger prompts (from --prompt_file, else the distinct training captions) with their y and P."""
    if config.prompt_file is not None:
        sourced = [(prompt, f"{config.prompt_file} line {line}") for line, prompt in read_prompt_file(config.prompt_file)]
        for prompt, source in sourced:
            if not contains_trigger(prompt, config.triggers):
                raise UserInputError(
                    f"The prompt {prompt!r} ({source}) holds none of the triggers {list(config.triggers)}; every "
                    "prompt must contain the trigger (the trigger-free prompt is derived from it)."
                )
    else:
        first_source: dict[str, str] = {}  # each distinct caption once, in dataset order
        for image, caption in training:
            first_source.setdefault(caption, f"caption of {image}")
        sourced = list(first_source.items())
    return [
        PromptPair(
            with_trigger=prompt,
            without_trigger=trigger_free_caption(prompt, config.triggers, config.caption_mode, config.class_word),
            caption_part=trigger_free_caption(prompt, config.triggers, "strip"),
            source=source,
        )
        for prompt, source in sourced
    ]


def _model_family(config: KPSConfig) -> TrainingScript:
    """The base model's family (its flag rules), told by the checkpoint; a flag that has no meaning for it
    is refused (--v2) or warned about (--clip_skip), as its training script does."""
    family = detect_family(config.pretrained_model_name_or_path)
    if config.v2 and not family.has_v2:
        raise UserInputError(
            f"--v2 selects Stable Diffusion 2.x, but the model {config.pretrained_model_name_or_path} is "
            f"{family.model_name}; drop --v2."
        )
    if config.clip_skip is not None and not family.uses_clip_skip:
        logger.warning("--clip_skip %d: %s is conditioned on fixed text-encoder layers, so clip skip is not used.",
                       config.clip_skip, family.model_name)
    return family


def _load_model(config: KPSConfig, family: TrainingScript) -> ModelFamily:
    """The base model, loaded by its family's loader as its training script loads it."""
    if family == FLUX_SCRIPT:
        return load_flux(
            config.pretrained_model_name_or_path, clip_l=config.clip_l, t5xxl=config.t5xxl, ae=config.ae,
            model_config=config.model_config, dtype=DTYPES[config.dtype],
            t5_max_length=config.t5xxl_max_token_length, apply_t5_attn_mask=config.apply_t5_attn_mask,
        )
    if family == SDXL_SCRIPT:
        return load_sdxl(
            config.pretrained_model_name_or_path, v_parameterization=config.v_parameterization, vae=config.vae,
            model_config=config.model_config, dtype=DTYPES[config.dtype],
        )
    return load_stable_diffusion(
        config.pretrained_model_name_or_path, v2=config.v2, v_parameterization=config.v_parameterization,
        vae=config.vae, model_config=config.model_config, dtype=DTYPES[config.dtype],
    )


def _adapters(config: KPSConfig, family: TrainingScript) -> tuple[list[Adapter], dict[str, dict]]:
    """The base model, then one row per LoRA file, named by its file stem, each with the conditioning its
    prompts are encoded with; and that conditioning with where it came from, by row, for results.json."""
    loras = config.loras
    for path in loras:
        if not path.is_file():
            raise UserInputError(f"The --lora file {path} does not exist; check the path.")
    stems = [path.stem for path in loras]
    duplicates = sorted({stem for stem in stems if stems.count(stem) > 1})
    if duplicates:
        raise UserInputError(f"Several --lora files are named {duplicates[0]}; rename them so each row has its own name.")
    if BASE_MODEL in stems:
        raise UserInputError(f"A --lora file is named {BASE_MODEL!r}, the name of the base model's row; rename it.")
    flags = {"clip_skip": config.clip_skip, "max_token_length": config.max_token_length}
    unused = {} if family.uses_clip_skip else {"clip_skip": f"not used by {family.model_name}"}
    base, chosen = choose_conditionings(flags, [(path, read_lora_file(path)[1]) for path in loras], unused)
    adapters = [Adapter(BASE_MODEL, None, None, base.conditioning)] + [
        Adapter(path.stem, path, bytes_fingerprint(path), c.conditioning) for path, c in zip(loras, chosen)
    ]
    return adapters, {adapter.name: c.as_json() for adapter, c in zip(adapters, [base, *chosen])}


def _model_fingerprint(config: KPSConfig, family: TrainingScript) -> str:
    """The base model's files and the flags that change its images (FLUX.1's parts and T5 options only
    for FLUX.1, so SD and SDXL image caches keep their names)."""
    fingerprint = files_fingerprint(config.pretrained_model_name_or_path, config.vae, config.model_config)
    fingerprint += f"-v2={config.v2}-v={config.v_parameterization}"
    if family == FLUX_SCRIPT:
        parts = files_fingerprint(*(path for path in (config.clip_l, config.t5xxl, config.ae) if path is not None))
        fingerprint += f"-{parts}-t5={config.t5xxl_max_token_length}-mask={config.apply_t5_attn_mask}"
    return fingerprint


def _guidance_scale(config: KPSConfig, family: TrainingScript) -> float:
    """--guidance_scale, else the family's: 7.5 classifier-free; FLUX.1's guidance input, 3.5 (sd-scripts')."""
    if config.guidance_scale is not None:
        return config.guidance_scale
    defaults = family.sample_defaults
    return defaults.guidance if defaults.guidance is not None else defaults.scale


def _settings(config: KPSConfig, models: ModelFamily, pipe, family: TrainingScript) -> GenerationSettings:
    native_width, native_height = models.native_resolution
    return GenerationSettings(
        model=_model_fingerprint(config, family),
        family=f"{models.model_version} {type(pipe).__name__}",
        sampler=config.sampler, steps=config.sample_steps, guidance_scale=_guidance_scale(config, family),
        width=config.width or native_width, height=config.height or native_height, dtype=config.dtype,
        device_type=torch.device(config.device).type,
    )


def _pipeline(models: ModelFamily, config: KPSConfig):
    pipe = models.pipeline()
    pipe.scheduler = inference_scheduler(config.sampler, models.noise_scheduler)
    pipe.set_progress_bar_config(disable=True)  # one bar over all images instead
    return pipe.to(config.device)


def _path(value: str | None) -> Path | None:
    return Path(value) if value is not None else None


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value) if isinstance(value, Path) else value


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, evaluate, and turn user mistakes into one readable sentence (exit code 2)."""
    # open_clip logs its every step to the root logger at INFO; only ours are worth reading.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("library").setLevel(logging.INFO)
    try:
        evaluate(parse_args(argv))
    except UserInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
