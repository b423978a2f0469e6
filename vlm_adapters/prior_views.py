"""Extra views of the label rows' images for the label prior's probe: on a few images per class a
logistic regression overfits, and the same image moved a little (or mirrored) is a new example of
its class for free. The views only train the probe; the LLM trains on the images as given.

"shift" moves the image left and right by 1/14 of its width (2 pixels of a 28-pixel image), filling
the uncovered strip with the image reflected at its edge (no constant bar, no smeared edge column);
"flip" mirrors it left-right, which suits domains where left and right carry no meaning (not text,
not a chest X-ray's laterality), so it is not a default.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageOps

from .images import load_image

if TYPE_CHECKING:
    import datasets

VIEW_KINDS = ("shift", "flip")
# Below this many label rows in the smallest class, `prior_views=None` adds shifted views: the probe
# gains where data is scarce and not from 50 per class on (docs/probe_experiments.md), and each view
# costs one encoder pass per image.
AUTO_VIEWS_BELOW_PER_CLASS = 50


def check_view_kinds(kinds: Sequence[str]) -> None:
    unknown = sorted(set(kinds) - set(VIEW_KINDS))
    if unknown:
        raise ValueError(f"prior_views {unknown} unknown: use any of {list(VIEW_KINDS)}, [] for none, or None "
                         f"(shifted views below {AUTO_VIEWS_BELOW_PER_CLASS} label rows per class).")


def resolve_view_kinds(kinds: Sequence[str] | None, targets: np.ndarray) -> list[str]:
    """The views to add: `kinds` as given, or (None) shifts when the smallest class is small."""
    if kinds is not None:
        check_view_kinds(kinds)
        return list(kinds)
    counts = np.bincount(targets)
    return ["shift"] if counts[counts > 0].min() < AUTO_VIEWS_BELOW_PER_CLASS else []


def image_views(image: Image.Image, kinds: Sequence[str]) -> list[Image.Image]:
    """The views of one image, in a fixed order: for "shift" left then right, for "flip" the mirror."""
    views = []
    if "shift" in kinds:
        array = np.asarray(image)
        step = max(1, round(array.shape[1] / 14))
        pad = [(0, 0), (step, step)] + [(0, 0)] * (array.ndim - 2)
        padded = np.pad(array, pad, mode="reflect")
        views += [Image.fromarray(padded[:, 2 * step :]), Image.fromarray(padded[:, : -2 * step])]
    if "flip" in kinds:
        views.append(ImageOps.mirror(image))
    return views


def _views_batch(batch: dict[str, list[Any]], kinds: list[str]) -> dict[str, list[Image.Image]]:
    return {"image": [view for item in batch["image"] for view in image_views(load_image(item), kinds)]}


def views_of(data: datasets.Dataset, rows: np.ndarray, kinds: Sequence[str]) -> datasets.Dataset | None:
    """An 'image' dataset of the views of the 'image' of `rows`: each row's views in turn, in
    `image_views`' order. A `map` of `data`, so its fingerprint (and with it the feature cache's key)
    is the same in every run on the same data: the views are encoded once, not at every `fit`. None
    where there is nothing to view (no kinds, or rows of several images)."""
    if not kinds or "image" not in data.column_names or not len(rows):
        return None
    import datasets

    return data.select(rows.tolist()).select_columns(["image"]).map(
        _views_batch, batched=True, batch_size=64, fn_kwargs={"kinds": list(kinds)},
        features=datasets.Features({"image": datasets.Image()}), desc="views for the label prior",
    )
