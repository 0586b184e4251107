"""The command line of `train_network_cat.py`: sd-scripts' `train_network.py` flags plus CAT's.

`parse_args(argv)` reads the command line and `--config_file` once and returns a checked
`TrainConfig` (library/config/train_config.py). Precedence is sd-scripts': an explicit flag beats the
file, even when it repeats the default; the file beats the defaults. Names, types, defaults and
choices are sd-scripts' (library/train_util.py, train_network.py, custom_train_functions.py,
sai_model_spec.py, utils.py). Mistakes are `UserInputError`s with a sentence, never an assert.

Flags that sd-scripts has and this trainer does not implement yet are accepted, and refused with
their names when given a value other than their default: see `NOT_IMPLEMENTED`.
"""

from __future__ import annotations

import argparse
import ast
import logging
import math
from dataclasses import dataclass, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any, Iterable, Mapping, NoReturn, Sequence

from library.cat.captions import CAPTION_MODES
from library.cat.objective import CAT_MODES
from library.cli.config_file import config_path, load_config_file, toml_text, write_config_file
from library.errors import UserInputError
from library.sampling.drift_probe import read_preservation_prompts
from library.sampling.sample_prompts import SAMPLER_ALIASES, SAMPLERS
from library.config.train_config import (
    CATArgs,
    DataArgs,
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
)

logger = logging.getLogger(__name__)

DEFAULT_CAT_MODE = "sequential"
DEFAULT_NETWORK_MODULE = "networks.lora_cat"
DEFAULT_OPTIMIZER = "AdamW"

LR_SCHEDULERS = (
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "adafactor",
    "piecewise_constant", "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay",
)
# Schedulers that sd-scripts builds without a warmup and refuses a warmup for.
SCHEDULERS_WITHOUT_WARMUP = ("constant", "adafactor")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

# Flags that are accepted (sd-scripts users and GUIs pass them) but not implemented yet: giving one
# a value other than its default is refused at parse time, all of them in one sentence. Remove an
# entry when its feature lands.
NOT_IMPLEMENTED: dict[str, str] = {
    "--cache_text_encoder_outputs": "text-encoder outputs are not cached; it is trained",
    "--mem_eff_attn": "use --sdpa or --xformers",
    "--masked_loss": "masked loss is not implemented",
    "--alpha_mask": "masked loss is not implemented",
    "--skip_until_initial_step": "resuming is not implemented yet",
    "--initial_epoch": "resuming is not implemented yet",
    "--initial_step": "resuming is not implemented yet",
    "--secondary_separator": "secondary caption separators are not implemented",
    "--enable_wildcard": "caption wildcards are not implemented",
    "--face_crop_aug_range": "face crops are not implemented",
    "--token_warmup_min": "token warmup is not implemented",
    "--token_warmup_step": "token warmup is not implemented",
    "--weighted_captions": "weighted captions are not implemented",
    "--fp8_base": "fp8 base weights are not implemented",
    "--log_with": "only tensorboard logging is implemented (wandb is not)",
    "--log_tracker_config": "tracker config files are not read",
    "--log_config": "the configuration is not logged to the tracker",
    "--validation_split": "validation is not implemented",
    "--validation_seed": "validation is not implemented",
    "--validate_every_n_steps": "validation is not implemented",
    "--validate_every_n_epochs": "validation is not implemented",
    "--max_validation_steps": "validation is not implemented",
    "--huggingface_repo_id": "uploading to the Hugging Face Hub is not implemented",
    "--huggingface_repo_type": "uploading to the Hugging Face Hub is not implemented",
    "--huggingface_path_in_repo": "uploading to the Hugging Face Hub is not implemented",
    "--huggingface_token": "uploading to the Hugging Face Hub is not implemented",
    "--huggingface_repo_visibility": "uploading to the Hugging Face Hub is not implemented",
    "--save_state_to_huggingface": "uploading to the Hugging Face Hub is not implemented",
    "--resume_from_huggingface": "uploading to the Hugging Face Hub is not implemented",
    "--async_upload": "uploading to the Hugging Face Hub is not implemented",
}
# Values of a NOT_IMPLEMENTED flag that are implemented (so not refused).
IMPLEMENTED_VALUES: dict[str, tuple[Any, ...]] = {"log_with": ("tensorboard",)}
# A NOT_IMPLEMENTED flag that does nothing unless one of these is set is not refused on its own.
INERT_WITHOUT: dict[str, tuple[str, ...]] = {
    "save_last_n_epochs_state": ("save_state",),
    "save_last_n_steps_state": ("save_state",),
}

_UNSET = object()


# region parser


class _Parser(argparse.ArgumentParser):
    """argparse, with mistakes raised as `UserInputError` instead of printing usage and exiting."""

    def error(self, message: str) -> NoReturn:
        """Raise the mistake with the way to the list of flags."""
        raise UserInputError(f"{message}; see train_network_cat.py --help for the flags and their values.")


