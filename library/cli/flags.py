"""The flags of `train_network_cat.py`: sd-scripts' `train_network.py` flags plus CAT's, in groups.

Names, types, defaults and choices are sd-scripts' (library/train_util.py, train_network.py,
custom_train_functions.py, sai_model_spec.py, utils.py). This file only declares them: the values are
checked in checks.py and turned into a `TrainConfig` in to_config.py. Flags that are accepted but not
implemented are declared here too, with their defaults; unsupported.py lists them with reasons.
"""

from __future__ import annotations

import argparse
import math
from typing import NoReturn

from library.cat.captions import CAPTION_MODES
from library.cat.objective import CAT_MODES
from library.config.training_script import SD_SCRIPT, TrainingScript
from library.config.train_config import MODEL_PREDICTION_TYPES, TIMESTEP_SAMPLINGS, WEIGHTING_SCHEMES
from library.data.resampling import CLI_RESIZE_INTERPOLATIONS
from library.errors import UserInputError
from library.sampling.sample_prompts import SAMPLER_ALIASES, SAMPLERS

DEFAULT_CAT_MODE = "sequential"
DEFAULT_NETWORK_MODULE = "networks.lora_cat"

LR_SCHEDULERS = (
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "adafactor",
    "piecewise_constant", "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay",
)
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class _Parser(argparse.ArgumentParser):
    """argparse, with mistakes raised as `UserInputError` instead of printing usage and exiting."""

    def __init__(self, script_name: str, **kwargs):
        super().__init__(prog=script_name, **kwargs)

    def error(self, message: str) -> NoReturn:
        """Raise the mistake with the way to the list of flags."""
        raise UserInputError(f"{message}; see {self.prog} --help for the flags and their values.")


