"""`explain`: which part of the image made the model give a label ("why did it say pneumonia?").

Occlusion on the image tokens the LLM reads (the projector's output, after pooling): every block of
2 x 2 tokens in turn is replaced by the image's mean token, and a token's score is the mean drop of
the label's log-odds over the blocks that hide it. All occluded copies are scored in batches through
the library's own label scoring (`label_log_likelihoods`), so it works for every adapter method, LoRA
and prefix alike. The token grid is then stretched over the part of the image the encoder saw.
Chosen by measurement over gradient x input and attention rollout (docs/explain.md).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

from .files import write_file_atomically
from .images import ImageInput, load_image
from .inference import inference
from .modeling import VisionLanguageCore


@dataclass
class Explanation:
    """Why the model gave `label` to `image`.

    `heatmap` [H, W] (the image's size): how much the label's log-odds against the other labels drop
    (nats) when the image tokens around that pixel are hidden; higher = more responsible, negative =
    evidence against, 0 outside what the encoder saw. `tokens` [h, w] holds the same per image token.
    `score`: the label's probability among `labels`, as `classify` gives it."""

    image: Image.Image
    label: str
    score: float
    heatmap: np.ndarray
    tokens: np.ndarray
    labels: list[str] = field(default_factory=list)
    method: str = "occlusion"

    def overlay(self, alpha: float = 0.6, colormap: str = "jet") -> Image.Image:
        """The image with the heatmap's positive part blended over it (opaque where it peaks)."""
        from matplotlib import colormaps  # plotting loads only when an overlay is drawn

        heat = np.clip(self.heatmap, 0.0, None)
        heat = heat / heat.max() if heat.max() > 0 else heat
        colour = colormaps[colormap](heat)[..., :3] * 255.0
        weight = (alpha * heat)[..., None]
        blended = (1.0 - weight) * np.asarray(self.image.convert("RGB"), dtype=np.float64) + weight * colour
        return Image.fromarray(np.round(blended).clip(0, 255).astype(np.uint8))

    def save(self, path: str | os.PathLike, alpha: float = 0.6, colormap: str = "jet") -> str:
        """Write the overlay as a PNG of the image's size (whole or not at all); returns the path."""
        overlay = self.overlay(alpha, colormap)
        return write_file_atomically(os.fspath(path), lambda staging: overlay.save(staging, format="PNG"))


@inference
def explain(
    model: VisionLanguageCore,
    image: ImageInput,
    label: str | None = None,
    prompt: str | None = None,
    labels: Sequence[str] | None = None,
    window: int = 2,
    batch_size: int = 32,
) -> Explanation:
    """Explain `label` (default: the top one of `labels`, themselves defaulting to the adapter's labels)
    by occluding every `window` x `window` block of image tokens; see the module docstring."""
    if window < 1:
        raise ValueError(f"window={window}: pass the side (in image tokens, >= 1) of the blocks to hide.")
    candidates = _candidates(model, label, labels)
    prompt = prompt or model.config.classify_prompt
    picture = load_image(image)
    with model.reuse_prompt_cache():
        pixels = model.vision.preprocess([picture])
        embeds = model.image_embeddings(image_features=model.vision(pixels))
        scores = model.label_log_likelihoods(embeds, candidates, prompt)[0]
        index = candidates.index(label) if label is not None else int(scores.argmax())
        grid = _grid_shape(embeds.shape[1], *pixels.shape[-2:])
        per_token = occlusion(
            embeds, lambda batch: log_odds(model.label_log_likelihoods(batch, candidates, prompt), index),
            windows(grid, window), batch_size,
        )
    tokens = per_token.reshape(grid).cpu().numpy()
    box = seen_box(model.vision.image_processor, picture.width, picture.height)
    return Explanation(
        image=picture,
        label=candidates[index],
        score=float(scores.softmax(-1)[index]),
        heatmap=upsample(tokens, box, picture.width, picture.height),
        tokens=tokens,
        labels=candidates,
    )


def log_odds(scores: torch.Tensor, index: int) -> torch.Tensor:
    """[B] log-odds of candidate `index` against the others from log-likelihoods [B, K]: unlike its
    log-probability, it does not flatten out when the model is sure (the label's log-likelihood alone
    when it is the only candidate)."""
    if scores.shape[1] == 1:
        return scores[:, 0]
    others = torch.cat([scores[:, :index], scores[:, index + 1 :]], 1)
    return scores[:, index] - others.logsumexp(-1)


def windows(grid: tuple[int, int], size: int) -> torch.Tensor:
    """Masks [M, rows * cols] of every size x size block of the token grid, the blocks cut by its border
    included, so that each token lies in size * size blocks."""
    rows, cols = grid
    masks = torch.zeros((rows + size - 1) * (cols + size - 1), rows, cols, dtype=torch.bool)
    for i, (top, left) in enumerate((t, c) for t in range(1 - size, rows) for c in range(1 - size, cols)):
        masks[i, max(top, 0) : top + size, max(left, 0) : left + size] = True
    return masks.flatten(1)


@torch.no_grad()
def occlusion(
    embeds: torch.Tensor,
    score: Callable[[torch.Tensor], torch.Tensor],
    masks: torch.Tensor,
    batch_size: int,
    fill: torch.Tensor | None = None,
) -> torch.Tensor:
    """[k] per image token of `embeds` [1, k, d]: the mean drop of `score` over the masks [M, k] that
    hide it, a mask's tokens replaced by `fill` (default: the image's mean token). Blocks rather than
    single tokens: a single token's neighbours still carry an object that spans several tokens, so
    hiding it alone changes little."""
    masks = masks.to(embeds.device)
    reference = score(embeds)[0]
    fill = embeds.mean(1, keepdim=True) if fill is None else fill
    drops = torch.cat([
        reference - score(torch.where(chunk[:, :, None], fill, embeds)) for chunk in masks.split(batch_size)
    ])
    return (masks * drops[:, None]).sum(0) / masks.sum(0)


def _candidates(model: VisionLanguageCore, label: str | None, labels: Sequence[str] | None) -> list[str]:
    candidates = list(labels) if labels is not None else list(model.config.labels)
    if label is not None and label not in candidates:
        candidates.append(label)
    if not candidates:
        raise ValueError(
            "nothing to explain: this adapter was not trained on class labels; pass label='...' "
            "(and labels=[...] to explain it against the others)."
        )
    if len(set(candidates)) != len(candidates) or not all(isinstance(c, str) and c for c in candidates):
        raise ValueError(f"candidate labels must be unique non-empty strings; got {candidates!r}.")
    return candidates


def _grid_shape(num_tokens: int, height: int, width: int) -> tuple[int, int]:
    """(rows, columns) of the image tokens: the factorisation of their count closest to the image's aspect."""
    pairs = [(r, num_tokens // r) for r in range(1, num_tokens + 1) if num_tokens % r == 0]
    return min(pairs, key=lambda rc: abs(np.log(rc[0] / rc[1]) - np.log(height / width)))


def _size(value: Any, key: str) -> int | None:
    return value.get(key) if isinstance(value, dict) else getattr(value, key, None)


def seen_box(processor: Any, width: int, height: int) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) of the part of a width x height image the encoder sees: all of it,
    unless a transformers image processor centre-crops (CLIP: shortest edge resized, then cropped)."""
    crop = getattr(processor, "crop_size", None)
    if not getattr(processor, "do_center_crop", False) or crop is None:
        return 0.0, 0.0, float(width), float(height)
    size = getattr(processor, "size", None)
    shortest = _size(size, "shortest_edge")
    if shortest:
        resized_w, resized_h = width * shortest / min(width, height), height * shortest / min(width, height)
    else:
        resized_w, resized_h = _size(size, "width") or width, _size(size, "height") or height
    crop_w, crop_h = min(_size(crop, "width"), resized_w), min(_size(crop, "height"), resized_h)
    scale_x, scale_y = width / resized_w, height / resized_h
    left, top = (resized_w - crop_w) / 2 * scale_x, (resized_h - crop_h) / 2 * scale_y
    return left, top, left + crop_w * scale_x, top + crop_h * scale_y


def upsample(tokens: np.ndarray, box: tuple[float, float, float, float], width: int, height: int) -> np.ndarray:
    """The token grid stretched (bilinear) over `box` of a width x height image; 0 outside the box."""
    left, top, right, bottom = (round(v) for v in box)
    inner = F.interpolate(
        torch.as_tensor(tokens, dtype=torch.float32)[None, None],
        size=(max(1, bottom - top), max(1, right - left)),
        mode="bilinear",
        align_corners=False,
    )[0, 0].numpy()
    heatmap = np.zeros((height, width), dtype=np.float32)
    heatmap[top:bottom, left:right] = inner[: height - top, : width - left]
    return heatmap
