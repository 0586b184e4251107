"""The training run: set up, then the loop (batch, CAT step, optimizer step, log, save, stop).

`train(config)` is what `train_network_cat.py` runs after parsing. The CAT objective itself is in
`library.cat.objective`; this file feeds it batches and turns its gradients into a LoRA file.
"""

from __future__ import annotations

import logging
import math
import os
import random
import shutil
from collections import deque
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path

import torch
from torch.nn.utils import get_total_norm
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import InitProcessGroupKwargs, broadcast_object_list, gather_object, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from library.errors import UserInputError
from library.training.caption_tokens import CaptionTokens
from library.training.grad_sync import average_gradients
from library.data.image_loading import Augmentation, load_image
from library.data.latents import LatentCache, LatentKey, encode, key_for, sample_latents
from library.data.loss_masks import alpha_mask, batch_loss_mask
from library.training.lr_schedulers import build_lr_scheduler, current_learning_rates
from library.training.fp8_weights import store_in_fp8
from library.training.noise import check_snr_weighting_flags
from library.training.network_setup import DTYPES, build_network, optimizer_groups
from library.training.optimizers import build_optimizer
from library.training.output_files import (
    check_writable, epoch_name, epoch_to_remove, final_name, interrupted_name, state_folder_name, step_name,
    step_to_remove,
)
from library.cat.objective import Denoiser, cat_step
from library.families.family import ModelFamily, ModelLoader, compute_dtype
from library.sampling.drift_probe import PreservationDrift
from library.sampling.sample_images import SampleImages, scheduled_sample_prompts
from library.sampling.side_trip import SideTrip
from library.sampling.sample_prompts import SamplePrompt
from library.training.train_batch import Noising, image_geometry, noising_for
from library.data.batch_loader import EpochBatches, EpochSampler, LoadedBatch, batch_loader
from library.data.run_data import free_caption, load_training_data, training_caption, trigger_free_prompt
from library.data.training_data import TrainingData
from library.config.train_config import TrainConfig
from library.training.train_metadata import RunFacts, at_save, training_metadata
from library.training.text_cache import CachedTextDenoiser, TextEncoderCache, build_text_cache
from library.training.trackers import log_folder, log_values, start_trackers
from library.training.train_state import Progress, load_state, random_streams, read_progress, save_state
from library.training.validation import Validation
from library.training.initial_step import starting_progress
from library.training.cat_prompts import CatPrompts, read_cat_prompts
from library.cat.drift_budget import DriftBudget

logger = logging.getLogger(__name__)

SAVE_DTYPES = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass(frozen=True)
class Run:
    """Everything the loop needs, built once by `setup`."""

    config: TrainConfig
    accelerator: Accelerator
    models: ModelFamily
    network: torch.nn.Module
    trainable: list[torch.nn.Parameter]  # network.get_trainable_params(), the same list all run long
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    lr_descriptions: list[str]
    noising: Noising
    data: TrainingData
    facts: RunFacts
    metadata: dict[str, str]
    output_dir: Path
    output_name: str | None
    save_dtype: torch.dtype | None
    latent_cache: LatentCache | None  # --cache_latents / --cache_latents_to_disk; None: encoded each step
    batches: EpochBatches  # this process's batches of each epoch
    loader: DataLoader  # reads them (images decoded and augmented in its workers)
    sampler: EpochSampler  # points the loader at an epoch
    generator: torch.Generator
    tokens: CaptionTokens  # the family's tokenizer, each distinct caption tokenized once
    latent_dtype: torch.dtype  # the U-Net's, which the latents are cast to
    vae_dtype: torch.dtype  # (diffusers finds a model's dtype by walking its parameters: looked up once)
    sample_prompts: tuple[SamplePrompt, ...] = ()  # --sample_prompts, read at start
    text_cache: TextEncoderCache | None = None  # --cache_text_encoder_outputs; None: encoded each step
    cat_prompts: CatPrompts | None = None  # --cat_prompts: more prompts the CAT term preserves
    budget: DriftBudget | None = None  # --cat_drift_budget: alpha adapted to it; None: --cat_weight all run long

    @property
    def alpha(self) -> float:
        """The CAT weight of the next step."""
        return self.budget.alpha if self.budget is not None else self.config.cat.weight

    @property
    def resolution(self) -> tuple[int, int]:
        """The first dataset's resolution (each dataset has its own)."""
        return self.data.datasets[0].spec.buckets.resolution

    def side_trip(self) -> SideTrip:
        """What sample images and the drift probe use of this run."""
        return SideTrip(models=self.models, network=self.network, accelerator=self.accelerator,
                        generator=self.generator, clip_skip=self.config.model.clip_skip,
                        max_token_length=self.config.model.max_token_length)


