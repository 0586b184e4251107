"""`SDXLDenoiser`: SDXL's two text encoders and U-Net as CAT's objective calls them.

SDXL is conditioned on (Podell et al. 2023, "SDXL", arXiv 2307.01952, Sections 2.1-2.2):
- the penultimate hidden states of both text encoders, concatenated along the channels (768 + 1280);
- the second encoder's pooled, projected embedding of the whole prompt;
- six numbers per image, `time_ids`: original (height, width), crop (top, left), target (height, width).
Long prompts (sd-scripts' `--max_token_length 150|225`) are encoded window by window and joined as
for SD 1.x; the pooled embedding is the first window's, as sd-scripts takes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from library.families.prompt_tokens import merge_windows
from library.families.prompt_weights import WeightedTokens, apply_token_weights, split_weights


class SDXLTextStates(NamedTuple):
    """What the text encoders give the U-Net: per-token states (B, L, 2048) and the pooled embedding (B, 1280)."""

    states: Tensor
    pooled: Tensor


@dataclass
class SDXLDenoiser:
    """`encode(ids)` and `predict(z_t, t, text, time_ids=...)` for an SDXL model (adapters act inside).

    `ids` stacks both tokenizers' ids on dim 1: (B, 2, 77), or (B, 2, n, 77) for long prompts.
    """

    unet: nn.Module
    text_encoder_1: nn.Module
    text_encoder_2: nn.Module
    pixels_per_latent: int = 8

    def encode(self, input_ids: Tensor | WeightedTokens) -> SDXLTextStates:
        """Weighted ids (`--weighted_captions`) scale each encoder's per-token states by the token's
        weight; the pooled embedding is not weighted (as sd-scripts)."""
        ids, weights = split_weights(input_ids)
        ids_1, ids_2 = ids[:, 0], ids[:, 1]
        windows = ids_1.shape[1] if ids_1.dim() == 3 else 0
        if windows:
            ids_1, ids_2 = ids_1.flatten(0, 1), ids_2.flatten(0, 1)
        states_1 = self.text_encoder_1(ids_1, output_hidden_states=True).hidden_states[-2]
        output_2 = self.text_encoder_2(ids_2, output_hidden_states=True)
        states_2, pooled = output_2.hidden_states[-2], output_2.text_embeds
        if windows:
            batch = ids.shape[0]
            states_1, states_2 = merge_windows(states_1, batch), merge_windows(states_2, batch)
            pooled = pooled.reshape(batch, windows, -1)[:, 0]
        if weights is not None:
            states_1, states_2 = apply_token_weights(states_1, weights[:, 0]), apply_token_weights(states_2, weights[:, 1])
        return SDXLTextStates(torch.cat([states_1, states_2], dim=-1), pooled)

    def predict(self, noisy_latents: Tensor, timesteps: Tensor, text_states: SDXLTextStates,
                time_ids: Tensor | None = None) -> Tensor:
        """`time_ids` (B, 6); without them, an uncropped image of the latents' own size (what samplers use)."""
        if time_ids is None:
            time_ids = uncropped_time_ids(noisy_latents, self.pixels_per_latent)
        added = {"text_embeds": text_states.pooled, "time_ids": time_ids.to(noisy_latents.device)}
        return self.unet(noisy_latents, timesteps, text_states.states, added_cond_kwargs=added).sample


def uncropped_time_ids(latents: Tensor, pixels_per_latent: int) -> Tensor:
    """(B, 6) size/crop numbers of images as large as `latents` show, not cropped: (h, w, 0, 0, h, w)."""
    height, width = latents.shape[-2] * pixels_per_latent, latents.shape[-1] * pixels_per_latent
    row = torch.tensor([height, width, 0, 0, height, width], dtype=torch.float32)
    return row.expand(latents.shape[0], 6).to(latents.device)