def build_parser() -> argparse.ArgumentParser:
    """Every flag of sd-scripts' train_network.py that this trainer knows, and CAT's."""
    parser = _Parser(description="LoRA training for Stable Diffusion 1.x/2.x with Contrastive Adapter Training.")
    for add in (_add_model_arguments, _add_network_arguments, _add_optimizer_arguments, _add_scheduler_arguments,
                _add_noise_arguments, _add_loss_arguments, _add_cat_arguments, _add_dataset_arguments,
                _add_caption_arguments, _add_run_arguments, _add_save_arguments, _add_metadata_arguments,
                _add_logging_arguments, _add_sample_arguments, _add_unsupported_arguments):
        add(parser)
    parser.add_argument("--config_file", type=str, default=None,
                        help="read the flags from this .toml file (.toml is appended if missing); flags given "
                             "on the command line override it")
    parser.add_argument("--output_config", action="store_true",
                        help="write the command-line flags to --config_file and exit, without training")
    return parser


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The base model (sd-scripts' add_sd_models_arguments and model options)."""
    group = parser.add_argument_group("model")
    group.add_argument("--pretrained_model_name_or_path", type=str, default=None,
                       help="the model to train on: a diffusers folder or a .safetensors/.ckpt checkpoint")
    group.add_argument("--v2", action="store_true", help="the model is Stable Diffusion 2.x")
    group.add_argument("--v_parameterization", action="store_true", help="train with v-prediction (SD 2.x 768)")
    group.add_argument("--vae", type=str, default=None, help="replace the model's VAE (folder or file)")
    group.add_argument("--model_config", type=str, default=None,
                       help="architecture config folder for converting a single-file checkpoint "
                            "(default: configs/models/sd_v1 or sd_v2)")
    group.add_argument("--tokenizer_cache_dir", type=str, default=None, help="directory for caching the tokenizer")
    group.add_argument("--clip_skip", type=int, default=None,
                       help="use the output of the n-th text-encoder layer from the end (n >= 1)")
    group.add_argument("--max_token_length", type=int, default=None, choices=[75, 150, 225],
                       help="text-encoder token length (default 75)")
    group.add_argument("--xformers", action="store_true", help="use xformers attention")
    group.add_argument("--sdpa", action="store_true", help="use PyTorch scaled-dot-product attention")
    group.add_argument("--mem_eff_attn", action="store_true", help="use memory-efficient attention")
    group.add_argument("--no_half_vae", action="store_true", help="keep the VAE in float32 under mixed precision")
    group.add_argument("--lowram", action="store_true", help="load models to VRAM instead of RAM")
    group.add_argument("--highvram", action="store_true", help="do not free VRAM caches (more VRAM, faster)")
    group.add_argument("--fp8_base", action="store_true", help="keep the base model in fp8")


def _add_network_arguments(parser: argparse.ArgumentParser) -> None:
    """The adapter network (sd-scripts' train_network.py setup_parser)."""
    group = parser.add_argument_group("network")
    group.add_argument("--network_module", type=str, default=DEFAULT_NETWORK_MODULE,
                       help=f"network module to train (default {DEFAULT_NETWORK_MODULE})")
    group.add_argument("--network_dim", type=int, default=None, help="network rank (the module's default if unset)")
    group.add_argument("--network_alpha", type=float, default=1.0, help="LoRA alpha (default 1)")
    group.add_argument("--network_dropout", type=float, default=None, help="neuron dropout (0 to 1)")
    group.add_argument("--network_args", type=str, default=None, nargs="*",
                       help='more network arguments as key=value, e.g. "conv_dim=4" "conv_alpha=1"')
    group.add_argument("--network_weights", type=str, default=None, help="initial network weights (a LoRA file)")
    group.add_argument("--dim_from_weights", action="store_true", help="take the rank from --network_weights")
    group.add_argument("--network_train_unet_only", action="store_true", help="train the U-Net adapters only")
    group.add_argument("--network_train_text_encoder_only", action="store_true",
                       help="train the text-encoder adapters only")
    group.add_argument("--base_weights", type=str, default=None, nargs="*",
                       help="LoRA files merged into the model before training")
    group.add_argument("--base_weights_multiplier", type=float, default=None, nargs="*",
                       help="one multiplier per --base_weights file (default 1.0)")
    group.add_argument("--scale_weight_norms", type=float, default=None,
                       help="scale adapter weights down to this maximum norm (1 is a good start)")


def _add_optimizer_arguments(parser: argparse.ArgumentParser) -> None:
    """The optimizer (sd-scripts' add_optimizer_arguments)."""
    group = parser.add_argument_group("optimizer")
    group.add_argument("--optimizer_type", type=str, default="",
                       help="AdamW (default), AdamW8bit, PagedAdamW, PagedAdamW8bit, PagedAdamW32bit, Lion, "
                            "Lion8bit, PagedLion8bit, SGDNesterov, SGDNesterov8bit, Prodigy, DAdaptAdam (and the "
                            "other DAdapt*), Adafactor, the ScheduleFree variants, any torch.optim name, or a "
                            "dotted class path")
    group.add_argument("--use_8bit_adam", action="store_true", help="same as --optimizer_type AdamW8bit")
    group.add_argument("--use_lion_optimizer", action="store_true", help="same as --optimizer_type Lion")
    group.add_argument("--optimizer_args", type=str, default=None, nargs="*",
                       help='optimizer arguments as key=value with Python literals, e.g. "weight_decay=0.01" '
                            '"betas=0.9,0.999"')
    group.add_argument("--learning_rate", type=float, default=2.0e-6, help="learning rate (default 2e-6)")
    group.add_argument("--unet_lr", type=float, default=None, help="learning rate of the U-Net adapters")
    group.add_argument("--text_encoder_lr", type=float, default=None, nargs="*",
                       help="learning rate of the text-encoder adapters")
    group.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping norm, 0 for none")


def _add_scheduler_arguments(parser: argparse.ArgumentParser) -> None:
    """The learning-rate schedule (sd-scripts' add_optimizer_arguments)."""
    group = parser.add_argument_group("learning-rate schedule")
    group.add_argument("--lr_scheduler", type=str, default="constant", choices=LR_SCHEDULERS,
                       help="learning-rate schedule (default constant)")
    group.add_argument("--lr_warmup_steps", type=steps_or_ratio, default=0,
                       help="warmup steps, or a ratio < 1 of the training steps (0.05 or 5%%)")
    group.add_argument("--lr_decay_steps", type=steps_or_ratio, default=0,
                       help="decay steps (warmup_stable_decay), or a ratio < 1 of the training steps")
    group.add_argument("--lr_scheduler_num_cycles", type=int, default=1, help="restarts of cosine_with_restarts")
    group.add_argument("--lr_scheduler_power", type=float, default=1.0, help="power of the polynomial schedule")
    group.add_argument("--lr_scheduler_timescale", type=int, default=None, help="timescale of inverse_sqrt")
    group.add_argument("--lr_scheduler_min_lr_ratio", type=float, default=None,
                       help="minimum learning rate as a ratio (cosine_with_min_lr, warmup_stable_decay)")
    group.add_argument("--lr_scheduler_type", type=str, default="", help="a custom scheduler class to use instead")
    group.add_argument("--lr_scheduler_args", type=str, default=None, nargs="*",
                       help='arguments of the custom scheduler as key=value, e.g. "T_max=100"')


def _add_noise_arguments(parser: argparse.ArgumentParser) -> None:
    """Noise and timesteps (sd-scripts' add_training_arguments)."""
    group = parser.add_argument_group("noise")
    group.add_argument("--noise_offset", type=float, default=None, help="noise offset (about 0.1)")
    group.add_argument("--noise_offset_random_strength", action="store_true",
                       help="draw the noise offset between 0 and --noise_offset")
    group.add_argument("--adaptive_noise_scale", type=float, default=None,
                       help="add latent mean absolute value times this to the noise offset")
    group.add_argument("--multires_noise_iterations", type=int, default=None, help="multires noise iterations (6-10)")
    group.add_argument("--multires_noise_discount", type=float, default=0.3, help="multires noise discount")
    group.add_argument("--ip_noise_gamma", type=float, default=None, help="input perturbation noise (about 0.1)")
    group.add_argument("--ip_noise_gamma_random_strength", action="store_true",
                       help="draw the input perturbation between 0 and --ip_noise_gamma")
    group.add_argument("--zero_terminal_snr", action="store_true", help="rescale betas to zero terminal SNR")
    group.add_argument("--min_timestep", type=int, default=None, help="lowest training timestep (0-999, default 0)")
    group.add_argument("--max_timestep", type=int, default=None,
                       help="highest training timestep, exclusive (1-1000, default 1000)")


def _add_loss_arguments(parser: argparse.ArgumentParser) -> None:
    """The loss (sd-scripts' add_training_arguments and add_custom_train_arguments)."""
    group = parser.add_argument_group("loss")
    group.add_argument("--loss_type", type=str, default="l2", choices=["l1", "l2", "huber", "smooth_l1"],
                       help="loss function (default l2)")
    group.add_argument("--huber_schedule", type=str, default="snr", choices=["constant", "exponential", "snr"],
                       help="Huber parameter schedule (default snr)")
    group.add_argument("--huber_c", type=float, default=0.1, help="Huber loss parameter (default 0.1)")
    group.add_argument("--huber_scale", type=float, default=1.0, help="Huber loss scale (default 1.0)")
    group.add_argument("--min_snr_gamma", type=float, default=None, help="min-SNR weighting gamma (5 in the paper)")
    group.add_argument("--prior_loss_weight", type=float, default=1.0, help="loss weight of regularisation images")
    group.add_argument("--masked_loss", action="store_true", help="apply a mask to the loss")
    group.add_argument("--scale_v_pred_loss_like_noise_pred", action="store_true",
                       help="scale the v-prediction loss like the noise-prediction loss")
    group.add_argument("--v_pred_like_loss", type=float, default=None, help="add a v-prediction-like loss")
    group.add_argument("--debiased_estimation_loss", action="store_true", help="debiased estimation loss")


def _add_cat_arguments(parser: argparse.ArgumentParser) -> None:
    """Contrastive Adapter Training (ours)."""
    group = parser.add_argument_group("Contrastive Adapter Training")
    group.add_argument("--cat_weight", type=float, default=1.0,
                       help="weight alpha of the CAT preservation term (default 1.0; 0 is plain LoRA training)")
    group.add_argument("--cat_trigger", type=str, default=None, nargs="+",
                       help='trigger words or phrases removed from captions, e.g. --cat_trigger sks "my cat"')
    group.add_argument("--cat_caption", type=str, default="strip", choices=CAPTION_MODES,
                       help="trigger-free caption: strip the trigger (default), replace it by the class word, "
                            "or use the empty prompt")
    group.add_argument("--cat_class_word", type=str, default=None,
                       help="class word for --cat_caption class (default: from the folder's class tokens)")
    group.add_argument("--cat_mode", type=str, default=DEFAULT_CAT_MODE, choices=CAT_MODES,
                       help=f"batched (faster) or sequential (plain LoRA memory); default {DEFAULT_CAT_MODE}")


def _add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    """Images, resolution, buckets and loading (sd-scripts' add_dataset_arguments)."""
    group = parser.add_argument_group("dataset")
    group.add_argument("--train_data_dir", type=str, default=None, help="folder of <repeats>_<class tokens> folders")
    group.add_argument("--reg_data_dir", type=str, default=None, help="regularisation images, same layout")
    group.add_argument("--dataset_config", type=str, default=None, help="dataset config .toml")
    group.add_argument("--in_json", type=str, default=None, help="fine-tuning metadata .json")
    group.add_argument("--dataset_repeats", type=int, default=1, help="repeats of the --in_json images (default 1)")
    group.add_argument("--resolution", type=str, default=None, help="training resolution: 'size' or 'width,height'")
    group.add_argument("--enable_bucket", action="store_true", help="aspect-ratio buckets")
    group.add_argument("--min_bucket_reso", type=int, default=256, help="smallest bucket side")
    group.add_argument("--max_bucket_reso", type=int, default=1024, help="largest bucket side")
    group.add_argument("--bucket_reso_steps", type=int, default=64, help="bucket side step")
    group.add_argument("--bucket_no_upscale", action="store_true", help="do not upscale images into buckets")
    group.add_argument("--flip_aug", action="store_true", help="random horizontal flips")
    group.add_argument("--color_aug", action="store_true", help="weak colour augmentation")
    group.add_argument("--random_crop", action="store_true", help="random crops")
    group.add_argument("--face_crop_aug_range", type=str, default=None, help="face-centred crop range, e.g. 2.0,4.0")
    group.add_argument("--alpha_mask", action="store_true", help="use the alpha channel as the loss mask")
    group.add_argument("--train_batch_size", type=int, default=1, help="batch size (default 1)")
    group.add_argument("--max_data_loader_n_workers", type=int, default=8, help="DataLoader workers (default 8)")
    group.add_argument("--persistent_data_loader_workers", action="store_true", help="keep DataLoader workers")
    group.add_argument("--cache_latents", action="store_true", help="cache VAE latents in memory")
    group.add_argument("--cache_latents_to_disk", action="store_true", help="cache VAE latents on disk")
    group.add_argument("--skip_cache_check", action="store_true", help="accepted for sd-scripts' configs; cache files are always checked (it is cheap)")
    group.add_argument("--vae_batch_size", type=int, default=1, help="batch size when caching latents")
    group.add_argument("--cache_text_encoder_outputs", action="store_true", help="cache text-encoder outputs")


def _add_caption_arguments(parser: argparse.ArgumentParser) -> None:
    """Captions (sd-scripts' add_dataset_arguments)."""
    group = parser.add_argument_group("captions")
    group.add_argument("--caption_extension", type=str, default=".caption", help="caption file extension")
    group.add_argument("--caption_extention", type=str, default=None,
                       help="old misspelling of --caption_extension, kept for compatibility")
    group.add_argument("--caption_separator", type=str, default=",", help="tag separator in captions")
    group.add_argument("--shuffle_caption", action="store_true", help="shuffle the tags of each caption")
    group.add_argument("--keep_tokens", type=int, default=0, help="keep the first N tags in place when shuffling")
    group.add_argument("--keep_tokens_separator", type=str, default="", help="tags before this are kept in place")
    group.add_argument("--secondary_separator", type=str, default=None, help="a second tag separator")
    group.add_argument("--enable_wildcard", action="store_true", help="{a|b} wildcards in captions")
    group.add_argument("--caption_prefix", type=str, default=None, help="text put before every caption")
    group.add_argument("--caption_suffix", type=str, default=None, help="text put after every caption")
    group.add_argument("--caption_dropout_rate", type=float, default=0.0, help="rate of empty captions")
    group.add_argument("--caption_dropout_every_n_epochs", type=int, default=0, help="empty captions every N epochs")
    group.add_argument("--caption_tag_dropout_rate", type=float, default=0.0, help="rate of dropped tags")
    group.add_argument("--token_warmup_min", type=int, default=1, help="start with N tags")
    group.add_argument("--token_warmup_step", type=float, default=0.0, help="reach all tags after N steps")
    group.add_argument("--weighted_captions", action="store_true", help="(token:1.3) weights in captions")


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Length, precision and the loop (sd-scripts' add_training_arguments, train_network.py)."""
    group = parser.add_argument_group("run")
    group.add_argument("--max_train_steps", type=int, default=1600, help="training steps (default 1600)")
    group.add_argument("--max_train_epochs", type=int, default=None, help="training epochs (overrides steps)")
    group.add_argument("--seed", type=int, default=None, help="random seed")
    group.add_argument("--gradient_accumulation_steps", type=int, default=1, help="steps per optimizer update")
    group.add_argument("--gradient_checkpointing", action="store_true", help="gradient checkpointing")
    group.add_argument("--mixed_precision", type=str, default="no", choices=["no", "fp16", "bf16"],
                       help="mixed precision (default no)")
    group.add_argument("--full_fp16", action="store_true", help="fp16 training including gradients")
    group.add_argument("--full_bf16", action="store_true", help="bf16 training including gradients")
    group.add_argument("--skip_until_initial_step", action="store_true", help="skip data up to --initial_step")
    group.add_argument("--initial_epoch", type=int, default=None, help="initial epoch number (1 = first)")
    group.add_argument("--initial_step", type=int, default=None, help="initial step number (0 = first)")
    group.add_argument("--validation_split", type=float, default=0.0, help="share of images used for validation")
    group.add_argument("--validation_seed", type=int, default=None, help="seed of the validation split")
    group.add_argument("--validate_every_n_steps", type=int, default=None, help="validate every N steps")
    group.add_argument("--validate_every_n_epochs", type=int, default=None, help="validate every N epochs")
    group.add_argument("--max_validation_steps", type=int, default=None, help="validation batches per run")


def _add_save_arguments(parser: argparse.ArgumentParser) -> None:
    """Outputs and states (sd-scripts' add_training_arguments, train_network.py)."""
    group = parser.add_argument_group("saving")
    group.add_argument("--output_dir", type=str, default=None, help="folder for the trained LoRA files")
    group.add_argument("--output_name", type=str, default=None, help="file name of the LoRA, without extension")
    group.add_argument("--save_model_as", type=str, default="safetensors",
                       help="file format; only safetensors is written")
    group.add_argument("--save_precision", type=str, default=None, choices=["float", "fp16", "bf16"],
                       help="dtype of the saved weights")
    group.add_argument("--save_every_n_epochs", type=int, default=None, help="save every N epochs")
    group.add_argument("--save_every_n_steps", type=int, default=None, help="save every N steps")
    group.add_argument("--save_n_epoch_ratio", type=int, default=None, help="save at least N files in total")
    group.add_argument("--save_last_n_epochs", type=int, default=None, help="keep the last N epoch files")
    group.add_argument("--save_last_n_steps", type=int, default=None, help="keep step files of the last N steps")
    group.add_argument("--save_state", action="store_true", help="also save the training state")
    group.add_argument("--save_state_on_train_end", action="store_true", help="save the training state at the end")
    group.add_argument("--save_last_n_epochs_state", type=int, default=None, help="keep the last N epoch states")
    group.add_argument("--save_last_n_steps_state", type=int, default=None, help="keep states of the last N steps")
    group.add_argument("--resume", type=str, default=None, help="training state folder to resume from")
    group.add_argument("--no_metadata", action="store_true", help="write no metadata into the LoRA file")


def _add_metadata_arguments(parser: argparse.ArgumentParser) -> None:
    """Metadata text (sd-scripts' sai_model_spec.add_model_spec_arguments and --training_comment)."""
    group = parser.add_argument_group("metadata")
    for name, text in (("title", "title (default: the output name)"), ("author", "author"),
                       ("description", "description"), ("license", "license"), ("tags", "tags, comma-separated"),
                       ("trigger_phrase", "trigger phrase")):
        group.add_argument(f"--metadata_{name}", type=str, default=None, help=f"model {text} in the metadata")
    group.add_argument("--training_comment", type=str, default=None, help="a comment stored in the metadata")


def _add_logging_arguments(parser: argparse.ArgumentParser) -> None:
    """Training logs and console logging (sd-scripts' add_training_arguments, utils.add_logging_arguments)."""
    group = parser.add_argument_group("logging")
    group.add_argument("--logging_dir", type=str, default=None, help="write TensorBoard logs to this folder")
    group.add_argument("--log_with", type=str, default=None, choices=["tensorboard", "wandb", "all"],
                       help="logging tool (tensorboard)")
    group.add_argument("--log_prefix", type=str, default=None, help="prefix of the log folder name")
    group.add_argument("--log_tracker_name", type=str, default=None, help="tracker (project) name")
    group.add_argument("--log_tracker_config", type=str, default=None, help="tracker config file")
    group.add_argument("--log_config", action="store_true", help="log the configuration to the tracker")
    group.add_argument("--wandb_run_name", type=str, default=None, help="wandb run name")
    group.add_argument("--wandb_api_key", type=str, default=None, help="wandb API key")
    group.add_argument("--console_log_level", type=str, default=None, choices=LOG_LEVELS,
                       help="console log level (default INFO)")
    group.add_argument("--console_log_file", type=str, default=None, help="log to this file instead of stderr")
    group.add_argument("--console_log_simple", action="store_true", help="simple console log lines")


def _add_sample_arguments(parser: argparse.ArgumentParser) -> None:
    """Sample images during training (sd-scripts' add_training_arguments)."""
    group = parser.add_argument_group("sample images")
    group.add_argument("--sample_prompts", type=str, default=None, help="prompt file (.txt, .toml or .json)")
    group.add_argument("--sample_every_n_steps", type=int, default=None, help="sample every N steps")
    group.add_argument("--sample_every_n_epochs", type=int, default=None, help="sample every N epochs")
    group.add_argument("--sample_at_first", action="store_true", help="sample before training")
    group.add_argument("--sample_sampler", type=str, default="ddim", choices=SAMPLERS + tuple(SAMPLER_ALIASES),
                       help="sampler (default ddim)")
    group.add_argument("--sample_cat_compare", action="store_true",
                       help="each sample a strip of three from the same noise: base model and adapted model on "
                            "the trigger-free prompt, adapted model on the prompt as written")
    group = parser.add_argument_group("preservation signal")
    group.add_argument("--preservation_prompts", type=str, default=None,
                       help="text file of trigger-free prompts, one per line: logs preservation/drift, how far "
                            "the adapter moved the U-Net's predictions on them")
    group.add_argument("--preservation_every_n_steps", type=int, default=None,
                       help="measure the drift every N steps (and before the first)")


def _add_unsupported_arguments(parser: argparse.ArgumentParser) -> None:
    """sd-scripts flags for the Hugging Face Hub, accepted so that configs using them get a clear refusal."""
    group = parser.add_argument_group("Hugging Face Hub (not implemented)")
    for name in ("huggingface_repo_id", "huggingface_repo_type", "huggingface_path_in_repo", "huggingface_token",
                 "huggingface_repo_visibility"):
        group.add_argument(f"--{name}", type=str, default=None, help=argparse.SUPPRESS)
    for name in ("save_state_to_huggingface", "resume_from_huggingface", "async_upload"):
        group.add_argument(f"--{name}", action="store_true", help=argparse.SUPPRESS)


def steps_or_ratio(text: str) -> int | float:
    """A step count ("100") or a ratio below 1 of the training steps ("0.05", "5%"), as sd-scripts reads
    `--lr_warmup_steps`; "100.0" is 100 steps (sd-scripts fails on it), "1.5" is refused."""
    try:
        value = float(text[:-1]) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0 or (value >= 1 and not value.is_integer()):
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a whole number of steps (e.g. 100) nor a ratio below 1 (e.g. 0.05 or 5%)"
        )
    return int(value) if value >= 1 or value == 0 else value


# endregion

# region values and where they came from


@dataclass(frozen=True)
class ArgValues:
    """The merged flag values (defaults < config file < command line) and where each came from."""

    values: Mapping[str, Any]
    defaults: Mapping[str, Any]
    from_command_line: frozenset[str]
    from_file: frozenset[str]
    config_file: Path | None

    def __getitem__(self, dest: str) -> Any:
        return self.values[dest]

    def is_set(self, dest: str) -> bool:
        """Whether the value differs from the default (however it was given)."""
        return self.values[dest] != self.defaults[dest]

    def show(self, dest: str) -> str:
        """The value as the user wrote it, with its place: "--cat_weight -1" or "cat_weight = -1 in x.toml"."""
        value = self.values[dest]
        if dest in self.from_file and dest not in self.from_command_line:
            return f"{dest} = {_toml_text(value)} in {self.config_file}"
        return f"--{dest}" + ("" if value is True else f" {_cli_text(value)}")


def _cli_text(value: Any) -> str:
    """A value as it would be typed on the command line."""
    if isinstance(value, (list, tuple)):
        return " ".join(_cli_text(item) for item in value)
    text = _number_text(value) if isinstance(value, float) else str(value)
    return f'"{text}"' if " " in text or not text else text


def _toml_text(value: Any) -> str:
    """A value as it would be written in TOML, whole floats without ".0"."""
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_text(item) for item in value) + "]"
    return _number_text(value) if isinstance(value, float) else toml_text(value)


