"""torch.compile for the training steps, one decoder layer at a time (regional compilation).

Why not the whole model: `forward` packs each batch with data-dependent shapes (`nonzero`, image
counts), where a graph breaks, and transformers' own `TrainingArguments(torch_compile=True)` left
the step time unchanged in a try (docs/benchmarks.md). Every decoder layer runs the same code, so one
compiled graph serves all of them; inductor fuses the elementwise work between the matmuls.

Why training only: inference feeds a KV cache whose per-layer state the compiled graph guards on,
which recompiles layer after layer; forward passes without gradients (evaluation, `predict`,
`generate`) therefore run the layers eagerly, and `fit` restores them when it ends. accelerate's
`compile_regions` compiles the same repeated blocks, but for good and for every pass, inference included.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn


def decoder_layers(llm: nn.Module) -> list[nn.Module]:
    """The repeated blocks transformers names in `_no_split_modules` (LlamaDecoderLayer, GPT2Block, ...)."""
    names = set(getattr(llm, "_no_split_modules", None) or [])
    return [m for m in llm.modules() if type(m).__name__ in names]


def _forward(layer: nn.Module, compiled: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    if torch.is_grad_enabled():
        return compiled(layer, *args, **kwargs)
    return type(layer).forward(layer, *args, **kwargs)


@contextlib.contextmanager
def compiled_layers(llm: nn.Module) -> Iterator[int]:
    """Within the block, the decoder layers of `llm` run compiled when gradients are on; yields how many."""
    layers = decoder_layers(llm)
    if not layers:
        raise ValueError(
            f"compile_layers=True found no decoder layers in {type(llm).__name__} (none of its modules is named in "
            "its `_no_split_modules`); train without compile_layers."
        )
    compiled = {kind: torch.compile(kind.forward, dynamic=True) for kind in {type(layer) for layer in layers}}
    for layer in layers:
        layer.forward = functools.partial(_forward, layer, compiled[type(layer)])
    try:
        yield len(layers)
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)
