"""The training configuration as typed, frozen dataclasses, one per concern.

`library.cli.train_args.parse_args` builds a `TrainConfig` once, at the edge, from the command line and
`--config_file`; everything below the edge reads these and never the raw namespace. Field names are
the sd-scripts flag names, without the group's prefix where the group names it (`--network_dim` is
`config.network.dim`, `--cat_weight` is `config.cat.weight`, `--sample_sampler` is
`config.sample.sampler`, `--metadata_title` is `config.metadata.title`); every other field is
spelled exactly like its flag. Values are already checked: the trainer does not re-validate them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping


@dataclass(frozen=True)
class ModelArgs:
    """The base model and how it runs."""

    pretrained_model_name_or_path: str
    v2: bool
    v_parameterization: bool
    vae: str | None
    model_config: str | None  # architecture config folder for converting a single-file checkpoint
    tokenizer_cache_dir: str | None
    clip_skip: int | None
    max_token_length: int | None  # None: the 75-token window (kohya_ss GUI's "75" is read as None)
    xformers: bool
    sdpa: bool
    mem_eff_attn: bool
    no_half_vae: bool
    disable_mmap_load_safetensors: bool  # read a .safetensors checkpoint into memory at once (SDXL's flag)
    lowram: bool
    highvram: bool
    weighted_captions: bool = False  # captions' (word:1.2) weights scale their tokens' text states (SD, SDXL)
    fp8_base: bool = False  # the frozen U-Net/transformer and text encoders' Linear/Conv weights in fp8
    fp8_base_unet: bool = False  # only the U-Net's/transformer's
    # FLUX.1 (flux_train_network_cat.py): the text encoders and AE beside a BFL transformer file, and how it is told the text
    clip_l: str | None = None
    t5xxl: str | None = None
    ae: str | None = None
    t5xxl_max_token_length: int | None = None  # None: 512 for dev, 256 for schnell
    apply_t5_attn_mask: bool = False
    guidance_scale: float = 3.5
    # --mixed_precision: what the trainer casts the frozen weights to, so a large model (FLUX.1's 12B
    # transformer) can be read straight into it instead of into float32 first
    weight_precision: str = "no"


@dataclass(frozen=True)
class NetworkArgs:
    """The adapter network: `--network_*` flags and the weights merged in before training."""

    module: str
    dim: int | None  # None: the network module's default
    alpha: float
    dropout: float | None
    args: Mapping[str, str]  # --network_args k=v, values as text, as create_network receives them
    weights: str | None
    dim_from_weights: bool
    train_unet_only: bool
    train_text_encoder_only: bool
    base_weights: tuple[str, ...]
    base_weights_multiplier: tuple[float, ...]  # one per base weight file (1.0 where not given)
    scale_weight_norms: float | None


@dataclass(frozen=True)
class OptimizerArgs:
    """The optimizer and its learning rates."""

    optimizer_type: str  # resolved: "AdamW" if not given; --use_8bit_adam is "AdamW8bit", --use_lion_optimizer "Lion"
    optimizer_args: Mapping[str, Any]  # k=v with Python-literal values: {"betas": (0.9, 0.999)}
    learning_rate: float
    unet_lr: float | None
    # One rate for every text encoder, or one per text encoder (SDXL: TE1, TE2); None: --learning_rate.
    text_encoder_lr: float | tuple[float, ...] | None
    max_grad_norm: float


@dataclass(frozen=True)
class SchedulerArgs:
    """The learning-rate schedule."""

    lr_scheduler: str
    lr_warmup_steps: int | float  # a step count, or a float ratio < 1 of the training steps
    lr_decay_steps: int | float  # likewise (warmup_stable_decay)
    lr_scheduler_num_cycles: int
    lr_scheduler_power: float
    lr_scheduler_timescale: int | None
    lr_scheduler_min_lr_ratio: float | None
    lr_scheduler_type: str | None  # a custom scheduler class, e.g. "CosineAnnealingLR"
    lr_scheduler_args: Mapping[str, Any]

    def warmup_steps(self, num_training_steps: int) -> int:
        """Warmup in steps: a ratio is taken of `num_training_steps`, as sd-scripts does."""
        return _steps(self.lr_warmup_steps, num_training_steps)

    def decay_steps(self, num_training_steps: int) -> int:
        """Decay in steps: a ratio is taken of `num_training_steps`, as sd-scripts does."""
        return _steps(self.lr_decay_steps, num_training_steps)


def _steps(value: int | float, num_training_steps: int) -> int:
    """A step count as is; a float ratio times the number of training steps, rounded down."""
    return int(value * num_training_steps) if isinstance(value, float) else value


@dataclass(frozen=True)
class NoiseArgs:
    """How noise and timesteps are drawn."""

    noise_offset: float | None
    noise_offset_random_strength: bool
    adaptive_noise_scale: float | None
    multires_noise_iterations: int | None
    multires_noise_discount: float
    ip_noise_gamma: float | None
    ip_noise_gamma_random_strength: bool
    zero_terminal_snr: bool
    min_timestep: int | None  # None: 0
    max_timestep: int | None  # None: 1000

    @property
    def timestep_range(self) -> tuple[int, int]:
        """Timesteps are drawn from `randint(low, high)`, as in sd-scripts."""
        low = 0 if self.min_timestep is None else self.min_timestep
        high = 1000 if self.max_timestep is None else self.max_timestep
        return low, high


TIMESTEP_SAMPLINGS = ("sigma", "uniform", "sigmoid", "shift", "flux_shift")
MODEL_PREDICTION_TYPES = ("raw", "additive", "sigma_scaled")
WEIGHTING_SCHEMES = ("uniform", "none", "sigma_sqrt", "logit_normal", "mode", "cosmap")


@dataclass(frozen=True)
class FlowMatchArgs:
    """How flow-matching families (FLUX.1) draw sigmas and weigh the loss; sd-scripts' flags and defaults."""

    timestep_sampling: str = "sigma"  # one of TIMESTEP_SAMPLINGS
    sigmoid_scale: float = 1.0
    discrete_flow_shift: float = 3.0
    model_prediction_type: str = "sigma_scaled"  # one of MODEL_PREDICTION_TYPES
    weighting_scheme: str = "uniform"  # one of WEIGHTING_SCHEMES
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29