def _number_text(value: float) -> str:
    """-1.0 as "-1", as the user most likely typed it; other floats exactly (repr)."""
    return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)


def read_arg_values(argv: Sequence[str] | None, parser: argparse.ArgumentParser | None = None) -> ArgValues:
    """Parse the command line, read --config_file, and merge: command line > file > defaults.

    An explicit flag wins even when it repeats the default: the command line is parsed into a
    namespace of placeholders, so a flag counts as given exactly when argparse set it.
    """
    parser = parser or build_parser()
    defaults = vars(parser.parse_args([]))
    placeholders = argparse.Namespace(**{dest: _UNSET for dest in defaults})
    parsed = vars(parser.parse_args(list(argv) if argv is not None else None, namespace=placeholders))
    explicit = {dest: value for dest, value in parsed.items() if value is not _UNSET}
    file_values: Mapping[str, Any] = {}
    read_from = None
    if explicit.get("config_file") and not explicit.get("output_config"):
        loaded = load_config_file(explicit["config_file"], parser)
        file_values, read_from = loaded.values, loaded.path
    return ArgValues(
        values={**defaults, **file_values, **explicit},
        defaults=defaults,
        from_command_line=frozenset(explicit),
        from_file=frozenset(file_values),
        config_file=read_from,
    )


