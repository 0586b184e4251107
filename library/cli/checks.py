"""The checks of the merged flag values: each raises a `UserInputError` with one sentence that names
the value, its place and the fix (never an assert), or logs a warning for a combination that trains,
but probably not as meant.

`check_args` runs them all; the readers of flag text they share with to_config.py (resolution,
key=value lists) are here too.
"""

from __future__ import annotations

import ast
import logging
import math
from pathlib import Path
from typing import Any, Iterable

from library.cli.arg_values import ArgValues
from library.cli.flow_checks import check_family_flags, check_flow_matching
from library.cli.log_args import check_logging, warn_logging
from library.cli.unsupported import IMPLEMENTED_VALUES, INERT_WITHOUT, NOT_IMPLEMENTED
from library.config.training_script import SD_SCRIPT, TrainingScript
from library.errors import UserInputError
from library.sampling.drift_probe import read_preservation_prompts
from library.training.cat_prompts import read_cat_prompts

logger = logging.getLogger(__name__)

# Schedulers that sd-scripts builds without a warmup and refuses a warmup for.
SCHEDULERS_WITHOUT_WARMUP = ("constant", "adafactor")


def check_args(args: ArgValues, script: TrainingScript = SD_SCRIPT) -> None:
    """Refuse the first mistake in `args` with its sentence (the rules of `script`'s family included),
    then every not-implemented flag given at once; then warn about combinations that train, but
    probably not as meant."""
    for check in _CHECKS:
        check(args)
    _check_family(args, script)
    _check_not_implemented(args)
    _warn_family(args, script)
    for warn in _WARNINGS:
        warn(args)


# region checks and warnings


def _check_fp8(args: ArgValues) -> None:
    """fp8 base weights are computed in the mixed-precision dtype: sd-scripts requires one, and so do we."""
    for flag in ("fp8_base", "fp8_base_unet"):
        if args[flag] and args["mixed_precision"] == "no":
            raise UserInputError(f"{args.show(flag)} needs --mixed_precision bf16 or fp16: fp8 weights are computed in "
                                 "that precision (sd-scripts requires it too).")


def _check_required(args: ArgValues) -> None:
    """The model, the images and the output folder must be named."""
    if not args["pretrained_model_name_or_path"]:
        raise UserInputError("--pretrained_model_name_or_path is required: give the model folder or checkpoint file.")
    if not args["train_data_dir"] and not args["dataset_config"]:
        raise UserInputError("No training images: give --train_data_dir (a folder of <repeats>_<class tokens> "
                             "folders) or --dataset_config.")
    if not args["output_dir"]:
        raise UserInputError("--output_dir is required: give the folder the LoRA files are written to.")


def _check_resolution(args: ArgValues) -> None:
    """--train_data_dir needs a resolution; the resolution must read as 'size' or 'width,height'."""
    if args["resolution"] is None:
        if args["train_data_dir"] and not args["dataset_config"]:
            raise UserInputError("--train_data_dir needs --resolution, e.g. --resolution 512 or 512,768.")
        return
    parse_resolution(args["resolution"], args.show("resolution"))


def parse_resolution(text: str, shown: str = "--resolution") -> tuple[int, int]:
    """'512' -> (512, 512); '512,768' -> (512, 768) as (width, height); anything else is refused."""
    parts = [part.strip() for part in str(text).split(",")]
    if len(parts) in (1, 2) and all(part.isdigit() and int(part) > 0 for part in parts):
        width, height = int(parts[0]), int(parts[-1])
        return width, height
    raise UserInputError(f"{shown}: the resolution must be 'size' or 'width,height' in pixels, e.g. 512 or 512,768.")


def _check_positive(args: ArgValues) -> None:
    """Counts that must be at least 1 (or 0 for the worker count), when given."""
    for dest in ("train_batch_size", "dataset_repeats", "gradient_accumulation_steps", "max_train_steps", "max_train_epochs",
                 "save_every_n_epochs", "save_every_n_steps", "save_n_epoch_ratio", "save_last_n_epochs",
                 "save_last_n_steps", "vae_batch_size", "lr_scheduler_num_cycles", "clip_skip",
                 "validate_every_n_steps", "validate_every_n_epochs", "max_validation_steps", "initial_epoch"):
        if args[dest] is not None and args[dest] < 1:
            raise UserInputError(f"{args.show(dest)}: this must be 1 or more.")
    if args["initial_step"] is not None and args["initial_step"] < 0:
        raise UserInputError(f"{args.show('initial_step')}: the steps already done must be 0 or more.")
    if args["max_data_loader_n_workers"] < 0:
        raise UserInputError(f"{args.show('max_data_loader_n_workers')}: this must be 0 or more.")
