"""Datasets from where users keep them: image folders (class sub-folders, optionally inside train/
test/ validation/ split folders; DICOM files included), CSV / JSON Lines files with image paths,
`save_to_disk` folders, Hub dataset ids; and label maps that rename classes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import datasets

from .data import label_names
from .images import is_image_file, walk_files

# Sub-folder names read as splits of an image folder (any case), as the Hub names them.
SPLIT_FOLDERS = {"train": "train", "training": "train", "test": "test", "testing": "test", "validation": "validation",
                 "valid": "validation", "val": "validation", "dev": "validation"}

METADATA_FILES = ("metadata.csv", "metadata.jsonl", "metadata.parquet")
EXAMPLE_MAP = '{"PNEUMONIA": "pneumonia", "NORMAL": "normal"}'


def load_data(source: str, split: str | None = None, prefer: Sequence[str] = ("train",)) -> datasets.Dataset:
    """A dataset from where users keep one: an image folder (class sub-folders, optionally inside
    train/ test/ validation/ split folders), a CSV / JSON Lines file with an image-path column, a
    folder written by `save_to_disk`, or a Hub dataset id.

    `split` names the split to take; without it a single-split source gives its one split and a
    split source the first of `prefer` it has (e.g. `("test", "validation")` for an evaluation)."""
    return pick_split(load_splits(source), source, split, prefer)


def load_splits(source: str) -> dict[str, datasets.Dataset]:
    """Every split of `source` by name; a source without splits (a flat class folder, a CSV file, a
    saved Dataset) is one split named 'train', as datasets' own loaders name it."""
    if os.path.isdir(source):
        if any(os.path.exists(os.path.join(source, name)) for name in ("dataset_info.json", "state.json")):
            loaded = datasets.load_from_disk(source)
            return dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
        if _has_metadata(source):  # captions / answers beside the images: datasets' builder reads those
            return dict(datasets.load_dataset("imagefolder", data_dir=source))
        return image_folder_splits(source)
    if source.endswith((".csv", ".json", ".jsonl")):
        builder = "csv" if source.endswith(".csv") else "json"
        data = datasets.load_dataset(builder, data_files=source, split="train")
        root = os.path.dirname(os.path.abspath(source))
        if "image" in data.column_names:  # image paths are relative to the file
            data = data.map(lambda row: {"image": os.path.join(root, row["image"])})
            data = data.cast_column("image", datasets.Image())
        return {"train": data}
    return dict(datasets.load_dataset(source))


def pick_split(
    splits: dict[str, datasets.Dataset], source: str, split: str | None, prefer: Sequence[str]
) -> datasets.Dataset:
    if split is not None:
        if split not in splits:
            raise ValueError(f"{source} has splits {list(splits)}, not {split!r}.")
        return splits[split]
    if len(splits) == 1:
        return next(iter(splits.values()))
    for name in prefer:
        if name in splits:
            return splits[name]
    raise ValueError(f"{source} has splits {list(splits)} and none of {list(prefer)}; name one with split=.")


def _has_metadata(root: str) -> bool:
    return any(name in METADATA_FILES for _, _, files in os.walk(root) for name in files)


def image_folder_splits(root: str) -> dict[str, datasets.Dataset]:
    """Class folders of images, walked here rather than by datasets' `imagefolder` builder, which
    skips DICOM: every file `is_image_file` accepts counts. Sub-folders that are all split names
    (train/ test/ val/ ...) are splits; otherwise they are the classes. Class indices are shared by
    all splits, and the images stay file paths that `load_image` decodes when they are used."""
    subfolders = _visible(root, dirs=True)
    if subfolders and all(name.lower() in SPLIT_FOLDERS for name in subfolders):
        files = {SPLIT_FOLDERS[name.lower()]: _class_files(os.path.join(root, name)) for name in subfolders}
    else:
        files = {"train": _class_files(root)}
    names = sorted({label for per_split in files.values() for label in per_split})
    return {split: _paths_dataset(per_split, names) for split, per_split in files.items()}


def _visible(folder: str, dirs: bool) -> list[str]:
    return sorted(
        name for name in os.listdir(folder)
        if not name.startswith(".") and os.path.isdir(os.path.join(folder, name)) == dirs
    )


def _class_files(folder: str) -> dict[str, list[str]]:
    """{class folder name: sorted image paths under it, at any depth}."""
    if any(is_image_file(name) for name in _visible(folder, dirs=False)):
        raise ValueError(
            f"{folder} holds images directly; put each class's images in a sub-folder named after the class "
            "(e.g. normal/, pneumonia/)."
        )
    found = {}
    for label in _visible(folder, dirs=True):
        paths = [path for path in walk_files(os.path.join(folder, label)) if is_image_file(path)]
        if paths:
            found[label] = paths
    if not found:
        raise ValueError(f"{folder} has no class sub-folders with image files in them.")
    return found


def _paths_dataset(files: dict[str, list[str]], names: list[str]) -> datasets.Dataset:
    """An `image` column of undecoded paths + a ClassLabel, fingerprinted by path, size and mtime (as
    datasets fingerprints local data files) so the feature cache sees a file that changed in place."""
    from datasets.fingerprint import Hasher

    paths = [path for label in files for path in files[label]]
    labels = [names.index(label) for label in files for _ in files[label]]
    features = datasets.Features({"image": datasets.Image(decode=False), "label": datasets.ClassLabel(names=names)})
    data = datasets.Dataset.from_dict(
        {"image": [{"path": p, "bytes": None} for p in paths], "label": labels}, features=features
    )
    stats = [(p, os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in paths]
    return datasets.Dataset(data.data, info=data.info, fingerprint=Hasher.hash([stats, names]))


def read_label_map(path: str) -> dict[str, str]:
    """A JSON object {label in the data: label to use}, checked."""
    with open(path, encoding="utf-8") as fh:
        try:
            mapping = json.load(fh)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON ({err}); write an object such as {EXAMPLE_MAP}.") from err
    if not isinstance(mapping, dict) or not all(isinstance(v, str) and v for v in mapping.values()):
        raise ValueError(f"{path} must hold a JSON object of label -> new label (non-empty strings).")
    return mapping


def rename_labels(data: datasets.Dataset, mapping: dict[str, str]) -> datasets.Dataset:
    """Labels renamed by `mapping` (labels it does not name keep theirs; two renamed alike merge)."""
    names = label_names(data)
    if names is None:
        raise ValueError("a label map was given, but the data has no 'label' column to rename.")
    unknown = sorted(set(mapping) - set(names))
    if unknown:
        raise ValueError(f"the label map renames {unknown}, which are not labels of this data: {names}.")
    if not isinstance(data.features["label"], datasets.ClassLabel):
        return data.map(lambda row: {"label": mapping.get(row["label"], row["label"])})
    renamed = [mapping.get(name, name) for name in names]
    merged = list(dict.fromkeys(renamed))  # first-seen order: the original order when nothing merges
    lookup = [merged.index(name) for name in renamed]
    features = data.features.copy()
    features["label"] = datasets.ClassLabel(names=merged)
    return data.map(lambda batch: {"label": [lookup[i] for i in batch["label"]]}, batched=True, features=features)