# endregion

# region parse_args


def parse_args(argv: Sequence[str] | None = None) -> TrainConfig:
    """The checked training configuration from `argv` (default: sys.argv[1:]) and its --config_file.

    With --output_config, writes the command-line flags to --config_file and exits (as sd-scripts).
    """
    args = _normalized(read_arg_values(argv))
    if args["output_config"]:
        _write_output_config(args)
    for check in _CHECKS:
        check(args)
    _check_not_implemented(args)
    for warn in _WARNINGS:
        warn(args)
    return _train_config(args)


def _normalized(args: ArgValues) -> ArgValues:
    """Rewrites done once here: GUI's max_token_length 75 is the default window, sampling intervals
    <= 0 mean no sampling (sd-scripts), the old --caption_extention spelling still works (sd-scripts),
    and persistent workers need workers."""
    values = dict(args.values)
    if values["max_token_length"] == 75:
        values["max_token_length"] = None
    for dest in ("sample_every_n_steps", "sample_every_n_epochs"):
        if values[dest] is not None and values[dest] <= 0:
            logger.warning("%s is 0 or less, so no samples are made at that interval, as in sd-scripts.",
                           args.show(dest))
            values[dest] = None
    if values["caption_extention"] is not None:
        values["caption_extension"], values["caption_extention"] = values["caption_extention"], None
    if values["persistent_data_loader_workers"] and values["max_data_loader_n_workers"] == 0:
        # torch's DataLoader refuses persistent workers without workers; a GUI config can hold this pair.
        logger.warning("%s with %s: there are no workers to keep, so workers are not persistent.",
                       args.show("persistent_data_loader_workers"), args.show("max_data_loader_n_workers"))
        values["persistent_data_loader_workers"] = False
    return ArgValues(MappingProxyType(values), args.defaults, args.from_command_line, args.from_file, args.config_file)