def _check_dataset(args: ArgValues) -> None:
    """Rates within 0..1, counts not negative, bucket sides sensible (the dataset config checks its own)."""
    for dest in ("caption_dropout_rate", "caption_tag_dropout_rate"):
        if not 0 <= args[dest] <= 1:
            raise UserInputError(f"{args.show(dest)}: a rate must be between 0 and 1.")
    if not 0 <= args["validation_split"] < 1:
        raise UserInputError(f"{args.show('validation_split')}: the share of each subset's images held out for "
                             "validation must be at least 0 and below 1, e.g. 0.1.")
    for dest in ("keep_tokens", "caption_dropout_every_n_epochs", "token_warmup_min", "token_warmup_step"):
        if args[dest] < 0:
            raise UserInputError(f"{args.show(dest)}: this must be 0 or more.")
    for dest in ("min_bucket_reso", "max_bucket_reso", "bucket_reso_steps"):
        if args[dest] < 8:
            raise UserInputError(f"{args.show(dest)}: bucket sizes are pixels, at least 8 (64 is usual for steps).")
    if args["face_crop_aug_range"] is not None:
        parse_face_crop_range(args["face_crop_aug_range"], args.show("face_crop_aug_range"))


def parse_face_crop_range(text: str, shown: str = "--face_crop_aug_range") -> tuple[float, float]:
    """'2.0,4.0' -> (2.0, 4.0): sd-scripts' 'low,high' (low <= high); here both above 0 as well."""
    try:
        low, high = (float(part) for part in str(text).split(","))
    except ValueError:
        low = high = math.nan
    if not (0 < low <= high < math.inf):
        raise UserInputError(f"{shown}: the face crop range must be 'low,high', two numbers above 0 with low <= high "
                             "(the face's size is kept between 1/high and 1/low of the resolution), e.g. 2.0,4.0.")
    return low, high


def _check_masks(args: ArgValues) -> None:
    """sd-scripts' train_network.py accepts --conditioning_data_dir but reads it nowhere (only its
    ControlNet scripts do): a user who gives it expects masks that would silently not be used."""
    if args["conditioning_data_dir"]:
        raise UserInputError(f"{args.show('conditioning_data_dir')}: sd-scripts' train_network.py ignores this flag "
                             "(its masks come from the dataset config): set conditioning_data_dir in each "
                             "[[datasets.subsets]] of --dataset_config, with --masked_loss.")


def _check_network(args: ArgValues) -> None:
    """U-Net-only and text-encoder-only exclude each other; base weight multipliers match the files."""
    if args["network_train_unet_only"] and args["network_train_text_encoder_only"]:
        raise UserInputError("--network_train_unet_only and --network_train_text_encoder_only exclude each other: "
                             "give one of them, or neither to train both.")
    weights, multipliers = args["base_weights"] or [], args["base_weights_multiplier"] or []
    if len(multipliers) > len(weights):
        raise UserInputError(f"{args.show('base_weights_multiplier')}: {len(multipliers)} multipliers for "
                             f"{len(weights)} --base_weights files; give at most one per file.")
    parse_key_values(args["network_args"] or [], args.show("network_args"))


def _check_cat(args: ArgValues) -> None:
    """The CAT weight is a finite number >= 0; stripping or replacing a trigger needs the trigger."""
    weight = args["cat_weight"]
    if not math.isfinite(weight) or weight < 0:
        raise UserInputError(f"{args.show('cat_weight')}: the CAT weight must be a finite number >= 0 "
                             f"(0 turns CAT off, 1.0 is the paper's default).")
    triggers = args["cat_trigger"] or []
    if any(not trigger.strip() for trigger in triggers):
        raise UserInputError(f"{args.show('cat_trigger')}: a trigger is empty; give words or phrases.")
    needs_trigger = weight > 0 and args["cat_caption"] in ("strip", "class") and not args["dataset_config"]
    if needs_trigger and not triggers:
        raise UserInputError(
            f"CAT is on (--cat_weight {weight:g}) with --cat_caption {args['cat_caption']}, which removes the trigger "
            f"from captions, but no --cat_trigger is given: add --cat_trigger <your trigger word>, or use "
            f"--cat_caption empty, or --cat_weight 0 for plain LoRA training."
        )


