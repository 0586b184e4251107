"""The CAT objective, in one place (Park et al. 2024, "CAT: Contrastive Adapter Training for
Personalized Image Generation", arXiv 2404.07554, Eq. 3):

    L = w * [ loss(target, eps_adapted(z_t, t, y_T))
              + alpha * || eps_base(z_t, t, y) - eps_adapted(z_t, t, y) ||^2 ]

- `y_T` is the training caption (with the trigger), `y` the same caption without it;
- `eps_base` is the model with every adapter off, U-Net and text encoder, computed under
  `torch.no_grad()` and detached: a target, not a path for gradients;
- all three predictions share z_t, t, the noise and the image conditioning (SDXL's size and crop
  numbers); the text conditioning is whatever the model's encoders return; `w` is the per-sample loss weight
  (prior-loss weight, min-SNR, ...) and multiplies the whole per-sample loss, CAT term included;
- the CAT term compares two predictions, so it is the same for epsilon and v targets; it is the
  paper's squared error whatever `--loss_type` the main term uses;
- `--cat_prompts` (ours, not the paper's): the CAT term also covers K prompts p_k drawn from a file,
  each at the same z_t and t, with weight `lambda` (`--cat_prompts_weight`):
      alpha * [ ||eps_base(z_t, t, y) - eps_adapted(z_t, t, y)||^2
                + lambda * mean_k ||eps_base(z_t, t, p_k) - eps_adapted(z_t, t, p_k)||^2 ];
  without prompts the step is exactly the paper's;
- `loss` is the `loss_fn` built with the batch: with a loss mask (`--masked_loss`, `--alpha_mask`) it
  weighs the main term's pixels by it, and only the main term's: the mask says what to learn, not
  what to preserve, so the CAT term stays over the whole image.

The reference pass runs first and the multiplier is restored before any pass that is
back-propagated: under gradient checkpointing the recomputation reads the multiplier of the
moment, so no back-propagated pass may ever run with the adapters off.

Two ways to run the same objective (identical gradients):
- `batched`: both adapted passes as one U-Net call on 2B samples (fast, holds 2B activations);
- `sequential`: back-propagate the main term, then compute the CAT term and back-propagate it,
  accumulating gradients; peak memory stays at plain LoRA's level.
With `alpha == 0` it is exactly plain LoRA training: no reference pass, no second adapted pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol

import torch
from torch import Tensor

from library.cat.network_protocol import multiplier_set_to

CAT_MODES = ("batched", "sequential")

LossFn = Callable[[Tensor, Tensor], Tensor]
"""(prediction, target) -> per-sample loss of shape (B,): the main term's (any loss mask inside it)."""

Backward = Callable[[Tensor, bool], None]
"""(loss, is_last_backward_of_this_batch) -> None: back-propagate `loss` into the adapters' gradients
(the trainer scales it for accumulation; gradients are averaged across processes later, once per
optimizer step, so the flag is information for callers that want it)."""


class Denoiser(Protocol):
    """The model as the objective sees it; adapters, if applied, act inside these calls."""

    def encode(self, input_ids: Tensor) -> Any:
        """The text conditioning for token ids (batch first): hidden states (clip skip applied), and
        for SDXL the pooled embedding with them."""

    def predict(self, noisy_latents: Tensor, timesteps: Tensor, text_states: Any, **conditioning: Tensor) -> Tensor:
        """The U-Net's prediction (epsilon or v); `conditioning` is the family's per-sample image
        conditioning (none for SD 1.x/2.x, `time_ids` for SDXL)."""


@dataclass(frozen=True)
class CATBatch:
    """One batch, already noised: everything the three predictions share, and both captions."""

    noisy_latents: Tensor  # z_t
    timesteps: Tensor  # t
    target: Tensor  # eps, or v for v-parameterization
    trigger_ids: Tensor  # tokens of y_T, the caption trained on
    free_ids: Tensor  # tokens of y, the same caption without the trigger
    weights: Tensor  # per-sample loss weights, shape (B,)
    conditioning: Mapping[str, Tensor] = field(default_factory=dict)  # image conditioning, batch first
    prompt_ids: tuple[Tensor, ...] = ()  # --cat_prompts: tokens of each p_k, one row per sample
    prompt_weight: float = 1.0  # lambda, the weight of the prompts' mean term