def train(config: TrainConfig, load_models: ModelLoader) -> list[Path]:
    """Run the whole training of the model `load_models` loads (its family's `load`); returns the LoRA
    files written (last one = final)."""
    run = setup(config, load_models)
    return training_loop(run)


# --- setup ------------------------------------------------------------------------------------------


def setup(config: TrainConfig, load_models: ModelLoader) -> Run:
    output_dir = check_writable(config.save.output_dir)
    output_name, cat = config.save.output_name, config.cat
    sample_prompts = scheduled_sample_prompts(config.sample)  # a bad prompt file stops the run before any model loads
    accelerator = _accelerator(config)
    seed = _seed(config, accelerator)
    set_seed(seed)

    check_snr_weighting_flags(
        v_prediction=config.model.v_parameterization,
        scale_v_pred_loss_like_noise_pred=config.loss.scale_v_pred_loss_like_noise_pred,
        v_pred_like_loss=config.loss.v_pred_like_loss,
    )
    data = load_training_data(config, seed)
    models = load_models(config.model)
    weight_dtype = DTYPES[config.run.mixed_precision]
    _prepare_models(config, models, accelerator, weight_dtype)
    network = build_network(config, models, accelerator.device)
    _checkpoint_text_encoders(config, models, network)

    cached = config.data.cache_latents or config.data.cache_latents_to_disk
    batches = EpochBatches(data, seed, accelerator.num_processes, accelerator.process_index, load_pixels=not cached)
    steps_per_epoch, max_steps = _run_length(config, data, batches, accelerator.num_processes)
    groups, descriptions = optimizer_groups(network, config)
    optimizer, optimizer_name = build_optimizer(
        groups, config.optimizer.optimizer_type, config.optimizer.learning_rate, config.optimizer.optimizer_args
    )
    lr_scheduler = _lr_scheduler(config, optimizer, max_steps)
    # The network itself is not prepared (no DDP wrapper): see library.training.grad_sync.
    optimizer = accelerator.prepare(optimizer)

    facts = RunFacts(
        model_version=models.model_version, architecture=models.modelspec_architecture, seed=seed,
        num_batches_per_epoch=steps_per_epoch, max_train_steps=max_steps,
        num_epochs=math.ceil(max_steps / steps_per_epoch), optimizer_name=optimizer_name, data=data,
    )
    loader, sampler = batch_loader(batches, config.data.max_data_loader_n_workers,
                                   config.data.persistent_data_loader_workers)
    # --weighted_captions: the ids carry each token's weight, which the family's encode applies.
    tokens = CaptionTokens(lambda texts: models.tokenize(texts, config.model.max_token_length,
                                                         weighted=config.model.weighted_captions))
    return Run(
        config=config, accelerator=accelerator, models=models, network=network,
        trainable=network.get_trainable_params(), optimizer=optimizer,
        lr_scheduler=lr_scheduler, lr_descriptions=descriptions,
        noising=noising_for(models.noise_scheduler, config.noise, config.flow), data=data, facts=facts,
        metadata=training_metadata(config, facts, output_name or "last"), output_dir=output_dir,
        output_name=output_name, save_dtype=SAVE_DTYPES.get(config.save.save_precision) if config.save.save_precision else None,
        latent_cache=_cache_latents(config, data, models, accelerator), batches=batches, loader=loader,
        sampler=sampler, generator=torch.Generator().manual_seed(process_seed(seed, accelerator.process_index)),
        tokens=tokens, latent_dtype=compute_dtype(models.unet), vae_dtype=models.vae.dtype,
        sample_prompts=sample_prompts, text_cache=_cache_text(config, data, models, tokens, accelerator),
        cat_prompts=_cat_prompts(config, data),
        budget=DriftBudget(cat.drift_budget, cat.budget_rate, cat.weight) if cat.drift_budget is not None else None,
    )


def _cat_prompts(config: TrainConfig, data: TrainingData) -> CatPrompts | None:
    """--cat_prompts, checked against every trigger of the run (--cat_trigger and the subsets' own)."""
    if not config.cat.prompts:
        return None
    triggers = {*config.cat.triggers, *(t for subset in data.subsets for t in subset.cat_triggers)}
    return CatPrompts(config.cat.prompts, config.cat.prompts_per_step, sorted(triggers))


def process_seed(seed: int, process_index: int) -> int:
    """The seed of a process's own generator (noise, timesteps): the run seed on the main process, so
    one process trains as it always did, and a different one on each other process, which would
    otherwise noise its different images with the same draws."""
    return seed if process_index == 0 else (seed + process_index * 0x9E3779B97F4A7C15) % 2**64


