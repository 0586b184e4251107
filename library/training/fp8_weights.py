"""`--fp8_base` / `--fp8_base_unet`: the frozen base model's Linear and Conv2d weights stored as
float8_e4m3fn, computed in the run's mixed-precision dtype (sd-scripts' options, which halve the base
weights' memory against bf16: FLUX.1's 12B transformer in 12 GB).

Each such layer's forward becomes one autograd function that upcasts the fp8 weight to the input's
dtype for its matmul and keeps only the fp8 weight for backward, where it upcasts it again for the
input's gradient: so no full-precision copy of any weight outlives the layer's call, with or without
gradient checkpointing (a plain `weight.to(dtype)` would be saved by autograd, one bf16 copy of every
weight until backward). Biases, norms and embeddings keep the run's dtype: they are small.

The adapters attach on top (their `org_forward` is this one), so with every adapter off the model is
exactly the fp8 base model: CAT's reference is the model being trained, as always. Weights are rounded
to fp8 once, at start; the base model is not the full-precision one any more, by design of the option.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FP8 = torch.float8_e4m3fn


class _Fp8Linear(torch.autograd.Function):
    """y = x W^T + b with W stored in fp8; gradients for x only (the base weights are frozen)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(weight)
        return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad: Tensor):
        (weight,) = ctx.saved_tensors
        return grad @ weight.to(grad.dtype), None, None


class _Fp8Conv2d(torch.autograd.Function):
    """conv2d with its kernel stored in fp8; gradients for the input only."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, stride, padding, dilation, groups) -> Tensor:
        ctx.save_for_backward(weight)
        ctx.conv = (x.shape, stride, padding, dilation, groups)
        return F.conv2d(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype), stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (weight,) = ctx.saved_tensors
        shape, stride, padding, dilation, groups = ctx.conv
        grad_input = torch.nn.grad.conv2d_input(shape, weight.to(grad.dtype), grad, stride, padding, dilation, groups)
        return grad_input, None, None, None, None, None, None


def _fp8_linear_forward(layer: nn.Linear, x: Tensor) -> Tensor:
    return _Fp8Linear.apply(x, layer.weight, layer.bias)


def _fp8_conv_forward(layer: nn.Conv2d, x: Tensor) -> Tensor:
    if layer.padding_mode != "zeros":
        raise NotImplementedError(f"--fp8_base: a Conv2d with padding_mode {layer.padding_mode!r}")
    return _Fp8Conv2d.apply(x, layer.weight, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)


def store_in_fp8(model: nn.Module) -> int:
    """Every Linear and Conv2d weight of `model` in float8_e4m3fn, computed through the upcasting forward;
    returns how many layers. Call before the network attaches its adapters."""
    count = 0
    for layer in model.modules():
        if isinstance(layer, nn.Linear):
            forward = _fp8_linear_forward
        elif isinstance(layer, nn.Conv2d):
            forward = _fp8_conv_forward
        else:
            continue
        layer.weight.data = layer.weight.data.to(FP8)
        layer.forward = forward.__get__(layer)
        count += 1
    return count