@dataclass(frozen=True)
class StepLosses:
    """Batch means for logging (`loss/main`, `loss/cat`, `loss/total`, `loss/cat_prompts`), detached:
    `cat` is the caption's CAT term, `prompts` the prompts' mean term (None without --cat_prompts), and
    `preservation` what alpha multiplies (`cat`, plus lambda times `prompts`)."""

    main: Tensor
    cat: Tensor
    total: Tensor
    preservation: Tensor
    prompts: Tensor | None = None


def cat_step(
    denoiser: Denoiser, network: Any, batch: CATBatch, alpha: float, mode: str, loss_fn: LossFn, backward: Backward
) -> StepLosses:
    """Compute the CAT loss of `batch` and back-propagate it (gradients accumulate in the adapters)."""
    if alpha == 0.0:
        return _plain_step(denoiser, batch, loss_fn, backward)
    reference = base_prediction(denoiser, network, batch)
    references = [base_prediction(denoiser, network, batch, ids) for ids in batch.prompt_ids]
    if mode == "batched":
        return _batched_step(denoiser, batch, reference, references, alpha, loss_fn, backward)
    if mode == "sequential":
        return _sequential_step(denoiser, batch, reference, references, alpha, loss_fn, backward)
    raise ValueError(f"unknown CAT mode {mode!r}; expected one of {', '.join(CAT_MODES)}")


def held_out_losses(denoiser: Denoiser, network: Any, batch: CATBatch, alpha: float, loss_fn: LossFn) -> StepLosses:
    """The same two terms on images not trained on (validation), without back-propagating: the main
    term on y_T and, when `alpha` > 0, the CAT term on y against the base model (the held-out
    counterpart of the training drift). The caller runs it without gradients."""
    prediction = denoiser.predict(
        batch.noisy_latents, batch.timesteps, denoiser.encode(batch.trigger_ids), **batch.conditioning
    )
    main = _weighted_mean(loss_fn(prediction, batch.target), batch.weights)
    if alpha == 0.0:
        return StepLosses(main, torch.zeros_like(main), main, torch.zeros_like(main))
    reference = base_prediction(denoiser, network, batch)
    on_free = denoiser.predict(batch.noisy_latents, batch.timesteps, denoiser.encode(batch.free_ids), **batch.conditioning)
    cat = _weighted_mean(preservation_loss(on_free, reference), batch.weights)
    return StepLosses(main, cat, main + alpha * cat, cat)


def base_prediction(denoiser: Denoiser, network: Any, batch: CATBatch, ids: Tensor | None = None) -> Tensor:
    """eps_base(z_t, t, y) (or on the prompt `ids`): every adapter off (U-Net and text encoder), no
    gradients, detached."""
    with torch.no_grad(), multiplier_set_to(network, 0.0):
        text_states = denoiser.encode(batch.free_ids if ids is None else ids)
        return denoiser.predict(batch.noisy_latents, batch.timesteps, text_states, **batch.conditioning).detach()


def preservation_loss(adapted: Tensor, reference: Tensor) -> Tensor:
    """Per-sample `|| eps_base - eps_adapted ||^2` (mean over non-batch dims), in float32."""
    return (adapted.float() - reference.float()).square().mean(dim=tuple(range(1, adapted.dim())))


def _repeated(tensor: Tensor, times: int) -> Tensor:
    """The batch `times` times over (the adapted passes of `batched` mode share z_t, t and the image)."""
    return torch.cat([tensor] * times)


def _weighted_mean(per_sample: Tensor, weights: Tensor) -> Tensor:
    return (per_sample * weights).mean()


