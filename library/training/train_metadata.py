"""The `ss_*` and `modelspec.*` metadata a trained LoRA carries, as sd-scripts writes it, plus CAT's keys.

UIs (A1111/Forge's LoRA tab, ComfyUI info nodes) show these; every value is a string.
"""

from __future__ import annotations

import base64
import json
import mimetypes
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from library.data.folder_dataset import Subset
from library.data.training_data import Dataset, TrainingData
from networks.lora_cat.metadata import modelspec_metadata, stringify_metadata
from library.config.train_config import TrainConfig


@dataclass
class RunFacts:
    """What is only known once the run is set up (and, for some keys, as it goes)."""

    model_version: str
    seed: int
    num_batches_per_epoch: int
    max_train_steps: int
    num_epochs: int
    optimizer_name: str
    data: TrainingData
    training_started_at: float = field(default_factory=time.time)
    architecture: str | None = None  # the family's modelspec architecture, where its version does not tell it


def training_metadata(config: TrainConfig, facts: RunFacts, output_name: str) -> dict[str, str]:
    """The metadata known at the start of training (`ss_steps`/`ss_epoch` are added at each save)."""
    resolution = facts.data.datasets[0].spec.buckets.resolution
    values: dict[str, object] = {
        "ss_session_id": int(facts.training_started_at * 1000) % 2**31,
        "ss_training_started_at": facts.training_started_at,
        "ss_output_name": output_name,
        "ss_learning_rate": config.optimizer.learning_rate,
        "ss_text_encoder_lr": config.optimizer.text_encoder_lr,
        "ss_unet_lr": config.optimizer.unet_lr,
        "ss_num_train_images": facts.data.num_train_images,
        "ss_num_reg_images": facts.data.num_reg_images,
        "ss_num_validation_images": facts.data.validation.num_train_images if facts.data.validation else 0,
        "ss_validation_seed": config.data.validation_seed,
        "ss_validation_split": config.data.validation_split,
        "ss_max_validation_steps": config.validation.max_validation_steps,
        "ss_validate_every_n_epochs": config.validation.validate_every_n_epochs,
        "ss_validate_every_n_steps": config.validation.validate_every_n_steps,
        "ss_num_batches_per_epoch": facts.num_batches_per_epoch,
        "ss_num_epochs": facts.num_epochs,
        "ss_gradient_checkpointing": config.run.gradient_checkpointing,
        "ss_gradient_accumulation_steps": config.run.gradient_accumulation_steps,
        "ss_max_train_steps": facts.max_train_steps,
        "ss_lr_warmup_steps": config.scheduler.lr_warmup_steps,
        "ss_lr_scheduler": config.scheduler.lr_scheduler,
        "ss_network_module": config.network.module,
        "ss_network_dim": config.network.dim,
        "ss_network_alpha": config.network.alpha,
        "ss_network_dropout": config.network.dropout,
        "ss_mixed_precision": config.run.mixed_precision,
        "ss_full_fp16": config.run.full_fp16,
        "ss_v2": config.model.v2,
        "ss_base_model_version": facts.model_version,
        "ss_clip_skip": config.model.clip_skip,
        "ss_max_token_length": config.model.max_token_length,
        "ss_cache_latents": config.data.cache_latents,
        "ss_seed": facts.seed,
        "ss_lowram": config.model.lowram,
        "ss_fp8_base": config.model.fp8_base,
        "ss_fp8_base_unet": config.model.fp8_base_unet,
        "ss_noise_offset": config.noise.noise_offset,
        "ss_multires_noise_iterations": config.noise.multires_noise_iterations,
        "ss_multires_noise_discount": config.noise.multires_noise_discount,
        "ss_adaptive_noise_scale": config.noise.adaptive_noise_scale,
        "ss_zero_terminal_snr": config.noise.zero_terminal_snr,
        "ss_training_comment": config.metadata.training_comment,
        "ss_sd_scripts_commit_hash": None,
        "ss_optimizer": facts.optimizer_name,
        "ss_max_grad_norm": config.optimizer.max_grad_norm,
        "ss_caption_dropout_rate": config.data.caption_dropout_rate,
        "ss_caption_dropout_every_n_epochs": config.data.caption_dropout_every_n_epochs,
        "ss_caption_tag_dropout_rate": config.data.caption_tag_dropout_rate,
        "ss_face_crop_aug_range": config.data.face_crop_aug_range,
        "ss_resize_interpolation": config.data.resize_interpolation,
        "ss_prior_loss_weight": config.loss.prior_loss_weight,
        "ss_min_snr_gamma": config.loss.min_snr_gamma,
        "ss_scale_weight_norms": config.network.scale_weight_norms,
        "ss_ip_noise_gamma": config.noise.ip_noise_gamma,
        "ss_debiased_estimation": config.loss.debiased_estimation_loss,
        "ss_loss_type": config.loss.loss_type,
        "ss_huber_schedule": config.loss.huber_schedule,
        "ss_huber_c": config.loss.huber_c,
        "ss_min_timestep": config.noise.min_timestep,
        "ss_max_timestep": config.noise.max_timestep,
        "ss_sd_model_name": Path(config.model.pretrained_model_name_or_path).name,
        "ss_vae_name": Path(config.model.vae).name if config.model.vae else None,
        "ss_network_args": json.dumps(dict(config.network.args)) if config.network.args else None,
        **_dataset_metadata(config, facts.data),
        "ss_cat_weight": config.cat.weight,
        "ss_cat_trigger": json.dumps(list(config.cat.triggers)),
        "ss_cat_caption": config.cat.caption,
        "ss_cat_class_word": config.cat.class_word,
        "ss_cat_mode": config.cat.mode,
        **_steering_metadata(config),
        **_flow_matching_metadata(config),
    }
    metadata = stringify_metadata(values)
    metadata.update(_modelspec(config, facts, output_name, resolution))
    return metadata