@dataclass(frozen=True)
class LossArgs:
    """The main loss and its per-sample weights."""

    loss_type: str  # l1, l2, huber, smooth_l1
    huber_schedule: str
    huber_c: float
    huber_scale: float
    min_snr_gamma: float | None
    scale_v_pred_loss_like_noise_pred: bool
    v_pred_like_loss: float | None
    debiased_estimation_loss: bool
    prior_loss_weight: float


@dataclass(frozen=True)
class CATArgs:
    """Contrastive Adapter Training (arXiv 2404.07554): the preservation term and its captions."""

    weight: float  # alpha; 0 is exactly plain LoRA training
    triggers: tuple[str, ...]  # words or phrases removed from captions to get the trigger-free caption
    caption: str  # strip, class or empty: how the trigger-free caption is derived
    class_word: str | None
    mode: str  # batched or sequential: the same gradients, different memory
    prompts: str | None = None  # --cat_prompts: a file of trigger-free prompts the CAT term also preserves
    prompts_per_step: int = 1  # K, drawn for each batch
    prompts_weight: float = 1.0  # lambda, the weight of their mean term
    drift_budget: float | None = None  # X: alpha adapted so the running mean of the CAT term stays near it
    budget_rate: float = 0.05  # eta of the alpha update (library.cat.drift_budget)

    @property
    def enabled(self) -> bool:
        """Whether the CAT term is computed at all."""
        return self.weight > 0