def _check_steering(args: ArgValues) -> None:
    """--cat_prompts and --cat_drift_budget: CAT on, a readable prompt file, sensible numbers."""
    prompts, budget = args["cat_prompts"], args["cat_drift_budget"]
    if (prompts or budget is not None) and args["cat_weight"] == 0:
        shown = args.show("cat_prompts" if prompts else "cat_drift_budget")
        raise UserInputError(f"{shown} steers the CAT term, which --cat_weight 0 turns off; give --cat_weight > 0 "
                             "(with --cat_drift_budget it is the starting alpha), or leave the flag out.")
    if prompts:
        count = len(read_cat_prompts(prompts, args.show("cat_prompts")))
        if not 1 <= args["cat_prompts_per_step"] <= count:
            raise UserInputError(f"{args.show('cat_prompts_per_step')}: draw between 1 and the {count} prompts of "
                                 f"{prompts} for each batch.")
    weight = args["cat_prompts_weight"]
    if not math.isfinite(weight) or weight < 0:
        raise UserInputError(f"{args.show('cat_prompts_weight')}: the prompts' weight must be a finite number >= 0.")
    if budget is not None and not (math.isfinite(budget) and budget > 0):
        raise UserInputError(f"{args.show('cat_drift_budget')}: the budget is the CAT term's running mean to keep, a "
                             "finite number > 0 (e.g. the loss/cat a fixed-alpha run logs).")
    rate = args["cat_budget_rate"]
    if not (math.isfinite(rate) and rate > 0):
        raise UserInputError(f"{args.show('cat_budget_rate')}: the rate must be a finite number > 0 (default 0.05).")


def _check_precision(args: ArgValues) -> None:
    """--full_fp16/--full_bf16 exclude each other and need the matching --mixed_precision (sd-scripts)."""
    if args["full_fp16"] and args["full_bf16"]:
        raise UserInputError("--full_fp16 and --full_bf16 exclude each other: give one of them.")
    for flag, dtype in (("full_fp16", "fp16"), ("full_bf16", "bf16")):
        if args[flag] and args["mixed_precision"] != dtype:
            raise UserInputError(f"--{flag} needs --mixed_precision {dtype} (it is {args['mixed_precision']}), "
                                 f"as in sd-scripts.")


def _check_optimizer(args: ArgValues) -> None:
    """The old optimizer switches exclude each other and --optimizer_type; optimizer args parse."""
    switches = [f"--{dest}" for dest in ("use_8bit_adam", "use_lion_optimizer") if args[dest]]
    if args["optimizer_type"]:
        switches.append(f"--optimizer_type {args['optimizer_type']}")
    if len(switches) > 1:
        raise UserInputError(f"{' and '.join(switches)} each choose the optimizer: keep one "
                             f"(--use_8bit_adam is --optimizer_type AdamW8bit, --use_lion_optimizer is Lion).")
    parse_literal_args(args["optimizer_args"] or [], args.show("optimizer_args"))
    parse_literal_args(args["lr_scheduler_args"] or [], args.show("lr_scheduler_args"))


def _check_scheduler(args: ArgValues) -> None:
    """sd-scripts refuses a warmup for schedules that have none (constant, adafactor, a custom class)."""
    if args["lr_warmup_steps"] == 0:
        return
    if args["lr_scheduler_type"]:
        raise UserInputError(f"{args.show('lr_warmup_steps')} with the custom --lr_scheduler_type "
                             f"{args['lr_scheduler_type']}: sd-scripts gives custom schedulers no warmup; set it to 0.")
    if args["lr_scheduler"] in SCHEDULERS_WITHOUT_WARMUP:
        raise UserInputError(f"{args.show('lr_warmup_steps')} with --lr_scheduler {args['lr_scheduler']}, which has "
                             f"no warmup: use --lr_scheduler constant_with_warmup, or set the warmup to 0.")


def _check_timesteps(args: ArgValues) -> None:
    """0 <= min_timestep < max_timestep <= 1000."""
    low, high = args["min_timestep"], args["max_timestep"]
    if low is not None and not 0 <= low <= 999:
        raise UserInputError(f"{args.show('min_timestep')}: the lowest timestep must be 0 to 999.")
    if high is not None and not 1 <= high <= 1000:
        raise UserInputError(f"{args.show('max_timestep')}: the highest timestep must be 1 to 1000.")
    if (0 if low is None else low) >= (1000 if high is None else high):
        raise UserInputError(f"{args.show('min_timestep')} is not below {args.show('max_timestep')}: timesteps are "
                             f"drawn from [min, max), so min must be smaller.")