def _steering_metadata(config: TrainConfig) -> dict[str, object]:
    """--cat_prompts and --cat_drift_budget, when used (the starting alpha is ss_cat_weight)."""
    cat, values = config.cat, {}
    if cat.prompts:
        values.update(ss_cat_prompts=Path(cat.prompts).name, ss_cat_prompts_per_step=cat.prompts_per_step,
                      ss_cat_prompts_weight=cat.prompts_weight)
    if cat.drift_budget is not None:
        values.update(ss_cat_drift_budget=cat.drift_budget, ss_cat_budget_rate=cat.budget_rate)
    return values


def _flow_matching_metadata(config: TrainConfig) -> dict[str, object]:
    """The keys sd-scripts' flux_train_network.py adds (nothing for DDPM families)."""
    flow = config.flow
    if flow is None:
        return {}
    return {
        "ss_model_type": "flux",
        "ss_apply_t5_attn_mask": config.model.apply_t5_attn_mask,
        "ss_weighting_scheme": flow.weighting_scheme,
        "ss_logit_mean": flow.logit_mean,
        "ss_logit_std": flow.logit_std,
        "ss_mode_scale": flow.mode_scale,
        "ss_guidance_scale": config.model.guidance_scale,
        "ss_timestep_sampling": flow.timestep_sampling,
        "ss_sigmoid_scale": flow.sigmoid_scale,
        "ss_model_prediction_type": flow.model_prediction_type,
        "ss_discrete_flow_shift": flow.discrete_flow_shift,
    }


def at_save(metadata: Mapping[str, str], epoch: int, step: int) -> dict[str, str]:
    """The metadata of one saved file: the run's keys plus its epoch, step and save time."""
    return {**metadata, "ss_epoch": str(epoch), "ss_steps": str(step), "ss_training_finished_at": str(time.time())}


def _dataset_metadata(config: TrainConfig, data: TrainingData) -> dict[str, object]:
    """sd-scripts' dataset keys: `ss_datasets` with a dataset config, the flat `ss_*` keys without
    one; `ss_tag_frequency` in both cases."""
    frequency = {name: counts for d in data.datasets for name, counts in tag_frequency(list(d.subsets)).items()}
    if config.data.dataset_config:
        return {"ss_datasets": json.dumps([_dataset_entry(d) for d in data.datasets]),
                "ss_tag_frequency": json.dumps(frequency)}
    dataset = data.datasets[0]
    buckets = dataset.spec.buckets
    return {
        "ss_batch_size_per_device": dataset.spec.batch_size,
        "ss_resolution": f"({buckets.resolution[0]}, {buckets.resolution[1]})",
        "ss_enable_bucket": buckets.enable,
        "ss_min_bucket_reso": buckets.min_reso,
        "ss_max_bucket_reso": buckets.max_reso,
        "ss_bucket_no_upscale": buckets.no_upscale,
        "ss_keep_tokens": config.data.keep_tokens,
        "ss_shuffle_caption": config.data.shuffle_caption,
        "ss_flip_aug": config.data.flip_aug,
        "ss_color_aug": config.data.color_aug,
        "ss_random_crop": config.data.random_crop,
        "ss_dataset_dirs": json.dumps(_dataset_dirs(dataset.subsets, is_reg=False)),
        "ss_reg_dataset_dirs": json.dumps(_dataset_dirs(dataset.subsets, is_reg=True)),
        "ss_tag_frequency": json.dumps(frequency),
        "ss_bucket_info": json.dumps(dataset.bucket_info()),
    }