def _accelerator(config: TrainConfig) -> Accelerator:
    # accelerate keeps its state per process; a second run in the same process (a GUI or a test
    # calling main() again) must not inherit the first one's precision or gradient settings.
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    run = config.run
    if run.ddp_gradient_as_bucket_view or run.ddp_static_graph:
        logger.info("--ddp_gradient_as_bucket_view / --ddp_static_graph tune DDP's wrapper, which this trainer does "
                    "not use (it averages the adapters' gradients itself): no effect.")
    accelerator = Accelerator(
        # Several processes on a machine without a GPU (torchrun): accelerate runs them as MULTI_CPU
        # (gloo) only when told to use the CPU; otherwise each would train alone.
        cpu=not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1,
        mixed_precision=run.mixed_precision,
        log_with=config.log.log_with,
        project_dir=log_folder(config.log),
        # --ddp_timeout: how long processes wait for each other (sd-scripts passes it the same way).
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(minutes=run.ddp_timeout))]
        if run.ddp_timeout else None,
    )
    if config.run.full_fp16 and accelerator.scaler is not None:
        _allow_fp16_gradients(accelerator.scaler)
    return accelerator


def _run_length(config: TrainConfig, data: TrainingData, batches: EpochBatches, processes: int) -> tuple[int, int]:
    """(optimizer steps per epoch, steps in the run) for this process's share of every epoch."""
    per_process = len(batches.batches(1))  # the same in every epoch
    if per_process == 0:
        raise UserInputError(
            f"{data.batches_per_epoch()} batches per epoch cannot be shared by {processes} processes; "
            "add images or repeats (the folder name's number), lower the batch size, or use fewer processes."
        )
    steps_per_epoch = math.ceil(per_process / config.run.gradient_accumulation_steps)
    max_steps = config.run.max_train_epochs * steps_per_epoch if config.run.max_train_epochs else config.run.max_train_steps
    return steps_per_epoch, max_steps


def _lr_scheduler(config: TrainConfig, optimizer, max_steps: int):
    schedule = config.scheduler
    return build_lr_scheduler(
        optimizer, schedule.lr_scheduler, num_training_steps=max_steps,
        warmup_steps=schedule.warmup_steps(max_steps), num_cycles=schedule.lr_scheduler_num_cycles,
        power=schedule.lr_scheduler_power, scheduler_args=dict(schedule.lr_scheduler_args),
        min_lr_ratio=schedule.lr_scheduler_min_lr_ratio, scheduler_type=schedule.lr_scheduler_type,
        decay_steps=schedule.decay_steps(max_steps), timescale=schedule.lr_scheduler_timescale,
        learning_rate=config.optimizer.learning_rate,
    )


def _allow_fp16_gradients(scaler) -> None:
    """--full_fp16 keeps the adapters in fp16, whose gradients torch's GradScaler refuses to unscale
    unless told it may (sd-scripts patches the scaler the same way). GPU only: on CPU there is no scaler."""
    unscale = scaler._unscale_grads_

    def unscale_allowing_fp16(optimizer, inv_scale, found_inf, allow_fp16):
        return unscale(optimizer, inv_scale, found_inf, True)

    scaler._unscale_grads_ = unscale_allowing_fp16


def _seed(config: TrainConfig, accelerator: Accelerator) -> int:
    """--seed; when resuming without one, the seed of the run being resumed; else a fresh one,
    drawn on the main process and shared, since the data order of every process depends on it."""
    if config.run.seed is not None:
        return config.run.seed
    if config.save.resume:
        return read_progress(Path(config.save.resume)).seed
    seed = [random.randint(0, 2**32 - 1)]
    if accelerator.num_processes > 1:
        broadcast_object_list(seed, from_process=0)
    return seed[0]


def _prepare_models(config: TrainConfig, models: ModelFamily, accelerator: Accelerator, weight_dtype) -> None:
    vae_dtype = torch.float32 if config.model.no_half_vae else weight_dtype
    for model, dtype in ((models.unet, weight_dtype), *((te, weight_dtype) for te in models.text_encoders),
                         (models.vae, vae_dtype)):
        model.to(accelerator.device)
        if model.dtype != dtype:  # diffusers warns on every .to(dtype=...), even a no-op one
            model.to(dtype=dtype)
    _store_base_in_fp8(config, models)
    _set_attention(config, models)
    if config.run.gradient_checkpointing:
        models.unet.enable_gradient_checkpointing()
        models.unet.train()  # diffusers and transformers checkpoint only in training mode


