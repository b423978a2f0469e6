"""`Projector`: patch tokens [B, N, C_vision] -> LLM input embeddings [B, k, d_llm].

Optional pooling first reduces N to k tokens (fewer tokens = faster training and inference):
- "avg": adaptive average pooling over the 2-D patch grid (or the sequence when N is not square);
- "pixel_shuffle": nanoVLM's space-to-depth, merging r x r neighbours into one token of r*r*C channels.
Before pooling, each feature channel is standardised with the training set's mean and std (set by
`fit` from the cached features; an affine map `merge_and_export` folds into Llava's first linear).
Then `linear` (LLaVA) or `mlp2x_gelu` (LLaVA-1.5), after a LayerNorm of the input features: unlike
ViT hidden states, CNN feature maps (e.g. EfficientNet's post-activation 1280 channels) have
scales far from the LLM's token embeddings, and without the norm early steps blow the LLM up.
`norm=False` drops it (LLaVA's own projector has none), which export to transformers' Llava needs.
Always kept in float32 and never quantized.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn
from torch.nn import functional as F


def _grid(num_tokens: int) -> int | None:
    side = math.isqrt(num_tokens)
    return side if side * side == num_tokens else None


class Projector(nn.Module):
    def __init__(
        self,
        vision_hidden_size: int,
        llm_hidden_size: int,
        kind: str = "mlp2x_gelu",
        num_vision_tokens: int | None = None,
        num_image_tokens: int | None = None,
        pooling: str = "avg",
        norm: bool = True,
    ) -> None:
        super().__init__()
        # Per-channel statistics of the encoder's features, set from the training data by `fit`
        # (identity until then). CNN channels differ in scale by orders of magnitude; standardising
        # them, as a linear probe on the same features does, keeps a few loud channels from
        # dominating the per-token LayerNorm.
        self.register_buffer("feature_mean", torch.zeros(vision_hidden_size))
        self.register_buffer("feature_scale", torch.ones(vision_hidden_size))
        self.num_vision_tokens = num_vision_tokens
        self.num_image_tokens = num_image_tokens or num_vision_tokens
        self.pooling = pooling if self.num_image_tokens != num_vision_tokens else "none"
        self.shuffle_factor = 1
        in_features = vision_hidden_size
        if self.pooling == "pixel_shuffle":
            grid, out_grid = _grid(num_vision_tokens or 0), _grid(self.num_image_tokens or 0)
            if grid is None or out_grid is None or grid % out_grid:
                raise ValueError(
                    f"pixel_shuffle needs square token grids with the output side dividing the input side; got "
                    f"{num_vision_tokens} -> {num_image_tokens} tokens. Use pooling='avg' or another num_image_tokens."
                )
            self.shuffle_factor = grid // out_grid
            in_features *= self.shuffle_factor**2
        self.norm: nn.Module = nn.LayerNorm(in_features) if norm else nn.Identity()
        if kind == "linear":
            self.proj: nn.Module = nn.Linear(in_features, llm_hidden_size)
        elif kind == "mlp2x_gelu":
            self.proj = nn.Sequential(
                nn.Linear(in_features, llm_hidden_size), nn.GELU(), nn.Linear(llm_hidden_size, llm_hidden_size)
            )
        else:
            raise ValueError(f"unknown projector {kind!r}; use 'linear' or 'mlp2x_gelu'.")

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.pooling == "none":
            return tokens
        batch, num, channels = tokens.shape
        side = _grid(num)
        if self.pooling == "pixel_shuffle":
            r, out = self.shuffle_factor, side // self.shuffle_factor
            x = tokens.reshape(batch, out, r, out, r, channels).permute(0, 1, 3, 2, 4, 5)
            return x.reshape(batch, out * out, r * r * channels)
        out_side = _grid(self.num_image_tokens)
        if side is not None and out_side is not None:
            grid = tokens.transpose(1, 2).reshape(batch, channels, side, side)
            return F.adaptive_avg_pool2d(grid, out_side).flatten(2).transpose(1, 2)
        return F.adaptive_avg_pool1d(tokens.transpose(1, 2), self.num_image_tokens).transpose(1, 2)

    @property
    def standardizes(self) -> bool:
        return bool(self.feature_mean.any() or (self.feature_scale != 1).any())

    @torch.no_grad()
    def set_feature_statistics(self, batches: Iterable[torch.Tensor]) -> None:
        """Mean and 1/std per channel over every token of `batches` ([B, N, C] encoder features)."""
        total, squares, count = 0.0, 0.0, 0
        for tokens in batches:
            flat = tokens.reshape(-1, tokens.shape[-1]).double()
            total, squares, count = total + flat.sum(0), squares + (flat**2).sum(0), count + flat.shape[0]
        mean = total / count
        std = (squares / count - mean**2).clamp_min(0).sqrt()
        self.feature_mean.copy_(mean.float())
        self.feature_scale.copy_((1.0 / std.clamp_min(1e-6)).float())

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = (tokens.float() - self.feature_mean) * self.feature_scale
        return self.proj(self.norm(self.pool(tokens)))
