"""`LoRAModule`: one LoRA adapter attached to one Linear or Conv2d layer of the base model.

The adapter owns all its state here (rank, alpha, scale, multiplier, dropouts, merged flag).
The base layer is kept as `self.org_module = [layer]`, a list so that it stays out of this
module's `state_dict()` and `parameters()`; `apply_to()` patches the base layer's forward and
`restore()` undoes it. The multiplier is the CAT switch: at multiplier 0 `forward` returns the
base layer's own output through an explicit branch, bitwise the base model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .lora_math import delta_weight, lora_scale, max_norm_ratio, rank_dropout_mask


class LoRAModule(nn.Module):
    """A low-rank adapter `W x + multiplier * scale * up(down(x))` on a Linear or Conv2d layer."""

    def __init__(
        self,
        lora_name: str,
        org_module: nn.Module,
        rank: int,
        alpha: float | None,
        multiplier: float = 1.0,
        dropout: float | None = None,
        rank_dropout: float | None = None,
        module_dropout: float | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(rank, int) or rank <= 0:
            raise ValueError(f"`rank` should be a positive integer value but the value passed is {rank!r} ({lora_name})")
        self.lora_name = lora_name
        self.rank = rank
        self.lora_down, self.lora_up = _make_projections(org_module, rank)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        # Stored as a tensor because the kohya file format has `<name>.alpha`.
        self.register_buffer("alpha", torch.tensor(float(alpha) if alpha else float(rank)))
        self.scale = lora_scale(alpha, rank)
        self._multiplier = float(multiplier)
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        self.org_module = [org_module]
        self._org_forward = None
        self.merged = False

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.scale = lora_scale(float(self.alpha), self.rank)  # a loaded file brings its own alpha

    # --- switching -----------------------------------------------------------------------------

    @property
    def multiplier(self) -> float:
        return self._multiplier

    @multiplier.setter
    def multiplier(self, value: float) -> None:
        if self.merged:
            raise RuntimeError(f"{self.lora_name}: unmerge() before changing the multiplier of a merged adapter")
        self._multiplier = float(value)

    def apply_to(self) -> None:
        """Route the base layer's forward through this adapter (idempotent)."""
        if self._org_forward is not None:
            return
        layer = self.org_module[0]
        self._org_forward = layer.forward
        layer.forward = self.forward

    def restore(self) -> None:
        """Give the base layer its own forward back."""
        if self._org_forward is None:
            return
        layer = self.org_module[0]
        if self._org_forward == type(layer).forward.__get__(layer):
            del layer.forward  # back to the class's own forward, as before apply_to
        else:
            layer.forward = self._org_forward  # another patch was there first: put it back
        self._org_forward = None

    # --- forward -------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        base = self._org_forward(x, *args, **kwargs)
        if self._multiplier == 0.0 or self.merged:
            return base  # adapter off (or already inside the weight): exactly the base layer
        if self.training and self.module_dropout and torch.rand(1).item() < self.module_dropout:
            return base
        return base + self._adapter_output(x).to(base.dtype)

    def _adapter_output(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.lora_down.weight.dtype:
            x = x.to(self.lora_down.weight.dtype)  # fp32 adapter on a half-precision base
        lx = self.lora_down(x)
        scale = self.scale
        if self.training and self.dropout:
            lx = F.dropout(lx, p=self.dropout)
        if self.training and self.rank_dropout:
            lx = lx * rank_dropout_mask(lx, self.rank_dropout)
            scale = scale / (1.0 - self.rank_dropout)  # keep the expected output unchanged
        return self.lora_up(lx) * (self._multiplier * scale)

    # --- weights -------------------------------------------------------------------------------

    def get_delta_weight(self, multiplier: float | None = None) -> torch.Tensor:
        """The weight this adapter adds to the base layer at `multiplier` (its own by default)."""
        m = self._multiplier if multiplier is None else multiplier
        return delta_weight(self.lora_down.weight, self.lora_up.weight, self.scale * m)

    def merge(self) -> None:
        """Add the delta into the base weight; forward then skips the adapter branch."""
        if self.merged:
            return
        weight = self.org_module[0].weight
        with torch.no_grad():
            weight.add_(self.get_delta_weight().to(weight.device, weight.dtype))
        self.merged = True

    def unmerge(self) -> None:
        """Subtract the delta merged by `merge()`."""
        if not self.merged:
            return
        weight = self.org_module[0].weight
        with torch.no_grad():
            weight.sub_(self.get_delta_weight().to(weight.device, weight.dtype))
        self.merged = False

    def merge_into_base(self, multiplier: float, dtype: torch.dtype | None = None, device=None) -> None:
        """Permanently fold this adapter into the base layer (sd-scripts `--base_weights`)."""
        weight = self.org_module[0].weight
        delta = self.get_delta_weight(multiplier).to(device or weight.device, torch.float32)
        with torch.no_grad():
            merged = weight.to(device or weight.device, torch.float32) + delta
            weight.copy_(merged.to(dtype or weight.dtype))

    @torch.no_grad()
    def apply_max_norm(self, max_norm: float) -> tuple[bool, float]:
        """Scale up and down so that `|scale * up @ down| <= max_norm`; (scaled?, norm after)."""
        delta = delta_weight(self.lora_down.weight.float(), self.lora_up.weight.float(), self.scale)
        ratio, norm = max_norm_ratio(delta, max_norm)
        if ratio < 1.0:
            self.lora_down.weight.mul_(ratio**0.5)
            self.lora_up.weight.mul_(ratio**0.5)
        return ratio < 1.0, norm


def _make_projections(org_module: nn.Module, rank: int) -> tuple[nn.Module, nn.Module]:
    """`down` and `up` shaped for the base layer: a kxk conv base gets a kxk `down` and 1x1 `up`."""
    if isinstance(org_module, nn.Linear):
        return (
            nn.Linear(org_module.in_features, rank, bias=False),
            nn.Linear(rank, org_module.out_features, bias=False),
        )
    if isinstance(org_module, nn.Conv2d) and org_module.groups == 1:
        down = nn.Conv2d(
            org_module.in_channels,
            rank,
            org_module.kernel_size,
            org_module.stride,
            org_module.padding,
            org_module.dilation,
            bias=False,
        )
        return down, nn.Conv2d(rank, org_module.out_channels, 1, 1, bias=False)
    raise TypeError(f"LoRA supports Linear and ungrouped Conv2d layers, not {type(org_module).__name__}")