def _write_output_config(args: ArgValues) -> None:
    """--output_config: write the non-default command-line flags to --config_file and exit."""
    if not args["config_file"]:
        raise UserInputError("--output_config needs --config_file naming the .toml file to write.")
    path = config_path(args["config_file"])
    skipped = {"config_file", "output_config", "wandb_api_key"}  # a key is not written into a shareable file
    values = {dest: args[dest] for dest in sorted(args.from_command_line) if dest not in skipped and args.is_set(dest)}
    write_config_file(path, values)
    logger.info("Wrote the flags to %s; run again with --config_file %s to train.", path, path)
    raise SystemExit(0)


# endregion

# region checks: each raises a UserInputError with one sentence, or logs a warning


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
                 "save_last_n_steps", "vae_batch_size", "lr_scheduler_num_cycles", "clip_skip"):
        if args[dest] is not None and args[dest] < 1:
            raise UserInputError(f"{args.show(dest)}: this must be 1 or more.")
    if args["max_data_loader_n_workers"] < 0:
        raise UserInputError(f"{args.show('max_data_loader_n_workers')}: this must be 0 or more.")


def dataset_defaults(**values: Any) -> DataArgs:
    """The dataset flags as the command line gives them by default, with `values` set: for tools
    that read a training dataset exactly as the trainer does (evaluate_kps.py)."""
    defaults = vars(build_parser().parse_args([]))
    picked = {f.name: defaults[f.name] for f in fields(DataArgs)}
    picked["resolution"] = None
    return DataArgs(**{**picked, **values})