def _dataset_entry(dataset: Dataset) -> dict[str, object]:
    """One dataset of `ss_datasets`, with sd-scripts' keys."""
    buckets = dataset.spec.buckets
    dreambooth = all(s.metadata_file is None for s in dataset.subsets)
    return {
        "is_dreambooth": dreambooth,
        "batch_size_per_device": dataset.spec.batch_size,
        "num_train_images": dataset.num_train_images,
        "num_reg_images": dataset.num_reg_images,
        "resolution": list(buckets.resolution),
        "enable_bucket": buckets.enable,
        "min_bucket_reso": buckets.min_reso,
        "max_bucket_reso": buckets.max_reso,
        "tag_frequency": tag_frequency(list(dataset.subsets)),
        "bucket_info": dataset.bucket_info(),
        "subsets": [_subset_entry(s, dreambooth) for s in dataset.subsets],
    }


def _subset_entry(subset: Subset, dreambooth: bool) -> dict[str, object]:
    options, captions = subset.options, subset.options.captions
    entry: dict[str, object] = {
        "img_count": len(subset.items), "num_repeats": subset.repeats, "color_aug": options.color_aug,
        "flip_aug": options.flip_aug, "random_crop": options.random_crop, "shuffle_caption": captions.shuffle,
        "keep_tokens": captions.keep_tokens, "keep_tokens_separator": captions.keep_tokens_separator,
        "caption_prefix": captions.prefix or None, "caption_suffix": captions.suffix or None,
        "image_dir": subset.folder.name, "resize_interpolation": options.resize_interpolation,
    }
    if dreambooth:
        entry.update(class_tokens=subset.class_tokens or None, is_reg=subset.is_reg)
    else:
        entry["metadata_file"] = subset.name
    if subset.cat_triggers:
        entry["cat_trigger"] = list(subset.cat_triggers)
    return entry


def tag_frequency(subsets: list[Subset]) -> dict[str, dict[str, int]]:
    """`{folder name: {lowercased tag: count}}` over each subset's captions, as sd-scripts counts them
    (split on "," whatever the caption separator)."""
    frequency: dict[str, dict[str, int]] = {}
    for subset in subsets:
        counts: Counter[str] = Counter(frequency.get(subset.name, {}))
        for item in subset.items:
            counts.update(tag.strip().lower() for tag in item.caption.split(",") if tag.strip())
        frequency[subset.name] = dict(counts)
    return frequency


def _dataset_dirs(subsets: tuple[Subset, ...], is_reg: bool) -> dict[str, dict[str, int]]:
    return {
        s.name: {"n_repeats": s.repeats, "img_count": len(s.items)} for s in subsets if s.is_reg == is_reg
    }


def _modelspec(config: TrainConfig, facts: RunFacts, output_name: str, resolution: tuple[int, int]) -> dict[str, str]:
    trigger = config.metadata.trigger_phrase or (", ".join(config.cat.triggers) if config.cat.triggers else None)
    low, high = config.noise.timestep_range
    return modelspec_metadata(
        model_version=facts.model_version,
        architecture=facts.architecture,
        title=config.metadata.title or output_name,
        resolution=resolution,
        timestamp=facts.training_started_at,
        v_parameterization=config.model.v_parameterization,
        trigger_phrase=trigger,
        clip_skip=config.model.clip_skip,
        timestep_range=(low, high) if (config.noise.min_timestep or config.noise.max_timestep) else None,
        description=config.metadata.description,
        author=config.metadata.author,
        tags=config.metadata.tags,
        license=config.metadata.license,
        usage_hint=config.metadata.usage_hint,
        thumbnail=thumbnail_data_url(config.metadata.thumbnail),
        merged_from=config.metadata.merged_from,
        preprocessor=config.metadata.preprocessor,
        is_negative_embedding=config.metadata.is_negative_embedding,
    )


def thumbnail_data_url(thumbnail: str | None) -> str | None:
    """--metadata_thumbnail as sd-scripts writes it: a data URL as given, an image file as a data URL of
    its bytes (its type from its name); the file was checked at start (library.cli.checks)."""
    if thumbnail is None or thumbnail.startswith("data:"):
        return thumbnail
    kind = mimetypes.guess_type(thumbnail)[0] or "application/octet-stream"
    return f"data:{kind};base64,{base64.b64encode(Path(thumbnail).read_bytes()).decode('ascii')}"
