"""The pure math of a LoRA adapter (Hu et al. 2021, "LoRA: Low-Rank Adaptation", arXiv 2106.09685).

An adapted layer computes `W x + m * s * up(down(x))` with `s = alpha / rank` and `m` the
multiplier. These functions hold that math once; `networks.lora_cat.layer.LoRAModule` calls them.
Weights follow the kohya layout: `down` is (rank, in) for Linear, (rank, in, kh, kw) for a conv;
`up` is (out, rank) or (out, rank, 1, 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lora_scale(alpha: float | None, rank: int) -> float:
    """`alpha / rank`; an alpha that is missing or 0 means alpha = rank (kohya's rule), so scale 1."""
    if alpha is None or alpha == 0:
        return 1.0
    return float(alpha) / rank


def delta_weight(down: torch.Tensor, up: torch.Tensor, scale: float) -> torch.Tensor:
    """The weight delta `scale * up @ down`, shaped like the adapted layer's weight.

    Linear: (out, in). 1x1 conv: (out, in, 1, 1). kxk conv: the composition of the kxk `down`
    conv and the 1x1 `up` conv, which is again a kxk conv of shape (out, in, kh, kw).
    """
    if down.dim() == 2:
        return (up @ down) * scale
    if down.shape[2:] == (1, 1):
        return (up.flatten(1) @ down.flatten(1))[:, :, None, None] * scale
    composed = F.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)
    return composed * scale


def rank_dropout_mask(lx: torch.Tensor, p: float) -> torch.Tensor:
    """A keep-mask that drops whole rank channels per sample with probability `p`.

    `lx` is the down projection's output: (B, ..., rank) for Linear, (B, rank, H, W) for a conv.
    The mask is (B, rank) broadcast over the other dims; kept channels are not rescaled here,
    the caller divides the scale by (1 - p) so the expected output is unchanged.
    """
    batch = lx.shape[0]
    conv = lx.dim() == 4
    rank = lx.shape[1] if conv else lx.shape[-1]
    keep = (torch.rand(batch, rank, device=lx.device) > p).to(lx.dtype)
    if conv:
        return keep[:, :, None, None]
    return keep.view(batch, *([1] * (lx.dim() - 2)), rank)


def max_norm_ratio(delta: torch.Tensor, max_norm: float) -> tuple[float, float]:
    """(ratio, norm after scaling) that brings `|delta|` down to at most `max_norm`.

    The ratio is 1.0 when the norm is already within bounds. Scaling `up` and `down` each by
    `sqrt(ratio)` scales the delta by `ratio` (sd-scripts' `--scale_weight_norms`).
    """
    norm = float(delta.norm())
    if norm <= max_norm or norm == 0.0:
        return 1.0, norm
    ratio = max_norm / norm
    return ratio, norm * ratio
