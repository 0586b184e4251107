"""`FluxDenoiser`: FLUX.1's two text encoders and transformer as CAT's objective calls them.

FLUX.1 (Black Forest Labs 2024; the architecture of Esser et al. 2024, "Scaling Rectified Flow
Transformers", arXiv 2403.03206, with double- and single-stream blocks) is conditioned on:
- T5-XXL's last hidden states, one per token (the text stream of the transformer);
- CLIP-L's pooled output of the whole prompt (added to the timestep embedding);
- FLUX.1-dev only: the guidance value it was distilled with (`--guidance_scale`, an input, not CFG).
The latents (B, 16, H/8, W/8) enter as 2x2 patches, (B, H/16 * W/16, 64), with rotary position ids
(0, row, column) per patch and zeros per text token; the transformer predicts the velocity
`noise - x0` in the same packed layout. The timestep is sigma in [0, 1]: our timesteps are 1000 *
sigma, as for the DDPM families (library.training.flow_matching), and are divided here.

With `--apply_t5_attn_mask` no token attends to T5's padding, in every block, as sd-scripts does;
without it the padding is attended to, as in BFL's reference code and diffusers' pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

CLIP_TOKENS = 77  # CLIP-L's context; FLUX's token ids are CLIP's 77 followed by T5's
T5_PAD_ID = 0


class FluxTextStates(NamedTuple):
    """What the text encoders give the transformer."""

    states: Tensor  # T5's last hidden states (B, L, 4096)
    pooled: Tensor  # CLIP-L's pooled output (B, 768)
    mask: Tensor | None  # (B, L) True for real T5 tokens, when padding is masked


def pack_latents(latents: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C): each 2x2 patch one token, channels major (diffusers' and BFL's order)."""
    b, c, h, w = latents.shape
    patches = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(packed: Tensor, height: int, width: int) -> Tensor:
    """The inverse of `pack_latents` for latents of `height` x `width`."""
    b, _, channels = packed.shape
    patches = packed.view(b, height // 2, width // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, channels // 4, height, width)


def image_ids(height: int, width: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """(H/2 * W/2, 3) rotary position ids of the packed patches: (0, row, column)."""
    rows = torch.arange(height // 2, device=device, dtype=dtype)
    columns = torch.arange(width // 2, device=device, dtype=dtype)
    ids = torch.zeros(height // 2, width // 2, 3, device=device, dtype=dtype)
    ids[..., 1] = rows[:, None]
    ids[..., 2] = columns[None, :]
    return ids.reshape(-1, 3)


@dataclass
class FluxDenoiser:
    """`encode(ids)` and `predict(z_t, t, text, guidance=...)` for a FLUX.1 model (adapters act inside).

    `ids` are CLIP's 77 token ids followed by T5's (B, 77 + L); `t` is 1000 * sigma. `guidance_scale`
    is what a FLUX.1-dev prediction is told when no `guidance` is passed (the run's --guidance_scale:
    probes and evaluation predict without the batch's conditioning).
    """

    transformer: nn.Module
    clip_l: nn.Module
    t5: nn.Module
    apply_t5_attn_mask: bool = False
    num_train_timesteps: int = 1000
    guidance_scale: float | None = None

    def encode(self, input_ids: Tensor) -> FluxTextStates:
        clip_ids, t5_ids = input_ids[:, :CLIP_TOKENS], input_ids[:, CLIP_TOKENS:]
        pooled = self.clip_l(clip_ids).pooler_output
        mask = t5_ids != T5_PAD_ID if self.apply_t5_attn_mask else None
        states = self.t5(t5_ids, attention_mask=mask).last_hidden_state
        return FluxTextStates(states, pooled, mask)

    def predict(self, noisy_latents: Tensor, timesteps: Tensor, text_states: FluxTextStates,
                guidance: Tensor | None = None) -> Tensor:
        """The velocity (B, 16, H, W); `guidance` (B,) is FLUX.1-dev's guidance input (ignored by schnell)."""
        height, width = noisy_latents.shape[-2:]
        dtype, device = noisy_latents.dtype, noisy_latents.device
        states = text_states.states.to(dtype)
        extra = {}
        if text_states.mask is not None:
            extra["joint_attention_kwargs"] = {"attention_mask": _joint_mask(text_states.mask, height, width)}
        if getattr(self.transformer.config, "guidance_embeds", False):
            extra["guidance"] = _guidance(guidance, self.guidance_scale, noisy_latents)
        output = self.transformer(
            hidden_states=pack_latents(noisy_latents), encoder_hidden_states=states,
            pooled_projections=text_states.pooled.to(dtype), timestep=timesteps.to(dtype) / self.num_train_timesteps,
            img_ids=image_ids(height, width, device, dtype),
            txt_ids=torch.zeros(states.shape[1], 3, device=device, dtype=dtype), **extra,
        ).sample
        return unpack_latents(output, height, width)


def _joint_mask(text_mask: Tensor, height: int, width: int) -> Tensor:
    """(B, 1, 1, L + patches): attention may read real text tokens and every image patch (text comes first)."""
    patches = torch.ones(text_mask.shape[0], (height // 2) * (width // 2), dtype=torch.bool, device=text_mask.device)
    return torch.cat([text_mask.bool(), patches], dim=1)[:, None, None, :]


def _guidance(guidance: Tensor | None, default: float | None, latents: Tensor) -> Tensor:
    if guidance is None and default is None:
        raise ValueError("this FLUX model embeds a guidance value (FLUX.1-dev): pass `guidance` (B,) to predict")
    if guidance is None:
        guidance = torch.tensor([float(default)])
    return guidance.to(latents.device, torch.float32).expand(latents.shape[0])
