"""Datasets checked before training: row kinds, images per row, label names.

Examples are rows with an `image`, or `images` (a list: several views in one row), or cached
`image_features`, plus either `label` (class index with a ClassLabel feature, or a string) or
`answer` (free text), and an optional `prompt`. One dataset may mix label rows and answer rows
(both columns present, one of them null in each row), as captions + questions + class labels come.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

# Cached encoder output (`features.py`): [tokens, hidden] per 'image' row, [images, tokens, hidden] per 'images' row.
FEATURES_COLUMN = "image_features"


def as_dataset(data: Any, what: str = "dataset") -> datasets.Dataset:
    """Accept a `datasets.Dataset` or a list of dicts; check it can be trained or evaluated on."""
    if isinstance(data, datasets.DatasetDict):
        raise ValueError(f"{what} is a DatasetDict with splits {list(data)}; pass one split, e.g. data['train'].")
    if isinstance(data, (list, tuple)):
        if not data:
            raise ValueError(f"{what} is empty; it needs at least one example.")
        if not all(isinstance(row, dict) for row in data):
            raise ValueError(f"{what} must be a list of dicts with 'image' and 'label' or 'answer' keys.")
        # from_list takes its columns from the first row; rows of different kinds (label / answer,
        # image / images) have different keys, so every row gets every key (None where it has none).
        keys = list(dict.fromkeys(key for row in data for key in row))
        data = datasets.Dataset.from_list([_string_safe({key: row.get(key) for key in keys}) for row in data])
    if not isinstance(data, datasets.Dataset):
        raise TypeError(f"{what} must be a datasets.Dataset or a list of dicts, got {type(data).__name__}.")
    if len(data) == 0:
        raise ValueError(f"{what} is empty; it needs at least one example.")
    columns = set(data.column_names)
    if not columns & {"image", "images", FEATURES_COLUMN}:
        raise ValueError(f"{what} has columns {sorted(columns)} but needs an 'image' column (or 'images', a list).")
    if not columns & {"label", "answer"}:
        raise ValueError(f"{what} has columns {sorted(columns)} but needs 'label' (classes) or 'answer' (free text).")
    row_kinds(data, what)
    if FEATURES_COLUMN not in columns:
        _check_images(data, what)
    return data


def _column(data: datasets.Dataset, name: str) -> pa.ChunkedArray:
    """One column as Arrow (the dataset's own row order, nothing decoded): checks cost no image decoding."""
    return data.select_columns([name]).with_format("arrow")[:][name]


def _first(mask: pa.ChunkedArray) -> int | None:
    rows = np.flatnonzero(mask.to_numpy(zero_copy_only=False))
    return int(rows[0]) if len(rows) else None


def row_kinds(data: datasets.Dataset, what: str = "dataset") -> list[str]:
    """'label' or 'answer' for each row; a row with both or neither is an error naming it."""
    names = [name for name in ("label", "answer") if name in data.column_names]
    has = {name: pc.invert(pc.is_null(_column(data, name))) for name in names}
    if len(has) == 1:
        (name, present), = has.items()
        if (row := _first(pc.invert(present))) is not None:
            raise ValueError(f"{what}: row {row} has no {name!r}; every row needs one.")
        return [name] * len(data)
    both, neither = pc.and_(has["label"], has["answer"]), pc.invert(pc.or_(has["label"], has["answer"]))
    for mask, problem in ((both, "both a 'label' and an 'answer'"), (neither, "neither a 'label' nor an 'answer'")):
        if (row := _first(mask)) is not None:
            raise ValueError(
                f"{what}: row {row} has {problem}; a row is a label row or an answer row (set the other to None)."
            )
    return ["label" if flag else "answer" for flag in has["label"].to_pylist()]


def _check_images(data: datasets.Dataset, what: str) -> None:
    """Each row has its image(s) in exactly one of 'image' and 'images', and no empty list."""
    if "images" not in data.column_names:
        return
    lengths = _lengths(_column(data, "images"))
    if (row := _first(pc.and_(pc.equal(lengths, 0), pc.invert(pc.is_null(_column(data, "images")))))) is not None:
        raise ValueError(f"{what}: row {row} has an empty 'images' list; give every row at least one image.")
    if "image" in data.column_names:
        single = pc.invert(pc.is_null(_column(data, "image")))
        many = pc.greater(lengths, 0)
        for mask, problem in ((pc.and_(single, many), "both 'image' and 'images'"),
                              (pc.invert(pc.or_(single, many)), "neither 'image' nor 'images'")):
            if (row := _first(mask)) is not None:
                raise ValueError(f"{what}: row {row} has {problem}; give each row one of them (the other None).")


def _lengths(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """Length of each list in a column (0 for a null row; a column of nulls only has type null)."""
    if isinstance(column.type, pa.ExtensionType):  # datasets' ArrayXD: the list sits in the storage
        column = pa.chunked_array([chunk.storage for chunk in column.chunks], column.type.storage_type)
    if pa.types.is_null(column.type):
        return pa.chunked_array([pa.array([0] * len(column), pa.int32())])
    return pc.fill_null(pc.list_value_length(column), 0)


def row_images(example: dict[str, Any]) -> list[Any]:
    """The images of one row, in order: its 'images' list, else its one 'image'."""
    many = example.get("images")
    return list(many) if many is not None else [example["image"]]


def image_counts(data: datasets.Dataset) -> list[int]:
    """How many images each row holds (from Arrow list lengths: nothing decoded)."""
    name = FEATURES_COLUMN if FEATURES_COLUMN in data.column_names else "images"
    if name not in data.column_names or isinstance(data.features[name], datasets.Array2D):
        return [1] * len(data)
    return [n or 1 for n in _lengths(_column(data, name)).to_pylist()]  # null 'images': the row's one 'image'


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
    """Class names from a ClassLabel feature or the sorted set of string labels (answer rows' null
    labels left out); None for free text."""
    if "label" not in data.column_names:
        return None
    feature = data.features["label"]
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
        return sorted(set(_column(data, "label").drop_null().to_pylist())) or None
    if isinstance(feature, datasets.Value) and feature.dtype == "null":  # every row is an answer row
        return None
    raise ValueError(
        f"the 'label' column has type {feature}; labels must be strings or a ClassLabel. For integer labels, "
        "name the classes: data = data.cast_column('label', datasets.ClassLabel(names=[...]))."
    )


def label_text(label: Any, names: Sequence[str] | None) -> str:
    if isinstance(label, torch.Tensor) and label.ndim == 0:  # a dataset formatted as torch by the user
        label = label.item()
    return names[label] if isinstance(label, (int, np.integer)) and names else str(label)



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
