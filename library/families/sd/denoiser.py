"""`SDDenoiser`: Stable Diffusion's text encoder and U-Net as CAT's objective calls them."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from library.families.prompt_tokens import merge_windows
from library.families.prompt_weights import WeightedTokens, apply_token_weights, split_weights


@dataclass
class SDDenoiser:
    """`encode(ids)` and `predict(z_t, t, states)` for an SD 1.x/2.x model (adapters act inside).

    `clip_skip` > 1 takes the hidden states of the clip_skip-th layer from the end and applies the
    final layer norm to them, as sd-scripts does (SD1 and SD2 alike).
    """

    unet: nn.Module
    text_encoder: nn.Module
    clip_skip: int | None = None

    def encode(self, input_ids: Tensor | WeightedTokens) -> Tensor:
        """Hidden states for (B, 77) ids, or for (B, n, 77) long-prompt windows (joined back); weighted
        ids (`--weighted_captions`) scale each token's states by its weight, after clip skip."""
        ids, weights = split_weights(input_ids)
        if ids.dim() == 3:
            states = merge_windows(self._encode(ids.flatten(0, 1)), ids.shape[0])
        else:
            states = self._encode(ids)
        return states if weights is None else apply_token_weights(states, weights)

    def _encode(self, input_ids: Tensor) -> Tensor:
        if not self.clip_skip or self.clip_skip <= 1:
            return self.text_encoder(input_ids).last_hidden_state
        output = self.text_encoder(input_ids, output_hidden_states=True)
        return self._final_layer_norm(output.hidden_states[-self.clip_skip])

    def predict(self, noisy_latents: Tensor, timesteps: Tensor, text_states: Tensor) -> Tensor:
        return self.unet(noisy_latents, timesteps, text_states).sample

    def _final_layer_norm(self, states: Tensor) -> Tensor:
        # transformers >= 5.6 flattened CLIPTextModel; older versions keep it under `text_model`.
        owner = getattr(self.text_encoder, "text_model", self.text_encoder)
        return owner.final_layer_norm(states)
