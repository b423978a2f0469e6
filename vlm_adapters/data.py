"""Datasets in: loading them from where users keep them, and checking them before training.

Examples are rows with an `image` (or cached `image_features`) plus either `label` (class index
with a ClassLabel feature, or a string) or `answer` (free text, with an optional `prompt`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import datasets
import numpy as np
import torch

from .features import FEATURES_COLUMN


def as_dataset(data: Any, what: str = "dataset") -> datasets.Dataset:
    """Accept a `datasets.Dataset` or a list of dicts; check it can be trained or evaluated on."""
    if isinstance(data, datasets.DatasetDict):
        raise ValueError(f"{what} is a DatasetDict with splits {list(data)}; pass one split, e.g. data['train'].")
    if isinstance(data, (list, tuple)):
        if not data:
            raise ValueError(f"{what} is empty; it needs at least one example.")
        if not all(isinstance(row, dict) for row in data):
            raise ValueError(f"{what} must be a list of dicts with 'image' and 'label' or 'answer' keys.")
        data = datasets.Dataset.from_list([_string_safe(row) for row in data])
    if not isinstance(data, datasets.Dataset):
        raise TypeError(f"{what} must be a datasets.Dataset or a list of dicts, got {type(data).__name__}.")
    if len(data) == 0:
        raise ValueError(f"{what} is empty; it needs at least one example.")
    columns = set(data.column_names)
    if not columns & {"image", FEATURES_COLUMN}:
        raise ValueError(f"{what} has columns {sorted(columns)} but needs an 'image' column.")
    if not columns & {"label", "answer"}:
        raise ValueError(f"{what} has columns {sorted(columns)} but needs 'label' (classes) or 'answer' (free text).")
    return data


def _string_safe(row: dict[str, Any]) -> dict[str, Any]:
    """Text given as bytes must be UTF-8; say so instead of failing inside the tokenizer."""
    out = dict(row)
    for key in ("label", "answer", "prompt"):
        if isinstance(out.get(key), bytes):
            try:
                out[key] = out[key].decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"the {key!r} value {out[key][:40]!r} is not UTF-8 text; decode it first.") from err
    return out


def label_names(data: datasets.Dataset) -> list[str] | None:
    """Class names from a ClassLabel feature or the sorted set of string labels; None for free text."""
    if "label" not in data.column_names:
        return None
    feature = data.features["label"]
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
        return sorted(set(data["label"]))
    raise ValueError(
        f"the 'label' column has type {feature}; labels must be strings or a ClassLabel. For integer labels, "
        "name the classes: data = data.cast_column('label', datasets.ClassLabel(names=[...]))."
    )


def label_text(label: Any, names: Sequence[str] | None) -> str:
    if isinstance(label, torch.Tensor) and label.ndim == 0:  # a dataset formatted as torch by the user
        label = label.item()
    return names[label] if isinstance(label, (int, np.integer)) and names else str(label)


def row_labels(data: datasets.Dataset) -> list[str]:
    """Each row's label as its class name."""
    names = label_names(data)
    return [label_text(label, names) for label in data.with_format(None)["label"]]


def label_indices(data: datasets.Dataset, names: Sequence[str], what: str = "dataset") -> list[int]:
    """Each row's label as an index into `names` (the adapter's labels). A label the adapter does not
    know is an error: scoring it against other candidates would change the task without a word."""
    index = {name: i for i, name in enumerate(names)}
    labels = row_labels(data)
    unknown = sorted(set(labels) - set(index))
    if unknown:
        raise ValueError(
            f"{what} has labels {unknown} that the adapter does not know; its labels are {list(names)}. "
            "Drop or rename those rows (data.filter(...)), or train on them first."
        )
    return [index[label] for label in labels]


def align_labels(data: datasets.Dataset, names: Sequence[str], what: str = "dataset") -> datasets.Dataset:
    """`data` with its ClassLabel indices renumbered to `names` (string labels are matched by name)."""
    label_indices(data, names, what)  # unknown labels are an error
    feature = data.features["label"]
    if not isinstance(feature, datasets.ClassLabel) or list(feature.names) == list(names):
        return data
    return data.align_labels_with_mapping({name: i for i, name in enumerate(names)}, "label")


def class_weights(data: datasets.Dataset, names: Sequence[str], spec: str | dict[str, float]) -> dict[str, float]:
    """Per-class loss weights in scikit-learn's convention: 'balanced' gives n_samples / (n_classes *
    count); a dict gives its labels' weights and 1 to the others."""
    from sklearn.utils.class_weight import compute_class_weight

    if isinstance(spec, dict):
        unknown = sorted(set(spec) - set(names))
        if unknown:
            raise ValueError(f"class_weight names {unknown}, which are not labels of the data; its labels are "
                             f"{list(names)}.")
    weights = compute_class_weight(spec, classes=np.array(list(names)), y=np.array(row_labels(data)))
    return {name: float(w) for name, w in zip(names, weights)}


def load_data(source: str, split: str = "train") -> datasets.Dataset:
    """A dataset from where users keep one: an `imagefolder` directory (class sub-folders), a CSV /
    JSON Lines file with an image-path column, a folder written by `save_to_disk`, or a Hub dataset id."""
    if os.path.isdir(source):
        if any(os.path.exists(os.path.join(source, name)) for name in ("dataset_info.json", "state.json")):
            return datasets.load_from_disk(source)
        loaded = datasets.load_dataset("imagefolder", data_dir=source)
    elif source.endswith((".csv", ".json", ".jsonl")):
        builder = "csv" if source.endswith(".csv") else "json"
        data = datasets.load_dataset(builder, data_files=source, split="train")
        root = os.path.dirname(os.path.abspath(source))
        if "image" in data.column_names:  # image paths are relative to the file
            data = data.map(lambda row: {"image": os.path.join(root, row["image"])})
            data = data.cast_column("image", datasets.Image())
        return data
    else:
        loaded = datasets.load_dataset(source)
    if split not in loaded:
        raise ValueError(f"{source} has splits {list(loaded)}, not {split!r}.")
    return loaded[split]


def split_for_eval(
    data: datasets.Dataset, test_size: float = 0.1, seed: int = 0
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Hold out a validation split, stratified by class when the data has class labels."""
    stratify = "label" if isinstance(data.features.get("label"), datasets.ClassLabel) else None
    if stratify is None and "label" in data.column_names:
        data = data.class_encode_column("label")
        stratify = "label"
    parts = data.train_test_split(test_size=test_size, stratify_by_column=stratify, seed=seed)
    return parts["train"], parts["test"]