def _set_attention(config: TrainConfig, models: ModelFamily) -> None:
    """The U-Net's attention, by sd-scripts' precedence: --mem_eff_attn, then --xformers, then SDPA (ours
    by default, --sdpa or not). --mem_eff_attn asks for attention that never holds the whole attention
    matrix; sd-scripts gives it by a FlashAttention written in plain PyTorch. PyTorch's SDPA, diffusers'
    default processor, gives it by its memory-efficient and flash kernels, in less time: it is used."""
    if config.model.mem_eff_attn:
        ignored = " (it takes precedence over --xformers, as in sd-scripts)" if config.model.xformers else ""
        logger.info("--mem_eff_attn: PyTorch SDPA attention, whose memory-efficient kernels stand in for "
                    "sd-scripts' FlashAttention in plain PyTorch%s.", ignored)
        return
    if config.model.xformers:
        try:
            models.unet.enable_xformers_memory_efficient_attention()
        except Exception as error:  # not installed, or no GPU kernels on this machine
            logger.warning("--xformers unavailable here (%s); using PyTorch SDPA attention instead.", error)


def _store_base_in_fp8(config: TrainConfig, models: ModelFamily) -> None:
    """--fp8_base: the U-Net/transformer and the text encoders in fp8 (library.training.fp8_weights);
    --fp8_base_unet: the U-Net/transformer only, as sd-scripts splits them."""
    if not (config.model.fp8_base or config.model.fp8_base_unet):
        return
    parts = [models.unet] + ([] if config.model.fp8_base_unet else list(models.text_encoders))
    layers = sum(store_in_fp8(part) for part in parts)
    logger.info("--fp8_base: %d Linear/Conv2d layers store their weights in float8_e4m3fn", layers)


def _checkpoint_text_encoders(config: TrainConfig, models: ModelFamily, network) -> None:
    """--gradient_checkpointing for the text encoders that carry adapters. Only those: checkpointing
    makes transformers turn on gradients for its input embeddings, so a frozen one would be
    back-propagated through for nothing, and it needs training mode, which switches on a frozen
    encoder's dropout (T5's is 0.1: FLUX.1's T5 would encode every caption differently each step)."""
    if not config.run.gradient_checkpointing or config.network.train_unet_only:
        return
    for text_encoder in _adapted_text_encoders(models, network):
        # transformers 5 renamed it; the old name still works there but warns.
        enable = (getattr(text_encoder, "activation_checkpointing_enable", None)
                  or text_encoder.gradient_checkpointing_enable)
        enable()
        text_encoder.train()


def _adapted_text_encoders(models: ModelFamily, network) -> list[torch.nn.Module]:
    """The text encoders with a layer of the network's `text_encoder_loras` (the kohya contract's list);
    every text encoder for a network module without that list."""
    loras = getattr(network, "text_encoder_loras", None)
    if loras is None:
        return list(models.text_encoders)
    adapted = {id(module) for lora in loras for module in getattr(lora, "org_module", [])}
    return [te for te in models.text_encoders if any(id(module) in adapted for module in te.modules())]


# --- the loop ---------------------------------------------------------------------------------------