@dataclass(frozen=True)
class DataArgs:
    """Where the images come from and how they are read, captioned, augmented and batched."""

    train_data_dir: str | None
    reg_data_dir: str | None
    dataset_config: str | None
    in_json: str | None  # fine-tune metadata for --train_data_dir (sd-scripts' older fine-tune method)
    dataset_repeats: int  # repeats of the --in_json images
    resolution: tuple[int, int] | None  # (width, height)
    caption_extension: str
    caption_separator: str
    shuffle_caption: bool
    keep_tokens: int
    keep_tokens_separator: str
    caption_prefix: str | None
    caption_suffix: str | None
    caption_dropout_rate: float
    caption_dropout_every_n_epochs: int
    caption_tag_dropout_rate: float
    enable_wildcard: bool  # {a|b} choices and one line of a multi-line caption file, drawn per step
    secondary_separator: str | None  # groups tags for shuffling/dropout; becomes caption_separator after
    token_warmup_min: int  # flexible tags kept at step 0 (token warmup)
    token_warmup_step: float  # all tags from this step on (below 1: that share of max_train_steps); 0: off
    flip_aug: bool
    color_aug: bool
    random_crop: bool
    face_crop_aug_range: tuple[float, float] | None  # (low, high) face-centred crops (library.data.face_crop)
    resize_interpolation: str | None  # how images are resized to their bucket; None: Lanczos
    enable_bucket: bool
    min_bucket_reso: int
    max_bucket_reso: int
    bucket_reso_steps: int
    bucket_no_upscale: bool
    bucket_reso_multiple: int  # the family's rule for bucket_reso_steps (not a flag: TrainingScript's)
    alpha_mask: bool
    train_batch_size: int
    max_data_loader_n_workers: int
    persistent_data_loader_workers: bool
    cache_latents: bool
    cache_latents_to_disk: bool
    cache_text_encoder_outputs: bool  # SDXL: encoders' outputs computed once (library.training.text_cache)
    cache_text_encoder_outputs_to_disk: bool  # ... and kept beside the images (implies the above)
    vae_batch_size: int
    validation_split: float = 0.0  # the share of each dataset's images held out (library.data.validation_split)
    validation_seed: int | None = None  # the split's shuffle and the validation noise; None: --seed
    masked_loss: bool = False  # subsets may give loss masks in a conditioning_data_dir (library.data.loss_masks)
    cache_info: bool = False  # image sizes kept in each folder's metadata_cache.json (library.data.info_cache)
    text_encoder_batch_size: int | None = None  # captions per call when caching text states; None: the batch size


@dataclass(frozen=True)
class RunArgs:
    """How long and how the loop runs."""

    max_train_steps: int
    max_train_epochs: int | None  # overrides max_train_steps when given
    seed: int | None  # None: the trainer draws one and records it
    gradient_accumulation_steps: int
    gradient_checkpointing: bool
    mixed_precision: str  # no, fp16, bf16
    full_fp16: bool
    full_bf16: bool
    # Where the step count starts without a saved state (sd-scripts' options; library.training.start_position)
    initial_step: int | None = None  # steps already done, 0 = the first
    initial_epoch: int | None = None  # the epoch to start in, 1 = the first; --initial_step wins
    skip_until_initial_step: bool = False  # also skip the batches of those steps (else start at their epoch's start)
    ddp_timeout: int | None = None  # minutes processes wait for each other; None: accelerate's default
    ddp_gradient_as_bucket_view: bool = False  # accepted, no effect: no DDP wrapper (library.training.grad_sync)
    ddp_static_graph: bool = False  # accepted, no effect, likewise


@dataclass(frozen=True)
class SaveArgs:
    """What is written, where and when."""

    output_dir: str
    output_name: str | None  # None: sd-scripts' names ("last", "epoch", "at")
    save_model_as: str  # always "safetensors"
    save_precision: str | None  # float, fp16, bf16; None: the training dtype
    save_every_n_epochs: int | None
    save_every_n_steps: int | None
    save_n_epoch_ratio: int | None
    save_last_n_epochs: int | None
    save_last_n_steps: int | None
    save_state: bool
    save_state_on_train_end: bool
    save_last_n_epochs_state: int | None
    save_last_n_steps_state: int | None
    resume: str | None
    no_metadata: bool


