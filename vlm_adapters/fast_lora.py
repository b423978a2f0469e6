"""LoRA on a bitsandbytes 4-bit linear layer as one autograd node.

PEFT's LoRA forward on a 4-bit layer runs the base matmul, clones its output (a defensive copy
kept for old torch versions), then dropout, A, B, a scaling multiply and an add: each a separate
op and autograd node, most of them a pass over a [tokens, out_features] activation. On a CPU, at
the few hundred tokens of a training batch, that bookkeeping is a noticeable share of a step
(docs/concepts.md). `_LoRA4bit` computes the same function with the LoRA term added
to the base output in place by one `addmm_`, and writes its backward by hand: the input gradient
through the dequantized weight (as bitsandbytes' own backward does) plus the two small LoRA
products. It replaces a layer's forward only where PEFT computes plain LoRA (no DoRA or other
variant, dropout 0, one active adapter, not merged, float32 activations and LoRA weights) and
falls back to PEFT's forward otherwise, so results are PEFT's up to float rounding (tested).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch
from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit
from torch import nn

from .dequantized import compute_weight


class _LoRA4bit(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, base: nn.Module, scaling: float):
        out = base(x)  # bitsandbytes' forward: compute-dtype cast, dequantize + matmul, back to x's dtype
        xa = x.reshape(-1, x.shape[-1]) @ a.T
        out.view(-1, out.shape[-1]).addmm_(xa, b.T, alpha=scaling)
        ctx.save_for_backward(x, xa, a, b)
        ctx.base, ctx.scaling = base, scaling
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        x, xa, a, b = ctx.saved_tensors
        base, scaling = ctx.base, ctx.scaling
        grad2d = grad.reshape(-1, grad.shape[-1])
        grad_xa = grad2d @ b  # [tokens, r]
        grad_a = grad_b = grad_x = None
        if ctx.needs_input_grad[2]:
            grad_b = (grad2d.T @ xa).mul_(scaling)
        if ctx.needs_input_grad[1]:
            grad_a = (grad_xa.T @ x.reshape(-1, x.shape[-1])).mul_(scaling)
        if ctx.needs_input_grad[0]:
            compute = base.compute_dtype or grad.dtype
            weight = compute_weight(base, compute)  # dequantized, as bitsandbytes' backward does (or kept)
            grad_x = (grad2d.to(compute) @ weight).to(x.dtype)
            grad_x = grad_x.addmm_(grad_xa, a, alpha=scaling).view_as(x)
        return grad_x, grad_a, grad_b, None, None


def _forward(layer: LoraLinear4bit, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    names = layer.active_adapters
    name = names[0] if len(names) == 1 else None
    plain = (
        name in layer.lora_A
        and not args
        and not kwargs
        and not layer.disable_adapters
        and not layer.merged
        and name not in layer.lora_variant
        and isinstance(layer.lora_dropout[name], nn.Identity)
        and not getattr(layer.base_layer.weight.quant_state, "packing_format_for_cpu", False)
        and not torch.is_autocast_enabled()
        and x.dtype == layer.lora_A[name].weight.dtype == layer.lora_B[name].weight.dtype == torch.float32
    )
    if not plain:
        return LoraLinear4bit.forward(layer, x, *args, **kwargs)
    a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
    return _LoRA4bit.apply(x, a, b, layer.base_layer, layer.scaling[name])


def fuse_lora_4bit(model: nn.Module) -> int:
    """Give every PEFT LoRA layer on a 4-bit linear the one-node forward; returns how many."""
    layers = [m for m in model.modules() if isinstance(m, LoraLinear4bit)]
    _install(layers)
    return len(layers)


def _install(layers: list[LoraLinear4bit]) -> None:
    for layer in layers:
        layer.forward = functools.partial(_forward, layer)


@contextlib.contextmanager
def peft_lora_forward(model: nn.Module) -> Iterator[None]:
    """Run PEFT's own LoRA forward inside the block (what the standard recipe runs)."""
    fused = [m for m in model.modules() if isinstance(m, LoraLinear4bit) and "forward" in m.__dict__]
    for layer in fused:
        del layer.forward
    try:
        yield
    finally:
        _install(fused)
