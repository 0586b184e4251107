"""The checked flag values turned into the typed `TrainConfig` (library/config/train_config.py), once.

Each dataclass takes the flags named like its fields (with the group's prefix, e.g. `cat_`); what needs
more than a copy (the optimizer name from the old switches, key=value lists as read-only dicts, base
weight multipliers padded with 1.0, one text-encoder learning rate) is done here and nowhere else.
"""

from __future__ import annotations

import logging
from dataclasses import fields
from types import MappingProxyType
from typing import Any

from library.cli.arg_values import ArgValues
from library.cli.checks import parse_face_crop_range, parse_key_values, parse_literal_args, parse_resolution
from library.cli.flags import build_parser
from library.cli.log_args import logged_config, tracker_init_kwargs
from library.config.training_script import SD_SCRIPT, TrainingScript
from library.config.train_config import (
    CATArgs,
    DataArgs,
    FlowMatchArgs,
    LogArgs,
    LossArgs,
    MetadataArgs,
    ModelArgs,
    NetworkArgs,
    NoiseArgs,
    OptimizerArgs,
    PreservationArgs,
    RunArgs,
    SampleArgs,
    SaveArgs,
    SchedulerArgs,
    TrainConfig,
    ValidationArgs,
)

logger = logging.getLogger(__name__)

DEFAULT_OPTIMIZER = "AdamW"


def to_train_config(args: ArgValues, script: TrainingScript = SD_SCRIPT) -> TrainConfig:
    """Build the typed configuration of `script` from checked values."""
    return TrainConfig(
        model=_pick(ModelArgs, args, weight_precision=args["mixed_precision"]),
        network=_network_args(args),
        optimizer=_optimizer_args(args, script),
        scheduler=_pick(SchedulerArgs, args, lr_scheduler_type=args["lr_scheduler_type"] or None,
                        lr_scheduler_args=MappingProxyType(parse_literal_args(args["lr_scheduler_args"] or []))),
        noise=_pick(NoiseArgs, args),
        loss=_pick(LossArgs, args),
        cat=_pick(CATArgs, args, prefix="cat_", triggers=tuple(t.strip() for t in args["cat_trigger"] or [])),
        data=_pick(DataArgs, args, resolution=_resolution(args), bucket_reso_multiple=script.bucket_reso_multiple,
                   face_crop_aug_range=_face_crop_range(args)),
        run=_pick(RunArgs, args),
        save=_pick(SaveArgs, args),
        metadata=_pick(MetadataArgs, args, prefix="metadata_", training_comment=args["training_comment"]),
        log=_pick(LogArgs, args, tracker_init_kwargs=tracker_init_kwargs(args), log_config=logged_config(args)),
        sample=_pick(SampleArgs, args, prefix="sample_", defaults=script.sample_defaults),
        preservation=_pick(PreservationArgs, args, prefix="preservation_"),
        config_file=args.config_file,
        flow=_pick(FlowMatchArgs, args) if script.flow_matching else None,
        validation=_pick(ValidationArgs, args),
    )


def _pick(cls: type, source: ArgValues, prefix: str = "", **overrides: Any) -> Any:
    """An instance of dataclass `cls` whose fields are the flags `prefix + field name`, unless overridden."""
    values = {f.name: source[prefix + f.name] for f in fields(cls) if f.name not in overrides}
    return cls(**values, **overrides)


def _resolution(args: ArgValues) -> tuple[int, int] | None:
    """--resolution as (width, height), or None when not given."""
    return None if args["resolution"] is None else parse_resolution(args["resolution"])


def _face_crop_range(args: ArgValues) -> tuple[float, float] | None:
    """--face_crop_aug_range as (low, high), or None when not given."""
    text = args["face_crop_aug_range"]
    return None if text is None else parse_face_crop_range(text, args.show("face_crop_aug_range"))


def _network_args(args: ArgValues) -> NetworkArgs:
    """NetworkArgs: network_args as a read-only dict, base weight multipliers padded with 1.0."""
    weights = tuple(args["base_weights"] or ())
    multipliers = tuple(args["base_weights_multiplier"] or ())
    return _pick(
        NetworkArgs, args, prefix="network_",
        args=MappingProxyType(parse_key_values(args["network_args"] or [])),
        dim_from_weights=args["dim_from_weights"],
        base_weights=weights,
        base_weights_multiplier=multipliers + (1.0,) * (len(weights) - len(multipliers)),
        scale_weight_norms=args["scale_weight_norms"],
    )


def _optimizer_args(args: ArgValues, script: TrainingScript) -> OptimizerArgs:
    """OptimizerArgs: the optimizer name resolved, optimizer_args parsed, one text-encoder lr."""
    return _pick(
        OptimizerArgs, args,
        optimizer_type=_optimizer_type(args),
        optimizer_args=MappingProxyType(parse_literal_args(args["optimizer_args"] or [])),
        text_encoder_lr=_text_encoder_lr(args, script),
    )


def _optimizer_type(args: ArgValues) -> str:
    """--optimizer_type, or what the old switches mean, or AdamW."""
    if args["use_8bit_adam"]:
        return "AdamW8bit"
    if args["use_lion_optimizer"]:
        return "Lion"
    return args["optimizer_type"] or DEFAULT_OPTIMIZER


def _text_encoder_lr(args: ArgValues, script: TrainingScript) -> float | tuple[float, ...] | None:
    """One text encoder: the first --text_encoder_lr value (GUIs write it twice). Several (SDXL): one
    value for all of them, or one each (checks.py refuses more values than text encoders)."""
    rates = args["text_encoder_lr"] or []
    if not rates:
        return None
    if script.text_encoders == 1:
        if len(set(rates)) > 1:
            logger.warning("%s: %s has one text encoder, so only the first rate, %g, is used.",
                           args.show("text_encoder_lr"), script.model_name, rates[0])
        return rates[0]
    return rates[0] if len(rates) == 1 else tuple(rates)


def dataset_defaults(**values: Any) -> DataArgs:
    """The dataset flags as the command line gives them by default, with `values` set: for tools
    that read a training dataset exactly as the trainer does (evaluate_kps.py)."""
    defaults = vars(build_parser().parse_args([]))
    picked = {f.name: defaults[f.name] for f in fields(DataArgs) if f.name in defaults}
    picked["resolution"] = None
    picked["bucket_reso_multiple"] = SD_SCRIPT.bucket_reso_multiple
    return DataArgs(**{**picked, **values})