def _check_saving(args: ArgValues) -> None:
    """Only .safetensors is written; a --resume folder must exist."""
    if args["save_model_as"] != "safetensors":
        raise UserInputError(f"{args.show('save_model_as')}: only safetensors is written (the format every UI "
                             f"loads); use --save_model_as safetensors or leave it out.")
    if args["resume"] and not Path(args["resume"]).is_dir():
        raise UserInputError(f"{args.show('resume')}: that state folder does not exist; give a "
                             f"<output_name>-state folder written by --save_state.")
    thumbnail = args["metadata_thumbnail"]
    if thumbnail and not thumbnail.startswith("data:") and not Path(thumbnail).is_file():
        raise UserInputError(f"{args.show('metadata_thumbnail')}: no such image file; give the path of an image "
                             "(it is written into the LoRA's metadata as a data URL) or a data: URL.")


def _check_not_implemented(args: ArgValues) -> None:
    """Refuse, in one sentence, every accepted-but-not-implemented flag that was given a value."""
    given = [flag for flag in NOT_IMPLEMENTED if _requested(args, flag.removeprefix("--"))]
    if given:
        listed = ", ".join(_not_implemented_item(args, flag) for flag in given)
        raise UserInputError(f"{listed} {'is' if len(given) == 1 else 'are'} accepted but not implemented yet; "
                             f"remove {'it' if len(given) == 1 else 'them'} (or set the default) to train.")


def _requested(args: ArgValues, dest: str) -> bool:
    """Whether a flag was given a value that asks for something: not the default, not an implemented
    value, and not inert for lack of the flags it works with."""
    if not args.is_set(dest) or args[dest] in IMPLEMENTED_VALUES.get(dest, ()):
        return False
    enablers = INERT_WITHOUT.get(dest)
    return enablers is None or any(args.is_set(enabler) for enabler in enablers)


def _not_implemented_item(args: ArgValues, flag: str) -> str:
    """"--flag (reason)", with the config file named when the value came from it."""
    dest = flag.removeprefix("--")
    place = f", from {args.config_file}" if dest in args.from_file and dest not in args.from_command_line else ""
    return f"{flag} ({NOT_IMPLEMENTED[flag]}{place})"


def _check_family(args: ArgValues, script: TrainingScript) -> None:
    """The rules sd-scripts' `script.replaces` enforces for its family: no --v2 where there is no 2.x, at
    most one --text_encoder_lr per text encoder (bucket steps: the dataset's check, with the family's multiple)."""
    if args["v2"] and not script.has_v2:
        raise UserInputError(f"{args.show('v2')}: {script.model_name} has no 2.x variant ({script.replaces} refuses "
                             "the flag too); remove it. For a Stable Diffusion 2.x model use train_network_cat.py.")
    check_family_flags(args, script)
    check_flow_matching(args, script)
    _check_text_encoder_caching(args, script)
    if args["weighted_captions"] and not script.weighted_captions:
        raise UserInputError(f"{args.show('weighted_captions')}: {script.model_name} has no weighted captions "
                             f"(sd-scripts' {script.replaces} fails on them, or ignores them with cached text-encoder "
                             "outputs); remove the flag and the weight syntax from the captions.")
    rates = args["text_encoder_lr"] or []
    if script.text_encoders > 1 and len(rates) > script.text_encoders:
        raise UserInputError(f"{args.show('text_encoder_lr')}: {script.model_name} has {script.text_encoders} text "
                             f"encoders; give one rate for all or one each (e.g. --text_encoder_lr 1e-5 2e-5).")


# Caption options that change a caption from step to step: its text-encoder outputs cannot be cached.
VARYING_CAPTION_FLAGS = ("shuffle_caption", "caption_dropout_rate", "caption_dropout_every_n_epochs", "enable_wildcard",
                         "caption_tag_dropout_rate", "token_warmup_step")


def _check_text_encoder_caching(args: ArgValues, script: TrainingScript) -> None:
    """sd-scripts' rules: caching is the family's option, cannot train the encoders, needs fixed captions."""
    if not args["cache_text_encoder_outputs"]:
        return
    shown = args.show("cache_text_encoder_outputs_to_disk" if args["cache_text_encoder_outputs_to_disk"]
                      else "cache_text_encoder_outputs")
    if not script.text_encoder_caching:
        raise UserInputError(f"{shown}: text-encoder outputs are cached for SDXL and FLUX.1 (sdxl_train_network_cat.py, "
                             f"flux_train_network_cat.py), not for {script.model_name}; remove the flag.")
    if not args["network_train_unet_only"]:
        raise UserInputError(f"{shown} needs --network_train_unet_only: cached outputs cannot train the text "
                             f"encoders ({script.replaces} requires it too).")
    varying = [args.show(dest) for dest in VARYING_CAPTION_FLAGS if args[dest]]
    if varying:
        raise UserInputError(f"{shown} with {', '.join(varying)}: those change the captions from step to step, so "
                             "their outputs cannot be cached; drop one or the other (sd-scripts refuses this too).")


