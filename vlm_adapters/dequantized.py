"""Compute-dtype copies of 4-bit weights, so forward passes stop dequantizing them again and again.

bitsandbytes keeps only the 4-bit weights and dequantizes each one in every forward pass (and once
more in the backward pass). On a CPU that is a sizeable share of a training step, and most of the
cost of the short forward passes inference runs (one per batch and round, one per generated token).
`AttachOptions.dequantize` picks the trade:

- "per_forward": bitsandbytes' own way; only the 4-bit weights stay in memory;
- "per_call": each inference call (`predict`, `classify`, `describe`, `evaluate`) dequantizes every
  weight once at its start and drops the copies at its end; training runs per forward;
- "once": the copies are made at attach / load and kept (training and inference);
- "int8_per_call" (CPU): each inference call quantizes every weight to int8, one scale per output
  channel, and runs torch's dynamic-int8 matmul (fbgemm / oneDNN: activations quantized per tensor
  at run time). Not exact, so inference only and measured in docs/benchmarks.md; training runs per
  forward. torch has no 4-bit CPU matmul, and an int8 one is faster than a bf16 or fp32 one here.

A compute-dtype copy is exactly what bitsandbytes computes in each pass, so the results are the same (tested);
it costs the memory of the full-precision weights (2 bytes per weight in bfloat16, 4 in float32)
on top of the 4-bit ones, while it exists.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Iterator

import torch
from bitsandbytes.functional import dequantize_4bit
from bitsandbytes.nn import Linear4bit
from torch import nn

_COPY = "_vlm_adapters_dequantized"  # instance attribute, not a buffer: never saved, broadcast or counted as a weight
_INT8 = "_vlm_adapters_int8"  # (packed int8 weight and bias, out_features), the same way


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


def _int8_forward(layer: Linear4bit, x: torch.Tensor) -> torch.Tensor:
    packed, out_features = layer.__dict__[_INT8]
    out = torch.ops.quantized.linear_dynamic(x.reshape(-1, x.shape[-1]).float(), packed)
    return out.view(*x.shape[:-1], out_features).to(x.dtype)


def keep_int8(model: nn.Module) -> int:
    """Give every 4-bit layer of `model` an int8 copy of its weight (symmetric, one scale per output
    channel) and the dynamic-int8 forward; returns how many. CPU only."""
    if not hasattr(torch.ops.quantized, "linear_dynamic"):
        raise RuntimeError(f"dequantize='int8_per_call' needs torch's quantized CPU ops, which torch "
                           f"{torch.__version__} lacks; use dequantize='per_call'.")
    layers = _layers(model)
    # torch marks its quantized tensor constructors deprecated (for torchao); they are what its own CPU
    # int8 matmul takes, and a warning on every call would say nothing the user can act on.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        for layer in layers:
            weight = compute_weight(layer, torch.float32)
            scale = (weight.abs().amax(1) / 127).clamp_min(1e-12).double()
            zero = torch.zeros(len(scale), dtype=torch.long)
            quantized = torch.quantize_per_channel(weight, scale, zero, 0, torch.qint8)
            bias = None if layer.bias is None else layer.bias.float()
            layer.__dict__[_INT8] = (torch.ops.quantized.linear_prepack(quantized, bias), weight.shape[0])
            layer.forward = functools.partial(_int8_forward, layer)
    return len(layers)


def drop_dequantized(model: nn.Module) -> None:
    """Free the kept copies (compute-dtype or int8): back to dequantizing in every pass."""
    for layer in model.modules():
        if isinstance(layer, Linear4bit):
            layer.__dict__.pop(_COPY, None)
            layer.__dict__.pop(_INT8, None)
            layer.__dict__.pop("forward", None)


@contextlib.contextmanager
def dequantized_during(model: nn.Module, int8: bool = False) -> Iterator[None]:
    """Copies (compute-dtype, or int8) for the duration of the block (one inference call), unless the
    model already keeps compute-dtype ones."""
    if any(_COPY in m.__dict__ for m in model.modules()):
        yield
        return
    keep_int8(model) if int8 else keep_dequantized(model)
    try:
        yield
    finally:
        drop_dequantized(model)