def _check_dataset(args: ArgValues) -> None:
    """Rates within 0..1, counts not negative, bucket sides sensible (the dataset config checks its own)."""
    for dest in ("caption_dropout_rate", "caption_tag_dropout_rate"):
        if not 0 <= args[dest] <= 1:
            raise UserInputError(f"{args.show(dest)}: a rate must be between 0 and 1.")
    for dest in ("keep_tokens", "caption_dropout_every_n_epochs"):
        if args[dest] < 0:
            raise UserInputError(f"{args.show(dest)}: this must be 0 or more.")
    for dest in ("min_bucket_reso", "max_bucket_reso", "bucket_reso_steps"):
        if args[dest] < 8:
            raise UserInputError(f"{args.show(dest)}: bucket sizes are pixels, at least 8 (64 is usual for steps).")


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


def _warn_model(args: ArgValues) -> None:
    """sd-scripts' warnings for combinations that train, but probably not as meant."""
    if args["v_parameterization"] and not args["v2"]:
        logger.warning("--v_parameterization without --v2: v-prediction is meant for SD 2.x models.")
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


_CHECKS = (_check_required, _check_resolution, _check_positive, _check_dataset, _check_network, _check_cat, _check_precision,
           _check_optimizer, _check_scheduler, _check_timesteps, _check_saving, _check_preservation)
