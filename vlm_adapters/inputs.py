"""Checks and shapes of what users pass to inference: candidate labels, batches of images (a row
may hold several), one prompt or one per row, and encoder features of one or several images per row.
Shared by `inference.py`, `generation.py` and `zero_shot.py`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def check_labels(labels: Sequence[str]) -> list[str]:
    labels = list(labels)
    if not labels:
        raise ValueError("at least one candidate label is needed; got an empty list.")
    if not all(isinstance(label, str) and label for label in labels):
        raise ValueError(f"candidate labels must be non-empty strings; got {labels!r}.")
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise ValueError(f"candidate labels must be unique; {duplicates} appear more than once.")
    return labels


def as_rows(images: Any) -> tuple[bool, list[list[Any]]]:
    """(one image given?, the rows): a list is a batch, and an element that is itself a list or tuple
    is one row of several images, so `[a, b]` is two rows and `[[a, b]]` one row of two images."""
    if not isinstance(images, (list, tuple)):
        return True, [[images]]
    if not images:
        raise ValueError("got an empty list of images.")
    rows = [list(item) if isinstance(item, (list, tuple)) else [item] for item in images]
    if empty := [i for i, row in enumerate(rows) if not row]:
        raise ValueError(f"row {empty[0]} of the batch is an empty list; a row needs at least one image.")
    return False, rows


def per_row(value: str | Sequence[str], rows: int, what: str) -> list[str]:
    """One string for every row, or a list with one per row."""
    if isinstance(value, str):
        return [value] * rows
    values = list(value)
    if len(values) != rows or not all(isinstance(v, str) for v in values):
        raise ValueError(f"got {len(values)} {what} for {rows} rows; pass one string, or a list of one per row.")
    return values


def image_rows(features: torch.Tensor) -> tuple[int, torch.Tensor]:
    """(rows, features of every image in row order [B * images, tokens, hidden]) from [B, tokens,
    hidden] or [B, images, tokens, hidden]."""
    if features.dim() == 4:
        return features.shape[0], features.flatten(0, 1)
    if features.dim() == 3:
        return features.shape[0], features
    raise ValueError(
        f"image features of shape {tuple(features.shape)}; expected [rows, tokens, hidden] or "
        "[rows, images, tokens, hidden]."
    )
