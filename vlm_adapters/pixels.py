"""Pixel values of any depth -> 8 bits, and the error every image reader raises.

Shared by `images.py` (PIL images, arrays, tensors) and `dicom.py` (scanner data).
"""

from __future__ import annotations

import numpy as np


class ImageLoadError(ValueError):
    """An image could not be read; the message names the source and the fix."""


def check_finite(array: np.ndarray) -> None:
    # One NaN among valid values must not pass: nanmin/nanmax skip it and the cast to uint8 turns
    # it into an arbitrary grey level without an error.
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise ImageLoadError("image array holds NaN or inf values; clean it before passing it in.")


def stretch_to_uint8(array: np.ndarray, value_range: tuple[float, float] | None = None) -> np.ndarray:
    """Map a high-bit-depth or float array onto 0..255, from `value_range` (clipped) or else its own
    range (X-ray exports use only part of the 16-bit range, so a fixed /257 would leave them nearly black)."""
    check_finite(array)
    array = array.astype(np.float64)
    low, high = value_range or (float(array.min()), float(array.max()))
    if high <= low:
        return np.zeros(array.shape, dtype=np.uint8)
    return np.round(np.clip((array - low) / (high - low), 0.0, 1.0) * 255.0).astype(np.uint8)