_WARNINGS = (_warn_model, _warn_cat, _warn_dataset)


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

# region the dataclasses


def _train_config(args: ArgValues) -> TrainConfig:
    """Build the typed configuration from checked values."""
    return TrainConfig(
        model=_pick(ModelArgs, args),
        network=_network_args(args),
        optimizer=_optimizer_args(args),
        scheduler=_pick(SchedulerArgs, args, lr_scheduler_type=args["lr_scheduler_type"] or None,
                        lr_scheduler_args=MappingProxyType(parse_literal_args(args["lr_scheduler_args"] or []))),
        noise=_pick(NoiseArgs, args),
        loss=_pick(LossArgs, args),
        cat=_pick(CATArgs, args, prefix="cat_", triggers=tuple(t.strip() for t in args["cat_trigger"] or [])),
        data=_pick(DataArgs, args, resolution=_resolution(args)),
        run=_pick(RunArgs, args),
        save=_pick(SaveArgs, args),
        metadata=_pick(MetadataArgs, args, prefix="metadata_", training_comment=args["training_comment"]),
        log=_pick(LogArgs, args),
        sample=_pick(SampleArgs, args, prefix="sample_"),
        preservation=_pick(PreservationArgs, args, prefix="preservation_"),
        config_file=args.config_file,
    )


