"""Compute-dtype copies of 4-bit weights, so forward passes stop dequantizing them again and again.

bitsandbytes keeps only the 4-bit weights and dequantizes each one in every forward pass (and once
more in the backward pass). On a CPU that is a sizeable share of a training step, and most of the
cost of the short forward passes inference runs (one per batch and round, one per generated token).
`AttachOptions.dequantize` picks the trade:

- "per_forward": bitsandbytes' own way; only the 4-bit weights stay in memory;
- "per_call": each inference call (`predict`, `classify`, `describe`, `evaluate`) dequantizes every
  weight once at its start and drops the copies at its end; training runs per forward;
- "once": the copies are made at attach / load and kept (training and inference).

A copy is exactly what bitsandbytes computes in each pass, so the results are the same (tested);
it costs the memory of the full-precision weights (2 bytes per weight in bfloat16, 4 in float32)
on top of the 4-bit ones, while it exists.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
from bitsandbytes.functional import dequantize_4bit
from bitsandbytes.nn import Linear4bit
from torch import nn

_COPY = "_vlm_adapters_dequantized"  # instance attribute, not a buffer: never saved, broadcast or counted as a weight


def compute_weight(layer: Linear4bit, dtype: torch.dtype) -> torch.Tensor:
    """The layer's weight in `dtype`: its kept copy when it has one in that dtype, else dequantized now."""
    kept = layer.__dict__.get(_COPY)
    if kept is not None and kept.dtype == dtype:
        return kept
    return dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(dtype)


def _forward(layer: Linear4bit, x: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' forward (cast to the compute dtype, matmul, cast back) on the kept copy."""
    kept = layer.__dict__.get(_COPY)
    if kept is None or kept.device != x.device:
        return Linear4bit.forward(layer, x)
    bias = None if layer.bias is None else layer.bias.to(kept.dtype)
    return nn.functional.linear(x.to(kept.dtype), kept, bias).to(x.dtype)


def _layers(model: nn.Module) -> list[Linear4bit]:
    """The 4-bit layers whose compute dtype is set (a layer without one takes its input's dtype)."""
    return [
        m for m in model.modules()
        if isinstance(m, Linear4bit) and m.compute_dtype is not None
        and not getattr(m.weight.quant_state, "packing_format_for_cpu", False)
    ]


def keep_dequantized(model: nn.Module) -> int:
    """Give every 4-bit layer of `model` a kept compute-dtype copy of its weight; returns how many."""
    layers = _layers(model)
    with torch.no_grad():
        for layer in layers:
            layer.__dict__[_COPY] = compute_weight(layer, layer.compute_dtype)
            layer.forward = functools.partial(_forward, layer)
    return len(layers)


def drop_dequantized(model: nn.Module) -> None:
    """Free the kept copies: back to dequantizing in every pass."""
    for layer in model.modules():
        if isinstance(layer, Linear4bit):
            layer.__dict__.pop(_COPY, None)
            layer.__dict__.pop("forward", None)


@contextlib.contextmanager
def dequantized_during(model: nn.Module) -> Iterator[None]:
    """Copies for the duration of the block (one inference call), unless the model already keeps them."""
    if any(_COPY in m.__dict__ for m in model.modules()):
        yield
        return
    keep_dequantized(model)
    try:
        yield
    finally:
        drop_dequantized(model)
