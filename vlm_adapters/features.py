"""The on-disk cache of encoder features: each image goes through the frozen encoder once.

Epochs, evaluations and later runs on the same data and encoder read the cached patch tokens
(Arrow files through `datasets`) instead of running the encoder again.
"""

from __future__ import annotations

import functools
import hashlib
import os
from typing import Any

import datasets
import numpy as np
import torch

from .files import default_cache_dir
from .images import ImageLoadError, load_image
from .vision import VisionTower

FEATURES_COLUMN = "image_features"


def vision_fingerprint(vision: VisionTower) -> str:
    """Identity of the encoder + preprocessing, so cached features are reused only when still valid."""
    digest = hashlib.sha256()
    digest.update(f"{type(vision.encoder).__qualname__}|{vision.feature_layer}|".encode())
    processor = vision.image_processor
    digest.update((processor.to_json_string() if hasattr(processor, "to_json_string") else repr(processor)).encode())
    if vision.source and not os.path.isdir(vision.source.rsplit("@", 1)[0]):
        digest.update(vision.source.encode())  # a Hub id + revision names fixed weights
    else:  # a module or a local folder: hash the weights themselves
        for name, tensor in sorted(vision.encoder.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def with_image_features(
    data: datasets.Dataset,
    vision: VisionTower,
    *,
    batch_size: int = 32,
    cache_dir: str | None = None,
    skip_bad_images: bool = False,
    token_shape: tuple[int, int],
) -> datasets.Dataset:
    """Encode every image once with the frozen encoder and cache the patch features on disk (Arrow).

    The cache file is keyed by the dataset's content fingerprint and the encoder's fingerprint, so
    later epochs and later runs read it instead of running the encoder again. With
    `skip_bad_images`, unreadable images are dropped and counted (`data.info.description`).
    """
    if FEATURES_COLUMN in data.column_names:
        return data
    key = hashlib.sha256(f"{data._fingerprint}|{vision_fingerprint(vision)}".encode()).hexdigest()[:20]
    folder = os.path.join(cache_dir or default_cache_dir(), "features")
    os.makedirs(folder, exist_ok=True)
    num_tokens, hidden = token_shape
    if isinstance(data.features["image"], datasets.Image):  # decode ourselves: clear errors, optional skipping
        data = data.cast_column("image", datasets.Image(decode=False))
    features = data.features.copy()
    del features["image"]
    features[FEATURES_COLUMN] = datasets.Array2D((num_tokens, hidden), "float32")
    features["bad_image"] = datasets.Value("string")

    blank = np.zeros((num_tokens, hidden), dtype=np.float32)
    encoded = data.map(
        functools.partial(_encode_batch, vision=vision, skip_bad_images=skip_bad_images, blank=blank),
        batched=True,
        batch_size=batch_size,
        remove_columns=["image"],
        features=features,
        cache_file_name=os.path.join(folder, f"{key}.arrow"),
        new_fingerprint=key,
        desc="Encoding images (cached)",
    )
    bad = [msg for msg in encoded["bad_image"] if msg]
    encoded = encoded.filter(lambda msg: not msg, input_columns="bad_image") if bad else encoded
    encoded = encoded.remove_columns("bad_image")
    encoded.info.description = f"skipped {len(bad)} bad images: {bad[:20]}" if bad else ""
    return encoded


def _encode_batch(
    batch: dict[str, list[Any]], *, vision: VisionTower, skip_bad_images: bool, blank: np.ndarray
) -> dict[str, Any]:
    """Encoder features of a batch of images; an unreadable image gets `blank` and its error text."""
    images, bad = [], []
    for item in batch["image"]:
        try:
            images.append(load_image(item))
            bad.append("")
        except ImageLoadError as err:
            if not skip_bad_images:
                raise
            images.append(None)
            bad.append(str(err))
    good = [img for img in images if img is not None]
    encoded = iter(vision.encode_images(good).numpy()) if good else iter(())
    out = {k: v for k, v in batch.items() if k != "image"}
    out[FEATURES_COLUMN] = [next(encoded) if img is not None else blank for img in images]
    out["bad_image"] = bad
    return out


def features_as_tensors(data: datasets.Dataset) -> datasets.Dataset:
    """A view whose rows hand out cached features as tensors (other columns unchanged): collating
    nested Python lists of floats costs a noticeable share of a training step. Apply it last:
    columns added afterwards would be formatted too."""
    if FEATURES_COLUMN not in data.column_names:
        return data
    return data.with_format("torch", columns=[FEATURES_COLUMN], output_all_columns=True)