@dataclass(frozen=True)
class MetadataArgs:
    """Text written into the LoRA file's metadata (`--metadata_*`, `--training_comment`)."""

    title: str | None  # None: the output name
    author: str | None
    description: str | None
    license: str | None
    tags: str | None  # comma-separated
    trigger_phrase: str | None
    training_comment: str | None
    usage_hint: str | None = None
    thumbnail: str | None = None  # a data URL, or an image file (written in as a data URL)
    merged_from: str | None = None
    preprocessor: str | None = None
    is_negative_embedding: str | None = None


@dataclass(frozen=True)
class LogArgs:
    """Training logs and console logging."""

    logging_dir: str | None
    log_with: str | None  # tensorboard, wandb, or all (accelerate's: every tracker installed)
    log_prefix: str | None
    log_tracker_name: str | None  # the project; None: sd-scripts' "network_train"
    log_tracker_config: str | None  # the TOML file that tracker_init_kwargs was read from
    tracker_init_kwargs: Mapping[str, Mapping[str, Any]]  # per tracker ("wandb": wandb.init's keywords)
    log_config: Mapping[str, Any] | None  # --log_config: the flags stored as the trackers' config; None without
    wandb_run_name: str | None
    wandb_api_key: str | None = field(repr=False)
    console_log_level: str | None
    console_log_file: str | None
    console_log_simple: bool


@dataclass(frozen=True)
class SampleDefaults:
    """What a sample prompt gets where it says nothing: sd-scripts' defaults, which differ by family."""

    steps: int = 30
    scale: float = 7.5  # classifier-free guidance (FLUX.1: its true CFG, off at 1.0)
    guidance: float | None = None  # FLUX.1-dev's guidance input (`--g`); None where the model has none
    size_multiple: int = 8  # sizes are rounded down to this (FLUX.1: 16)
    weights: bool = True  # prompts' (word:1.2) weights apply, as in sd-scripts' SD and SDXL samples (FLUX.1: text)


@dataclass(frozen=True)
class SampleArgs:
    """Sample images during training (`--sample_*`)."""

    prompts: str | None
    every_n_steps: int | None  # values <= 0 are read as None, as sd-scripts does
    every_n_epochs: int | None
    at_first: bool
    sampler: str
    cat_compare: bool  # each sample a strip: base | adapted without trigger | adapted with trigger
    defaults: SampleDefaults = field(default_factory=SampleDefaults)  # the script's


@dataclass(frozen=True)
class PreservationArgs:
    """The preservation signal during training (`--preservation_*`): drift on trigger-free prompts."""

    prompts: str | None  # a text file of trigger-free prompts, one per line
    every_n_steps: int | None  # given (>= 1) exactly when `prompts` is


@dataclass(frozen=True)
class ValidationArgs:
    """When the held-out images (--validation_split) are validated on, as in sd-scripts."""

    validate_every_n_steps: int | None = None  # None: not between epochs
    validate_every_n_epochs: int | None = None  # None: after every epoch
    max_validation_steps: int | None = None  # validation batches per round; None: all of them


@dataclass(frozen=True)
class TrainConfig:
    """Everything `train_network_cat.py` was asked to do, checked."""

    model: ModelArgs
    network: NetworkArgs
    optimizer: OptimizerArgs
    scheduler: SchedulerArgs
    noise: NoiseArgs
    loss: LossArgs
    cat: CATArgs
    data: DataArgs
    run: RunArgs
    save: SaveArgs
    metadata: MetadataArgs
    log: LogArgs
    sample: SampleArgs
    preservation: PreservationArgs
    config_file: Path | None  # the --config_file that was read, if any
    flow: FlowMatchArgs | None = None  # flow-matching families' scripts only (FLUX.1)
    validation: ValidationArgs = field(default_factory=ValidationArgs)