def _plain_step(denoiser: Denoiser, batch: CATBatch, loss_fn: LossFn, backward: Backward) -> StepLosses:
    prediction = denoiser.predict(
        batch.noisy_latents, batch.timesteps, denoiser.encode(batch.trigger_ids), **batch.conditioning
    )
    main = _weighted_mean(loss_fn(prediction, batch.target), batch.weights)
    backward(main, True)
    zero = torch.zeros_like(main.detach())
    return StepLosses(main.detach(), zero, main.detach(), zero)


def _batched_step(
    denoiser: Denoiser, batch: CATBatch, reference: Tensor, references: list[Tensor], alpha: float,
    loss_fn: LossFn, backward: Backward,
) -> StepLosses:
    passes = 2 + len(batch.prompt_ids)
    text_states = denoiser.encode(torch.cat([batch.trigger_ids, batch.free_ids, *batch.prompt_ids]))
    predictions = denoiser.predict(
        _repeated(batch.noisy_latents, passes), _repeated(batch.timesteps, passes), text_states,
        **{name: _repeated(value, passes) for name, value in batch.conditioning.items()},
    )
    on_trigger, on_free, *on_prompts = predictions.chunk(passes)
    main = _weighted_mean(loss_fn(on_trigger, batch.target), batch.weights)
    cat = _weighted_mean(preservation_loss(on_free, reference), batch.weights)
    prompts = _prompts_term(on_prompts, references, batch.weights)
    backward(main + alpha * _preservation(cat, prompts, batch.prompt_weight), True)
    return _losses(main, cat, prompts, alpha, batch.prompt_weight)


def _sequential_step(
    denoiser: Denoiser, batch: CATBatch, reference: Tensor, references: list[Tensor], alpha: float,
    loss_fn: LossFn, backward: Backward,
) -> StepLosses:
    # Main term first; its activations are freed by its backward before the CAT pass allocates.
    on_trigger = denoiser.predict(
        batch.noisy_latents, batch.timesteps, denoiser.encode(batch.trigger_ids), **batch.conditioning
    )
    main = _weighted_mean(loss_fn(on_trigger, batch.target), batch.weights)
    backward(main, False)
    del on_trigger
    on_free = denoiser.predict(batch.noisy_latents, batch.timesteps, denoiser.encode(batch.free_ids), **batch.conditioning)
    cat = _weighted_mean(preservation_loss(on_free, reference), batch.weights)
    backward(alpha * cat, not batch.prompt_ids)
    del on_free
    terms = []
    for index, (ids, prompt_reference) in enumerate(zip(batch.prompt_ids, references)):
        # One prompt at a time, each back-propagated before the next: memory stays at plain LoRA's.
        on_prompt = denoiser.predict(batch.noisy_latents, batch.timesteps, denoiser.encode(ids), **batch.conditioning)
        term = _weighted_mean(preservation_loss(on_prompt, prompt_reference), batch.weights)
        backward(alpha * batch.prompt_weight / len(references) * term, index == len(references) - 1)
        terms.append(term.detach())
        del on_prompt
    prompts = torch.stack(terms).mean() if terms else None
    return _losses(main.detach(), cat.detach(), prompts, alpha, batch.prompt_weight)


def _prompts_term(on_prompts: list[Tensor], references: list[Tensor], weights: Tensor) -> Tensor | None:
    """mean_k of the weighted CAT term on prompt k; None without prompts."""
    if not on_prompts:
        return None
    return torch.stack([_weighted_mean(preservation_loss(on, ref), weights)
                        for on, ref in zip(on_prompts, references)]).mean()


def _losses(main: Tensor, cat: Tensor, prompts: Tensor | None, alpha: float, prompt_weight: float) -> StepLosses:
    """The detached losses of a step: total = main + alpha * (cat [+ lambda * prompts])."""
    main, cat = main.detach(), cat.detach()
    prompts = None if prompts is None else prompts.detach()
    preservation = _preservation(cat, prompts, prompt_weight)
    return StepLosses(main, cat, main + alpha * preservation, preservation, prompts)


def _preservation(cat: Tensor, prompts: Tensor | None, prompt_weight: float) -> Tensor:
    """What alpha multiplies: the caption's CAT term, plus lambda times the prompts' mean term."""
    return cat if prompts is None else cat + prompt_weight * prompts
