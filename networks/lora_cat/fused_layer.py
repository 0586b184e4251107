"""One LoRA adapter over several Linear layers that a kohya file names as one (FLUX.1's fused layers).

FLUX.1's reference code (and sd-scripts, whose files users load) computes a block's query, key and
value with one Linear (`img_attn.qkv`, out = 3 * hidden), and a single block's attention and MLP
input with one (`linear1`: q, k, v and the MLP's 4 * hidden). diffusers' transformer has separate
Linears for the parts. A kohya FLUX LoRA on such a layer is one `lora_down` (r, in) and one
`lora_up` (sum of the parts' outputs, r): the adapter of the fused layer, exactly. Here it is that:
one down projection shared by the parts and one up projection whose rows are split among them, so
the file is sd-scripts' and the function is the fused layer's, on diffusers' model.

The parts are called one after another with the same input tensor (diffusers' attention does so;
a single block runs its MLP input before q, k, v); the down projection (with its dropouts) is
computed by the first part that runs and reused by the others, which keeps the math that of one
layer: one dropout mask, one module-dropout draw per call (a part called with another input
computes its own).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from .layer import LoRAModule
from .lora_math import rank_dropout_mask


class LinearGroup(nn.Module):
    """Stands for the concatenation of `parts` along their outputs: what the fused layer would be.

    The parts are held in a plain list, not registered: the group only describes base layers.
    """

    def __init__(self, parts: list[nn.Linear]) -> None:
        super().__init__()
        if not parts or any(part.in_features != parts[0].in_features for part in parts):
            raise ValueError("a LinearGroup needs Linear parts that all read the same input width")
        self.parts = list(parts)
        self.in_features = parts[0].in_features
        self.out_features = sum(part.out_features for part in parts)
        self.split_sizes = [part.out_features for part in parts]


class FusedLoRAModule(LoRAModule):
    """A `LoRAModule` on a `LinearGroup`: `part_i(x) + multiplier * scale * up_i(down(x))` for each part."""

    def __init__(self, lora_name: str, group: LinearGroup, rank: int, alpha: float | None, multiplier: float = 1.0,
                 dropout: float | None = None, rank_dropout: float | None = None,
                 module_dropout: float | None = None) -> None:
        super().__init__(lora_name, nn.Linear(group.in_features, group.out_features, bias=False, device="meta"), rank,
                         alpha, multiplier, dropout, rank_dropout, module_dropout)
        self.org_module = [group]
        self._org_forwards: list | None = None
        # (input, its down output, scale, parts still to read it): see `_down`.
        self._shared: tuple[torch.Tensor, torch.Tensor | None, float, int] | None = None

    @property
    def parts(self) -> list[nn.Linear]:
        return self.org_module[0].parts

    def apply_to(self) -> None:
        if self._org_forwards is not None:
            return
        self._org_forwards = [part.forward for part in self.parts]
        for index, part in enumerate(self.parts):
            part.forward = partial(self._part_forward, index)

    def restore(self) -> None:
        if self._org_forwards is None:
            return
        for part, original in zip(self.parts, self._org_forwards):
            if original == type(part).forward.__get__(part):
                del part.forward
            else:
                part.forward = original
        self._org_forwards, self._shared = None, None

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        raise RuntimeError(f"{self.lora_name} adapts {len(self.parts)} layers; each runs through its own forward")

    def _part_forward(self, index: int, x: torch.Tensor) -> torch.Tensor:
        base = self._org_forwards[index](x)
        if self._multiplier == 0.0 or self.merged:
            return base  # adapter off (or merged): exactly the base layer
        lx, scale = self._down(x)
        if lx is None:
            return base  # module dropout skipped the whole fused layer this call
        start = sum(self.org_module[0].split_sizes[:index])
        up = self.lora_up.weight[start : start + self.parts[index].out_features]
        return base + (F.linear(lx, up) * (self._multiplier * scale)).to(base.dtype)

    def _down(self, x: torch.Tensor) -> tuple[torch.Tensor | None, float]:
        """down(x) with its dropouts, computed once per input and shared by the parts in whatever
        order they run; forgotten once every part has had it, so no input outlives its call."""
        shared = self._shared
        if shared is not None and shared[0] is x:
            _, lx, scale, waiting = shared
            self._shared = (x, lx, scale, waiting - 1) if waiting > 1 else None
            return lx, scale
        if self.training and self.module_dropout and torch.rand(1).item() < self.module_dropout:
            lx, scale = None, self.scale
        else:
            lx, scale = self._dropped_down(x)
        waiting = len(self.parts) - 1
        self._shared = (x, lx, scale, waiting) if waiting else None
        return lx, scale

    def _dropped_down(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        if x.dtype != self.lora_down.weight.dtype:
            x = x.to(self.lora_down.weight.dtype)
        lx, scale = self.lora_down(x), self.scale
        if self.training and self.dropout:
            lx = F.dropout(lx, p=self.dropout)
        if self.training and self.rank_dropout:
            lx = lx * rank_dropout_mask(lx, self.rank_dropout)
            scale = scale / (1.0 - self.rank_dropout)
        return lx, scale

    # --- weights: the fused delta, split among the parts ------------------------------------------

    def _add_to_parts(self, delta: torch.Tensor, sign: float, dtype: torch.dtype | None = None, device=None) -> None:
        with torch.no_grad():
            for part, rows in zip(self.parts, delta.split(self.org_module[0].split_sizes)):
                weight = part.weight
                merged = weight.to(device or weight.device, torch.float32) + sign * rows.to(device or weight.device)
                weight.copy_(merged.to(dtype or weight.dtype))

    def merge(self) -> None:
        if self.merged:
            return
        self._add_to_parts(self.get_delta_weight().float(), 1.0)
        self.merged = True

    def unmerge(self) -> None:
        if not self.merged:
            return
        self._add_to_parts(self.get_delta_weight().float(), -1.0)
        self.merged = False

    def merge_into_base(self, multiplier: float, dtype: torch.dtype | None = None, device=None) -> None:
        self._add_to_parts(self.get_delta_weight(multiplier).float(), 1.0, dtype, device)