def build_parser(script: TrainingScript = SD_SCRIPT) -> argparse.ArgumentParser:
    """Every flag of sd-scripts' `script.replaces` that this trainer knows, and CAT's (one set of flags
    for every family: the family's rules are checked in checks.py)."""
    parser = _Parser(script.name, description=f"LoRA training for {script.model_name} with Contrastive Adapter Training.")
    for add in (_add_model_arguments, _add_network_arguments, _add_optimizer_arguments, _add_scheduler_arguments,
                _add_flux_arguments, _add_flow_matching_arguments, _add_noise_arguments, _add_loss_arguments, _add_cat_arguments, _add_dataset_arguments,
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
    group.add_argument("--mem_eff_attn", action="store_true",
                       help="memory-efficient attention: PyTorch SDPA here (it takes precedence over --xformers)")
    group.add_argument("--no_half_vae", action="store_true", help="keep the VAE in float32 under mixed precision")
    group.add_argument("--disable_mmap_load_safetensors", action="store_true",
                       help="read a .safetensors checkpoint into memory at once instead of memory-mapping it (SDXL)")
    group.add_argument("--lowram", action="store_true", help="load models to VRAM instead of RAM")
    group.add_argument("--highvram", action="store_true", help="do not free VRAM caches (more VRAM, faster)")
    group.add_argument("--fp8_base", action="store_true",
                       help="store the base model's Linear/Conv weights in fp8 (U-Net or transformer and text encoders)")
    group.add_argument("--fp8_base_unet", action="store_true",
                       help="store only the U-Net's (FLUX.1: the transformer's) weights in fp8")


def _add_flux_arguments(parser: argparse.ArgumentParser) -> None:
    """FLUX.1's model flags (sd-scripts' add_flux_train_arguments); flux_train_network_cat.py only."""
    group = parser.add_argument_group("FLUX.1 (flux_train_network_cat.py)")
    group.add_argument("--clip_l", type=str, default=None, help="CLIP-L text encoder file (with a BFL transformer file)")
    group.add_argument("--t5xxl", type=str, default=None, help="T5-XXL text encoder file (with a BFL transformer file)")
    group.add_argument("--ae", type=str, default=None, help="FLUX autoencoder file, ae.safetensors (with a BFL transformer file)")
    group.add_argument("--t5xxl_max_token_length", type=int, default=None,
                       help="T5 token length (default 512 for dev, 256 for schnell)")
    group.add_argument("--apply_t5_attn_mask", action="store_true", help="mask T5's padding tokens in attention")
    group.add_argument("--guidance_scale", type=float, default=3.5,
                       help="the guidance value FLUX.1-dev is given in training (default 3.5; 1.0 is often used)")
    group.add_argument("--model_type", type=str, default="flux", choices=["flux", "chroma"],
                       help="flux (default) or chroma")
    group.add_argument("--blocks_to_swap", type=int, default=None,
                       help="transformer blocks swapped to the CPU to save VRAM")
    group.add_argument("--split_mode", action="store_true", help="deprecated in sd-scripts (= --blocks_to_swap 18)")


def _add_flow_matching_arguments(parser: argparse.ArgumentParser) -> None:
    """How flow-matching models (FLUX.1) draw timesteps and weigh the loss (sd-scripts' flags and defaults)."""
    group = parser.add_argument_group("flow matching (flux_train_network_cat.py)")
    group.add_argument("--timestep_sampling", type=str, default="sigma", choices=list(TIMESTEP_SAMPLINGS),
                       help="how sigmas are drawn (default sigma: the schedule shifted by --discrete_flow_shift)")
    group.add_argument("--sigmoid_scale", type=float, default=1.0, help="scale of the normal draw for sigmoid/shift samplings")
    group.add_argument("--discrete_flow_shift", type=float, default=3.0, help="schedule shift (default 3.0)")
    group.add_argument("--model_prediction_type", type=str, default="sigma_scaled", choices=list(MODEL_PREDICTION_TYPES),
                       help="how the output is compared with the target (default sigma_scaled; raw is recommended)")
    group.add_argument("--weighting_scheme", type=str, default="uniform", choices=list(WEIGHTING_SCHEMES),
                       help="timestep density / loss weighting (default uniform)")
    group.add_argument("--logit_mean", type=float, default=0.0, help="mean of the logit_normal density")
    group.add_argument("--logit_std", type=float, default=1.0, help="standard deviation of the logit_normal density")
    group.add_argument("--mode_scale", type=float, default=1.29, help="scale of the mode density")


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
    group.add_argument("--masked_loss", action="store_true",
                       help="weight the loss by masks: conditioning_data_dir in the dataset config's subsets, "
                            "or the images' alpha channel with --alpha_mask")
    group.add_argument("--conditioning_data_dir", type=str, default=None,
                       help="refused: sd-scripts' train_network.py ignores it; set conditioning_data_dir in a "
                            "dataset-config subset")
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
    group.add_argument("--cat_prompts", type=str, default=None,
                       help="text file of trigger-free prompts (one a line) the CAT term also preserves, at each "
                            "sample's noisy latent and timestep")
    group.add_argument("--cat_prompts_per_step", type=int, default=1,
                       help="prompts of --cat_prompts drawn for each batch (default 1)")
    group.add_argument("--cat_prompts_weight", type=float, default=1.0,
                       help="weight of the prompts' mean term inside the CAT term (default 1.0)")
    group.add_argument("--cat_drift_budget", type=float, default=None,
                       help="adapt alpha during training so the running mean of the CAT term stays near this "
                            "value (--cat_weight is the starting alpha)")
    group.add_argument("--cat_budget_rate", type=float, default=0.05,
                       help="how fast alpha follows --cat_drift_budget: its largest relative change per step "
                            "is exp(rate) (default 0.05)")


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
    group.add_argument("--resize_interpolation", type=str, default=None, choices=list(CLI_RESIZE_INTERPOLATIONS),
                       help="how images are resized to their bucket (default: lanczos)")
    group.add_argument("--alpha_mask", action="store_true", help="use the alpha channel as the loss mask")
    group.add_argument("--cache_info", action="store_true",
                       help="keep image sizes in each image folder's metadata_cache.json for faster starts")
    group.add_argument("--train_batch_size", type=int, default=1, help="batch size (default 1)")
    group.add_argument("--max_data_loader_n_workers", type=int, default=8, help="DataLoader workers (default 8)")
    group.add_argument("--persistent_data_loader_workers", action="store_true", help="keep DataLoader workers")
    group.add_argument("--cache_latents", action="store_true", help="cache VAE latents in memory")
    group.add_argument("--cache_latents_to_disk", action="store_true", help="cache VAE latents on disk")
    group.add_argument("--skip_cache_check", action="store_true", help="accepted for sd-scripts' configs; cache files are always checked (it is cheap)")
    group.add_argument("--vae_batch_size", type=int, default=1, help="batch size when caching latents")
    group.add_argument("--cache_text_encoder_outputs", action="store_true", help="cache text-encoder outputs (SDXL)")
    group.add_argument("--cache_text_encoder_outputs_to_disk", action="store_true",
                       help="cache text-encoder outputs on disk (SDXL; implies --cache_text_encoder_outputs)")
    group.add_argument("--text_encoder_batch_size", type=int, default=None,
                       help="captions per text-encoder call when caching its outputs (default: the batch size)")


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
    group.add_argument("--secondary_separator", type=str, default=None,
                       help="joins tags that shuffle and drop out together; replaced by --caption_separator after")
    group.add_argument("--enable_wildcard", action="store_true",
                       help="{a|b} choices in captions, and a random line of multi-line caption files, each step")
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
    group.add_argument("--ddp_timeout", type=int, default=None,
                       help="minutes processes wait for each other (default: accelerate's)")
    group.add_argument("--ddp_gradient_as_bucket_view", action="store_true",
                       help="accepted; no effect here (no DDP wrapper: gradients are averaged directly)")
    group.add_argument("--ddp_static_graph", action="store_true",
                       help="accepted; no effect here (no DDP wrapper: gradients are averaged directly)")


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
                       ("trigger_phrase", "trigger phrase"), ("usage_hint", "usage hint"),
                       ("thumbnail", "thumbnail: a data URL, or an image file written in as one"),
                       ("merged_from", "source models"), ("preprocessor", "preprocessor"),
                       ("is_negative_embedding", "is-a-negative-embedding flag")):
        group.add_argument(f"--metadata_{name}", type=str, default=None, help=f"model {text} in the metadata")
    group.add_argument("--training_comment", type=str, default=None, help="a comment stored in the metadata")


