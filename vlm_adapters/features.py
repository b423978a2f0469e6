"""The on-disk cache of encoder features: each distinct image goes through the frozen encoder once.

Epochs, evaluations and later runs on the same data and encoder read the cached patch tokens
(Arrow files through `datasets`) instead of running the encoder again. Rows are keyed by their
images' content, not by row: a caption and four questions about one picture, or the same view in
several pairs, encode that picture once and every row gets a copy of its features.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from typing import Any

import datasets
import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .data import FEATURES_COLUMN, image_counts, row_images
from .files import default_cache_dir
from .images import ImageLoadError, load_image
from .vision import VisionTower

__all__ = ["FEATURES_COLUMN", "features_as_tensors", "image_digest", "with_image_features"]
IMAGE_COLUMNS = ("image", "images")


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


def image_digest(item: Any) -> str:
    """Hash of an image's content as a dataset holds it: the encoded file's bytes (in the dataset or
    at its path) or the pixels of an array / PIL image. Equal content, equal digest, one encode."""
    digest = hashlib.blake2b(digest_size=16)
    if isinstance(item, dict):
        item = item["bytes"] if item.get("bytes") is not None else item.get("path")
    if isinstance(item, (str, os.PathLike)):
        try:
            with open(item, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
        except OSError:  # unreadable: load_image names the problem when the image is encoded
            digest.update(b"unreadable:" + os.fsencode(item))
    elif isinstance(item, bytes):
        digest.update(item)
    elif isinstance(item, Image.Image):
        digest.update(f"{item.mode}{item.size}".encode())
        digest.update(item.tobytes())
    else:
        array = np.ascontiguousarray(item.detach().cpu().numpy() if isinstance(item, torch.Tensor) else item)
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


class _DistinctImages:
    """`datasets.map` function: on its first call it encodes every distinct image of `data` once
    (into a temporary memory-mapped array), then hands each batch of rows the features of its images.
    The work is lazy so that a cache hit (map reads the Arrow file) hashes and encodes nothing."""

    def __init__(self, data: datasets.Dataset, vision: VisionTower, batch_size: int, skip_bad_images: bool,
                 token_shape: tuple[int, int], store_path: str) -> None:
        self.data, self.vision, self.batch_size, self.skip = data, vision, batch_size, skip_bad_images
        self.token_shape, self.store_path = token_shape, store_path
        self.many = "images" in data.column_names  # rows hold [images, tokens, hidden]
        self.slots: list[list[int]] | None = None  # row -> index of each of its images in the store
        self.store: np.ndarray | None = None
        self.bad: dict[int, str] = {}

    def __call__(self, batch: dict[str, list[Any]], indices: list[int]) -> dict[str, list[Any]]:
        if self.slots is None:
            self._encode_distinct()
        features, bad = [], []
        for row in indices:
            slots = self.slots[row]
            features.append(self.store[slots] if self.many else self.store[slots[0]])
            bad.append(next((self.bad[s] for s in slots if s in self.bad), ""))
        return {FEATURES_COLUMN: features, "bad_image": bad}

    def _encode_distinct(self) -> None:
        columns = [c for c in IMAGE_COLUMNS if c in self.data.column_names]
        total = sum(image_counts(self.data))
        self.store = np.lib.format.open_memmap(self.store_path, "w+", np.float32, (total, *self.token_shape))
        seen: dict[str, int] = {}
        pending: list[tuple[int, Any]] = []
        self.slots = []
        quiet = not datasets.utils.logging.is_progress_bar_enabled()
        with tqdm(total=len(self.data), desc="Encoding distinct images", unit="row", disable=quiet) as bar:
            for start in range(0, len(self.data), 256):
                rows = self.data.select_columns(columns)[start : start + 256]
                for r in range(len(rows[columns[0]])):
                    slots = []
                    for item in row_images({c: rows[c][r] for c in columns}):
                        key = image_digest(item)
                        if key not in seen:
                            seen[key] = len(seen)
                            pending.append((seen[key], item))
                        slots.append(seen[key])
                    self.slots.append(slots)
                    if len(pending) >= self.batch_size:
                        self._encode(pending)
                        pending = []
                bar.update(len(rows[columns[0]]))
        self._encode(pending)

    def _encode(self, pending: list[tuple[int, Any]]) -> None:
        """Encoder features of a batch of distinct images into the store; an unreadable image keeps
        zeros and its error text (or raises, without `skip_bad_images`)."""
        good, images = [], []
        for slot, item in pending:
            try:
                images.append(load_image(item))
                good.append(slot)
            except ImageLoadError as err:
                if not self.skip:
                    raise
                self.bad[slot] = str(err)
        if images:
            self.store[good] = self.vision.encode_images(images).numpy()

    def close(self) -> None:
        self.store = None
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.store_path)


def with_image_features(
    data: datasets.Dataset,
    vision: VisionTower,
    *,
    batch_size: int = 32,
    cache_dir: str | None = None,
    skip_bad_images: bool = False,
    token_shape: tuple[int, int],
) -> datasets.Dataset:
    """Encode each distinct image once with the frozen encoder and cache every row's patch features
    on disk (Arrow): [tokens, hidden] for an 'image' row, [images, tokens, hidden] for 'images' rows.

    The cache file is keyed by the dataset's content fingerprint and the encoder's fingerprint, so
    later epochs and later runs read it instead of running the encoder again. With
    `skip_bad_images`, rows with an unreadable image are dropped and counted (`data.info.description`).
    """
    if FEATURES_COLUMN in data.column_names:
        return data
    key = hashlib.sha256(f"{data._fingerprint}|{vision_fingerprint(vision)}".encode()).hexdigest()[:20]
    folder = os.path.join(cache_dir or default_cache_dir(), "features")
    os.makedirs(folder, exist_ok=True)
    columns = [c for c in IMAGE_COLUMNS if c in data.column_names]
    for column in columns:  # decode ourselves: clear errors, optional skipping, hashing the encoded bytes
        feature = data.features[column]
        if isinstance(feature, datasets.Image):
            data = data.cast_column(column, datasets.Image(decode=False))
        elif isinstance(getattr(feature, "feature", None), datasets.Image):
            data = data.cast_column(column, datasets.List(datasets.Image(decode=False)))
    features = data.features.copy()
    for column in columns:
        del features[column]
    shape = tuple(token_shape)
    many = "images" in columns
    features[FEATURES_COLUMN] = (
        datasets.Array3D((None, *shape), "float32") if many else datasets.Array2D(shape, "float32")
    )
    features["bad_image"] = datasets.Value("string")
    encode = _DistinctImages(data, vision, batch_size, skip_bad_images, shape, os.path.join(folder, f"{key}.npy"))
    try:
        encoded = data.map(
            encode, with_indices=True, batched=True, batch_size=batch_size, remove_columns=columns,
            features=features, cache_file_name=os.path.join(folder, f"{key}.arrow"), new_fingerprint=key,
            desc="Caching image features",
        )
    finally:
        encode.close()
    bad = [msg for msg in encoded["bad_image"] if msg]
    encoded = encoded.filter(lambda msg: not msg, input_columns="bad_image") if bad else encoded
    encoded = encoded.remove_columns("bad_image")
    encoded.info.description = f"skipped {len(bad)} bad images: {bad[:20]}" if bad else ""
    return encoded


def features_as_tensors(data: datasets.Dataset) -> datasets.Dataset:
    """A view whose rows hand out cached features as tensors (other columns unchanged): collating
    nested Python lists of floats costs a noticeable share of a training step. Apply it last:
    columns added afterwards would be formatted too."""
    if FEATURES_COLUMN not in data.column_names:
        return data
    return data.with_format("torch", columns=[FEATURES_COLUMN], output_all_columns=True)