def training_loop(run: Run) -> list[Path]:
    config, accelerator = run.config, run.accelerator
    network = run.network
    denoiser = run.models.denoiser(config.model.clip_skip)
    if run.text_cache is not None:
        denoiser = CachedTextDenoiser(denoiser, run.text_cache, accelerator.device)
    start_trackers(accelerator, config.log)
    position = _start_progress(run, network)
    _print_summary(run, position)
    written: list[Path] = []
    step, epoch, accumulation = position.step, position.epoch, config.run.gradient_accumulation_steps
    recent: deque[float] = deque(maxlen=run.facts.num_batches_per_epoch)  # sd-scripts' LossRecorder window
    bar = tqdm(total=run.facts.max_train_steps, initial=step, desc="steps", disable=not accelerator.is_local_main_process)
    # Side trips that leave training exactly as it was: sample images and the drift on trigger-free prompts.
    side = run.side_trip()
    sample_images = SampleImages(
        side, config.sample, run.sample_prompts, folder=run.output_dir / "sample", output_name=run.output_name,
        run_seed=run.facts.seed, trigger_free=trigger_free_prompt(config, run.data),
    )
    drift = PreservationDrift(
        side, config.preservation, resolution=run.resolution, run_seed=run.facts.seed,
        noising=run.noising, log=bool(config.log.log_with),
    )
    validation = Validation(side, config, run.data.validation, run_seed=run.facts.seed, noising=run.noising,
                            tokens=run.tokens, steps_per_epoch=run.facts.num_batches_per_epoch,
                            latent_dtype=run.latent_dtype)
    sample_images.at_first(step)
    drift.measure(step, bar)  # before training: exactly 0 for a fresh LoRA (its up-projections start at zero)
    try:
        while step < run.facts.max_train_steps:
            network.on_epoch_start(run.models.network_text_encoder, run.models.unet)
            count = len(run.batches.batches(epoch))
            skip = position.batches_in_epoch if epoch == position.epoch else 0  # trained on before a --resume
            run.sampler.start(epoch, skip)
            finite, preserved = True, []
            for index, batch in enumerate(run.loader, start=skip):
                # Gradients accumulate over windows of `accumulation` batches; an epoch's last window
                # may be shorter, and each window's losses are averaged over its own size.
                window = min(accumulation, count - index // accumulation * accumulation)
                losses = _train_on(run, denoiser, batch, epoch, step, 1.0 / window)
                finite = finite and bool(torch.isfinite(losses.total))
                preserved.append(losses.preservation)
                if (index + 1) % accumulation and index + 1 < count:
                    continue
                # One optimizer step: average across processes, check, clip, step.
                average_gradients(run.trainable, accelerator.num_processes)
                _stop_if_diverged(finite, _clip_gradients(run), losses, run.accelerator.scaler)
                finite = True
                run.optimizer.step()  # with fp16's loss scaler: skipped if the scaled gradients overflowed
                run.optimizer.zero_grad(set_to_none=True)
                step += 1
                if run.optimizer.step_was_skipped:
                    # The scaler halved its scale; the lr schedule waits for a real update, as in sd-scripts.
                    logger.info("step %d: fp16 gradients overflowed at loss scale %g; update skipped, scale halved",
                                step, run.accelerator.scaler.get_scale() * 2)
                else:
                    run.lr_scheduler.step()
                norms = _scale_weight_norms(run, network)
                validation.record(_log(run, losses, step, epoch, bar, recent, norms))
                _follow_budget(run, preserved)
                preserved = []
                drift.after_step(step, bar)
                validation.after_step(step, epoch, bar)
                sample_images.after_step(step)
                position = Progress(step, epoch, index + 1, run.facts.seed, run.facts.max_train_steps)
                if config.save.save_every_n_steps and step % config.save.save_every_n_steps == 0:
                    written.append(_save(run, network, step_name(run.output_name, step), position))
                    _prune(run, step, config.save.save_every_n_steps, config.save.save_last_n_steps,
                           config.save.save_last_n_steps_state, step_to_remove, step_name)
                if step >= run.facts.max_train_steps:
                    sample_images.at_epoch_end(epoch, step)  # the last epoch ends here; sd-scripts samples it too
                    validation.at_epoch_end(epoch, step, bar)  # and validates it
                    _log_epoch(run, recent, step, epoch)
                    break
            else:
                epoch += 1
                _log_epoch(run, recent, step, epoch - 1)
                sample_images.at_epoch_end(epoch - 1, step)
                validation.at_epoch_end(epoch - 1, step, bar)
                position = Progress(step, epoch, 0, run.facts.seed, run.facts.max_train_steps)
                if config.save.save_every_n_epochs and (epoch - 1) % config.save.save_every_n_epochs == 0:
                    written.append(_save(run, network, epoch_name(run.output_name, epoch - 1), position))
                    _prune(run, epoch - 1, config.save.save_every_n_epochs, config.save.save_last_n_epochs,
                           config.save.save_last_n_epochs_state, epoch_to_remove, epoch_name)
    except KeyboardInterrupt:
        path = _save(run, network, interrupted_name(run.output_name, step), None)
        logger.warning("interrupted at step %d: saved %s", step, path)
        raise
    bar.close()
    written.append(_save(run, network, final_name(run.output_name), position, end=True))
    accelerator.end_training()
    _print_end(run, written)
    return written


def _stop_if_diverged(finite_loss: bool, grad_norm: torch.Tensor, losses, scaler) -> None:
    """Stop, before the optimizer step, on a NaN/inf loss, or, without a loss scaler, on a NaN/inf
    gradient norm (`_clip_gradients`). With fp16's scaler, overflowing gradients are its normal signal
    to skip the step and lower the scale: left to it. Gradients are already averaged, so every process
    decides the same."""
    grads_finite = scaler is not None or bool(torch.isfinite(grad_norm))
    if finite_loss and grads_finite:
        return
    raise TrainingDiverged(
        f"the loss became {losses.total.item()} (main {losses.main.item()}, cat {losses.cat.item()}); training "
        "stopped and the files already written were kept. Lower the learning rate or use --mixed_precision bf16."
        if not finite_loss else
        f"the gradients became NaN or infinite at a finite loss {losses.total.item()}; training stopped and the "
        "files already written were kept. Lower the learning rate or use --mixed_precision bf16."
    )


def _largest_gradient(trainable: list[torch.nn.Parameter]) -> torch.Tensor:
    """The largest |value| of the gradients: finite for finite values (no overflow, unlike a sum of
    squares), NaN or infinite when one is."""
    grads = [p.grad for p in trainable if p.grad is not None and p.grad.numel()]  # inf norm of empty: undefined
    return get_total_norm(grads, float("inf")) if grads else torch.zeros(())


def _start_progress(run: Run, network) -> Progress:
    """Step 0 of epoch 1, or where the `--resume` state left off; moved to --initial_step /
    --initial_epoch when given (library.training.initial_step)."""
    progress = _resumed_progress(run, network) if run.config.save.resume else \
        Progress(0, 1, 0, run.facts.seed, run.facts.max_train_steps)
    return starting_progress(run.config.run, run.facts.num_batches_per_epoch, progress)


def _resumed_progress(run: Run, network) -> Progress:
    """Where the `--resume` state left off, its network, optimizer, schedule and streams restored."""
    folder = Path(run.config.save.resume)
    saved = read_progress(folder)
    if saved.seed != run.facts.seed:
        raise UserInputError(
            f"--resume {folder} was saved by a run with seed {saved.seed}, this run has seed {run.facts.seed}; "
            f"pass --seed {saved.seed} to continue it (the data order and noise depend on it)."
        )
    accelerator = run.accelerator
    progress = load_state(folder, network, run.optimizer, run.lr_scheduler, run.generator, accelerator.scaler,
                          accelerator.process_index, accelerator.num_processes, budget=run.budget)
    logger.info("resumed from %s at step %d (epoch %d, batch %d)", folder, progress.step, progress.epoch,
                progress.batches_in_epoch)
    return progress


def _train_on(run: Run, denoiser: Denoiser, batch: LoadedBatch, epoch: int, step: int, loss_scale: float):
    """Forward and backward one batch at global `step` (optimizer steps done: the token warmup's clock);
    its gradients are added to the adapters' (scaled by `loss_scale`)."""
    config, accelerator = run.config, run.accelerator
    samples = batch.samples
    items = [sample.item for sample in samples]
    latents = _latents(run, batch)
    loss_mask = _loss_mask(run, batch)
    captions = [training_caption(run.facts.seed, sample, epoch, step, run.facts.max_train_steps) for sample in samples]
    trigger_ids = run.tokens(captions)
    # Plain LoRA (--cat_weight 0) never reads the trigger-free captions: not built, not tokenized.
    free_ids = run.tokens([free_caption(config, item, caption) for item, caption in zip(items, captions)]
                          ) if config.cat.enabled else trigger_ids
    weights = torch.tensor([config.loss.prior_loss_weight if item.is_reg else 1.0 for item in items])
    cat_batch, loss_fn = run.noising.batch(
        latents, trigger_ids, free_ids, weights, config.noise, config.loss, run.generator,
        conditioning=run.models.image_conditioning([image_geometry(s, a) for s, a in zip(samples, batch.augmentations)]),
        loss_mask=loss_mask,
    )
    if run.cat_prompts is not None:  # every sample also on each of the batch's K drawn prompts
        drawn = run.cat_prompts.draw(run.facts.seed, epoch, samples[0].position)
        cat_batch = replace(cat_batch, prompt_ids=tuple(run.tokens([p] * len(samples)).to(latents.device) for p in drawn),
                            prompt_weight=config.cat.prompts_weight)

    def backward(loss: torch.Tensor, last: bool) -> None:
        # Autocast is for the forward passes only; averaged across processes once, before the optimizer step.
        with torch.autocast(accelerator.device.type, enabled=False):
            accelerator.backward(loss * loss_scale)

    with accelerator.autocast():
        return cat_step(denoiser, run.network, cat_batch, run.alpha, config.cat.mode, loss_fn, backward)


def _latents(run: Run, batch: LoadedBatch) -> torch.Tensor:
    """The batch's scaled VAE latents: from the cache, or encoded now from the augmented images.
    Either way each latent's noise comes from its image's own seeded stream (see library.data.latents)."""
    keys = batch.latent_keys()
    if run.latent_cache is not None:
        dists = [run.latent_cache.get(key) for key in keys]
    else:
        # The whole batch in one VAE call, as sd-scripts' training loop does (--vae_batch_size is for caching).
        dists = encode(run.models.vae, batch.pixels, len(batch.pixels), run.vae_dtype)
    latents = run.models.latents_from_vae(sample_latents(keys, dists, run.facts.seed))
    return latents.to(run.accelerator.device, run.latent_dtype)


def _loss_mask(run: Run, batch: LoadedBatch) -> torch.Tensor | None:
    """The batch's loss masks (B, H, W) on the device, None when no sample has one: as the loader read
    them, with the alpha masks of cached latents from the cache (library.data.loss_masks)."""
    masks = batch.masks
    if run.latent_cache is not None:
        masks = [run.latent_cache.mask(key) if mask is None else mask for mask, key in zip(masks, batch.latent_keys())]
    mask = batch_loss_mask(masks, batch.samples[0].placement.bucket)
    return None if mask is None else mask.to(run.accelerator.device)


def _cache_latents(config: TrainConfig, data: TrainingData, models: ModelFamily,
                   accelerator: Accelerator) -> LatentCache | None:
    """--cache_latents / --cache_latents_to_disk: encode every image (and its flip where flip_aug is
    on) before training; None without either flag."""
    options = config.data
    if not (options.cache_latents or options.cache_latents_to_disk):
        return None
    keys = [
        key_for(item.path, dataset.placements[item.path], flip, subset.options.alpha_mask,
                subset.options.resize_interpolation)
        for dataset in data.datasets for subset in dataset.subsets for item in subset.items
        for flip in ((False, True) if subset.options.flip_aug else (False,))
    ]

    def pixels(key: LatentKey) -> torch.Tensor:
        return load_image(key.path, key.bucket, key.resized, Augmentation(flip=key.flip), key.interpolation)

    def mask(key: LatentKey) -> torch.Tensor:  # --alpha_mask: kept with the latents, as sd-scripts does
        return alpha_mask(key.path, key.bucket, key.resized, Augmentation(flip=key.flip), key.interpolation)

    cache = LatentCache(to_disk=options.cache_latents_to_disk)
    if not cache.to_disk:  # in memory: every process encodes its own copy, all at once
        cache.fill(keys, pixels, models.vae, options.vae_batch_size, load_mask=mask)
    else:  # the main process writes the files, then the others read them
        if accelerator.is_main_process:
            cache.fill(keys, pixels, models.vae, options.vae_batch_size, load_mask=mask)
        accelerator.wait_for_everyone()
        if not accelerator.is_main_process:
            cache.fill(keys, pixels, models.vae, options.vae_batch_size, write=False, load_mask=mask)
    return cache


def _cache_text(config: TrainConfig, data: TrainingData, models: ModelFamily, tokens: CaptionTokens,
                accelerator: Accelerator) -> TextEncoderCache | None:
    """--cache_text_encoder_outputs: every caption encoded once, under training's autocast; None without it.
    It tokenizes with the run's `tokens`, so training finds those captions' ids already made."""
    if not config.data.cache_text_encoder_outputs:
        return None
    cache = build_text_cache(config, data, models.denoiser(config.model.clip_skip), tokens, models.text_encoders,
                             accelerator.device, accelerator.autocast,
                             prompts=read_cat_prompts(config.cat.prompts) if config.cat.prompts else ())
    # Training no longer needs them on the device: sample images and the drift probe bring them back (SideTrip).
    for text_encoder in models.text_encoders:
        text_encoder.to("cpu")
    return cache


def _follow_budget(run: Run, preserved: list[torch.Tensor]) -> None:
    """--cat_drift_budget: move alpha by the optimizer step's CAT term (its batches' mean, averaged over
    the processes, so that every process holds the same alpha)."""
    if run.budget is None:
        return
    value = torch.stack(preserved).float().mean().to(run.accelerator.device)
    if run.accelerator.num_processes > 1:
        value = run.accelerator.reduce(value, reduction="mean")
    run.budget.update(value.item())


def _clip_gradients(run: Run) -> torch.Tensor:
    """Clip to --max_grad_norm; returns a norm of the gradients for the divergence check, computed once:
    the clipping's total norm (NaN or infinite when a gradient is; clipping then scales every gradient
    by NaN or 0, and the run stops before the optimizer step), or without clipping their largest |value|."""
    if not run.config.optimizer.max_grad_norm:
        return _largest_gradient(run.trainable)
    return run.accelerator.clip_grad_norm_(run.trainable, run.config.optimizer.max_grad_norm)


def _scale_weight_norms(run: Run, network) -> dict[str, float]:
    """--scale_weight_norms; sd-scripts' tags of what it did (none without the flag)."""
    if not run.config.network.scale_weight_norms:
        return {}
    scaled, mean, largest = network.apply_max_norm_regularization(run.config.network.scale_weight_norms,
                                                                  run.accelerator.device)
    return {"max_norm/keys_scaled": scaled, "max_norm/max_key_norm": largest, "norm/avg_key_norm": mean}


def _log(run: Run, losses, step: int, epoch: int, progress, recent: deque[float], norms: dict[str, float]) -> float:
    """Log the step's losses, learning rates and `norms` (`_scale_weight_norms`); returns the main term.
    `recent`: the total losses of the last epoch's worth of steps, this one added, for sd-scripts'
    `loss/average`."""
    # One transfer for the three numbers (each .item() is a CPU-GPU sync point).
    main, cat, total = torch.stack([losses.main, losses.cat, losses.total]).tolist()
    recent.append(total)
    # sd-scripts' tags (the loss it optimizes, and its running mean over an epoch), then ours by term.
    values = {"loss/current": total, "loss/average": sum(recent) / len(recent),
              "loss/main": main, "loss/cat": cat, "loss/total": total}
    if losses.prompts is not None:
        values["loss/cat_prompts"] = losses.prompts.item()
    if run.budget is not None:
        values["cat/alpha"] = run.budget.alpha  # the alpha this step trained with
    values.update(current_learning_rates(run.lr_scheduler, run.lr_descriptions))
    values.update(norms)
    progress.update(1)
    progress.set_postfix(loss=f"{values['loss/total']:.4f}", cat=f"{values['loss/cat']:.4f}")
    if run.config.log.log_with:
        log_values(run.accelerator, values, step=step, epoch=epoch)
    return main


def _log_epoch(run: Run, recent: deque[float], step: int, epoch: int) -> None:
    """sd-scripts' `loss/epoch_average` at the end of epoch `epoch` (counted from 1), at that epoch on
    TensorBoard's axis, as sd-scripts logs it."""
    if run.config.log.log_with and recent:
        log_values(run.accelerator, {"loss/epoch_average": sum(recent) / len(recent)}, step=step, epoch=epoch,
                   tensorboard_step=epoch)


def _save(run: Run, network, name: str, progress: Progress | None, end: bool = False) -> Path:
    """Write one LoRA file (and, with --save_state, the state to resume from at this point)."""
    path = run.output_dir / name
    save = run.config.save
    wants_state = progress is not None and (save.save_state or (end and save.save_state_on_train_end))
    # Every process takes part: each has its own noise stream, and the main process saves them all.
    streams = gather_object([random_streams(run.generator)]) if wants_state else None
    if run.accelerator.is_main_process:
        epoch, step = (progress.epoch, progress.step) if progress else (0, 0)
        metadata = None if save.no_metadata else at_save(run.metadata, epoch, step)
        network.save_weights(path, run.save_dtype, metadata)
        if wants_state:
            state = run.output_dir / state_folder_name(name)
            save_state(state, network, run.optimizer, run.lr_scheduler, streams, progress, run.accelerator.scaler,
                       budget=run.budget)
    run.accelerator.wait_for_everyone()
    return path


def _prune(run: Run, number: int, every: int, keep: int | None, keep_states: int | None, to_remove, namer) -> None:
    """Remove the file (and the state folder) that fell out of --save_last_n_* (sd-scripts' rule)."""
    if not run.accelerator.is_main_process:
        return
    old_file = to_remove(number, every, keep)
    if old_file is not None and (run.output_dir / namer(run.output_name, old_file)).exists():
        (run.output_dir / namer(run.output_name, old_file)).unlink()
        logger.info("removed %s (--save_last_n_*)", namer(run.output_name, old_file))
    old_state = to_remove(number, every, keep_states or keep)
    if old_state is not None:
        shutil.rmtree(run.output_dir / state_folder_name(namer(run.output_name, old_state)), ignore_errors=True)


def _print_summary(run: Run, progress: Progress) -> None:
    if not run.accelerator.is_main_process:
        return
    cat = run.config.cat
    resumed = f", starting after step {progress.step}" if progress.step else ""
    held_out = run.data.validation
    validation = f", {held_out.num_train_images} held out for validation" if held_out else ""
    print(
        f"training: {run.data.num_train_images} images (with repeats), {run.data.num_reg_images} regularisation{validation}, "
        f"{run.facts.num_batches_per_epoch} steps per epoch, {run.facts.max_train_steps} steps, seed {run.facts.seed}{resumed}\n"
        f"CAT: weight {cat.weight}, trigger {list(cat.triggers)}, caption '{cat.caption}', mode {cat.mode}"
        + ("" if cat.enabled else " (off: plain LoRA training)")
    )
    print(run.data.bucket_table())


def _print_end(run: Run, written: list[Path]) -> None:
    if run.accelerator.is_main_process:
        print("written:\n" + "\n".join(f"  {p}" for p in written if p.exists()))