def _add_logging_arguments(parser: argparse.ArgumentParser) -> None:
    """Training logs and console logging (sd-scripts' add_training_arguments, utils.add_logging_arguments)."""
    group = parser.add_argument_group("logging")
    group.add_argument("--logging_dir", type=str, default=None,
                       help="log to a folder per run in this one (TensorBoard by default)")
    group.add_argument("--log_with", type=str, default=None, choices=["tensorboard", "wandb", "all"],
                       help="tensorboard, wandb, or all (every tracker installed)")
    group.add_argument("--log_prefix", type=str, default=None, help="prefix of the log folder name")
    group.add_argument("--log_tracker_name", type=str, default=None, help="tracker (project) name")
    group.add_argument("--log_tracker_config", type=str, default=None,
                       help="TOML file of each tracker's init keywords ([wandb] ...)")
    group.add_argument("--log_config", action="store_true",
                       help="store the flags (without keys and paths) as the trackers' config")
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
    """sd-scripts flags not implemented here (library.cli.unsupported says why), accepted so that
    configs using them get a clear refusal rather than argparse's "unrecognized arguments"."""
    group = parser.add_argument_group("not implemented")
    for name in ("huggingface_repo_id", "huggingface_repo_type", "huggingface_path_in_repo", "huggingface_token",
                 "huggingface_repo_visibility", "dataset_class", "offload_optimizer_device",
                 "offload_optimizer_nvme_path", "offload_param_device", "offload_param_nvme_path"):
        group.add_argument(f"--{name}", type=str, default=None, help=argparse.SUPPRESS)
    for name in ("save_state_to_huggingface", "resume_from_huggingface", "async_upload", "torch_compile",
                 "deepspeed", "zero3_init_flag", "zero3_save_16bit_model", "fp16_master_weights_and_gradients",
                 "fused_backward_pass", "debug_dataset", "cpu_offload_checkpointing"):
        group.add_argument(f"--{name}", action="store_true", help=argparse.SUPPRESS)
    group.add_argument("--dynamo_backend", type=str, default="inductor", help=argparse.SUPPRESS)  # sd-scripts' default
    group.add_argument("--zero_stage", type=int, default=2, help=argparse.SUPPRESS)  # sd-scripts' default


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