def _pick(cls: type, source: ArgValues, prefix: str = "", **overrides: Any) -> Any:
    """An instance of dataclass `cls` whose fields are the flags `prefix + field name`, unless overridden."""
    values = {f.name: source[prefix + f.name] for f in fields(cls) if f.name not in overrides}
    return cls(**values, **overrides)


def _resolution(args: ArgValues) -> tuple[int, int] | None:
    """--resolution as (width, height), or None when not given."""
    return None if args["resolution"] is None else parse_resolution(args["resolution"])


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


def _optimizer_args(args: ArgValues) -> OptimizerArgs:
    """OptimizerArgs: the optimizer name resolved, optimizer_args parsed, one text-encoder lr."""
    return _pick(
        OptimizerArgs, args,
        optimizer_type=_optimizer_type(args),
        optimizer_args=MappingProxyType(parse_literal_args(args["optimizer_args"] or [])),
        text_encoder_lr=_text_encoder_lr(args),
    )


def _optimizer_type(args: ArgValues) -> str:
    """--optimizer_type, or what the old switches mean, or AdamW."""
    if args["use_8bit_adam"]:
        return "AdamW8bit"
    if args["use_lion_optimizer"]:
        return "Lion"
    return args["optimizer_type"] or DEFAULT_OPTIMIZER


def _text_encoder_lr(args: ArgValues) -> float | None:
    """SD 1.x/2.x have one text encoder: the first --text_encoder_lr value (GUIs write it twice)."""
    rates = args["text_encoder_lr"] or []
    if len(set(rates)) > 1:
        logger.warning("%s: SD 1.x/2.x have one text encoder, so only the first rate, %g, is used.",
                       args.show("text_encoder_lr"), rates[0])
    return rates[0] if rates else None


# endregion