def _warn_family(args: ArgValues, script: TrainingScript) -> None:
    """sd-scripts' warnings about model flags: v-prediction without SD 2.x, clip skip where it is not used."""
    if script.has_v2 and args["v_parameterization"] and not args["v2"]:
        logger.warning("--v_parameterization without --v2: v-prediction is meant for SD 2.x models.")
    if args["clip_skip"] is not None and not script.uses_clip_skip:
        logger.warning("%s: %s is conditioned on fixed text-encoder layers, so clip skip is not used (%s warns "
                       "about it too).", args.show("clip_skip"), script.model_name, script.replaces)


def _warn_model(args: ArgValues) -> None:
    """sd-scripts' warnings for combinations that train, but probably not as meant."""
    if args["v2"] and args["clip_skip"] is not None and args["clip_skip"] > 1:
        logger.warning("--clip_skip with --v2: SD 2.x is not meant to be used with clip skip.")
    if args["zero_terminal_snr"] and not args["v_parameterization"]:
        logger.warning("--zero_terminal_snr without --v_parameterization: training will be unexpected.")


def _warn_cat(args: ArgValues) -> None:
    """Triggers given while CAT is off do nothing."""
    if args["cat_weight"] == 0 and args["cat_trigger"]:
        logger.info("--cat_weight 0: CAT is off, --cat_trigger is not used (plain LoRA training).")


def _warn_dataset(args: ArgValues) -> None:
    """With --dataset_config the folder flags are not read (as in sd-scripts, which warns too)."""
    ignored = [args.show(dest) for dest in ("train_data_dir", "reg_data_dir", "in_json") if args[dest]]
    if args["dataset_config"] and ignored:
        logger.warning("%s: not used, because %s gives the images; put the folders in that file instead.",
                       ", ".join(ignored), args.show("dataset_config"))


def _check_preservation(args: ArgValues) -> None:
    """The preservation signal needs a readable, non-empty prompt file and an interval of 1 or more."""
    path, every = args["preservation_prompts"], args["preservation_every_n_steps"]
    if path is None:
        if every is not None:
            raise UserInputError(f"{args.show('preservation_every_n_steps')} without --preservation_prompts: give the "
                                 "file of trigger-free prompts to measure the drift on, or leave the interval out.")
        return
    if every is None or every < 1:
        shown = "no --preservation_every_n_steps" if every is None else args.show("preservation_every_n_steps")
        raise UserInputError(f"{args.show('preservation_prompts')} with {shown}: give how often to measure the "
                             "drift, e.g. --preservation_every_n_steps 50 (1 or more).")
    read_preservation_prompts(path, args.show("preservation_prompts"))


_CHECKS = (_check_required, _check_resolution, _check_positive, _check_dataset, _check_network, _check_cat, _check_steering,
           _check_precision, _check_fp8,
           _check_optimizer, _check_scheduler, _check_timesteps, _check_saving, _check_preservation, check_logging,
           _check_masks)
_WARNINGS = (_warn_model, _warn_cat, _warn_dataset, warn_logging)


# endregion

# region key=value arguments


def parse_key_values(pairs: Iterable[str], shown: str = "--network_args") -> dict[str, str]:
    """["conv_dim=4", "conv_alpha=1"] -> {"conv_dim": "4", "conv_alpha": "1"}; values stay text.

    A pair splits at its first "=", so values may hold "=" too; a later key replaces an earlier one.
    """
    result: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UserInputError(f"{shown}: {pair!r} is not key=value; write it like conv_dim=4.")
        result[key.strip()] = value
    return result


def parse_literal_args(pairs: Iterable[str], shown: str = "--optimizer_args") -> dict[str, Any]:
    """["weight_decay=0.01", "betas=0.9,0.999"] -> {"weight_decay": 0.01, "betas": (0.9, 0.999)}.

    Values are Python literals, as sd-scripts reads them; true/false in any case are booleans
    (sd-scripts would fail on them, and the string "false" would be truthy); anything else that is
    not a literal stays a string ("decouple=yes" -> "yes").
    """
    return {key: _literal(value) for key, value in parse_key_values(pairs, shown).items()}


def _literal(text: str) -> Any:
    """A Python literal from text, a boolean from true/false, or the text itself."""
    if text.strip().lower() in ("true", "false"):
        return text.strip().lower() == "true"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text


# endregion
