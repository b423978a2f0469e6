"""Data in the shapes users keep it, offline metrics, and the pictures and logs a run leaves behind.

What each test proves:
- csv_and_jsonl_with_relative_image_paths: CSV / JSON Lines files with image paths relative to the file load as
  images.
- imagefolder_and_saved_dataset: an imagefolder gets sorted class names; a save_to_disk folder loads; a missing split
  is named.
- stratified_split_keeps_every_class_in_both_parts: the held-out part has every class in proportion; string labels
  become a ClassLabel.
- offline_metrics: accuracy, per-class precision / recall / F1, macro-F1, confusion matrix, exact match, BLEU and
  ROUGE-L by hand.
- classification_metrics_weight_f1_by_class_support: weighted F1 weighs each class's F1 by its support (unequal
  classes).
- fit_leaves_curves_confusion_matrix_and_tensorboard_logs: a run leaves both PNGs and TensorBoard event files.
- fit_and_evaluate_accept_cached_features_formatted_as_torch: cached features formatted as torch train and evaluate as
  plain ones.
"""

from __future__ import annotations

import csv
import json
import os

import datasets
import numpy as np
import pytest
import torch
from conftest import COLOURS, colour_dataset, colour_image
from PIL import Image

from vlm_adapters import attach, load_data, split_for_eval
from vlm_adapters.metrics import classification_metrics, text_metrics


@pytest.fixture
def image_files(tmp_path):
    rng = np.random.default_rng(3)
    rows = []
    for name in COLOURS:
        for i in range(4):
            path = tmp_path / "images" / f"{name}_{i}.png"
            path.parent.mkdir(exist_ok=True)
            colour_image(name, rng).save(path)
            rows.append({"image": f"images/{path.name}", "label": name, "answer": f"A {name} square."})
    return tmp_path, rows


def test_csv_and_jsonl_with_relative_image_paths(image_files):
    root, rows = image_files
    with open(root / "data.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["image", "label", "answer"])
        writer.writeheader()
        writer.writerows(rows)
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name in ("data.csv", "data.jsonl"):
        data = load_data(str(root / name))
        assert len(data) == 12 and isinstance(data.features["image"], datasets.Image)
        assert isinstance(data[0]["image"], Image.Image) and data[0]["label"] == "red"


def test_imagefolder_and_saved_dataset(tmp_path):
    rng = np.random.default_rng(4)
    for name in COLOURS:
        os.makedirs(tmp_path / "folder" / name)
        for i in range(3):
            colour_image(name, rng).save(tmp_path / "folder" / name / f"{i}.png")
    data = load_data(str(tmp_path / "folder"))
    assert data.features["label"].names == sorted(COLOURS) and len(data) == 9
    colour_dataset(2).save_to_disk(str(tmp_path / "saved"))
    assert len(load_data(str(tmp_path / "saved"))) == 6
    with pytest.raises(ValueError, match="not 'validation'"):
        load_data(str(tmp_path / "folder"), split="validation")


def test_stratified_split_keeps_every_class_in_both_parts():
    data = colour_dataset(10)
    train, held_out = split_for_eval(data, test_size=0.3, seed=0)
    assert len(train) + len(held_out) == 30
    assert sorted(set(held_out["label"])) == [0, 1, 2] and np.bincount(held_out["label"]).tolist() == [3, 3, 3]
    strings = datasets.Dataset.from_dict({"image": data["image"], "label": [["a", "b", "c"][i] for i in data["label"]]})
    _, held_out = split_for_eval(strings, test_size=0.3)
    assert held_out.features["label"].names == ["a", "b", "c"]  # string labels became a ClassLabel


def test_offline_metrics():
    metrics = classification_metrics([0, 0, 1, 1, 2, 2], [0, 0, 1, 2, 2, 2], ["a", "b", "c"])
    assert metrics["accuracy"] == pytest.approx(5 / 6)
    assert metrics["per_class"]["b"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}
    assert metrics["macro_f1"] == pytest.approx((1 + 2 / 3 + 0.8) / 3)
    assert metrics["confusion_matrix"] == [[2, 0, 0], [0, 1, 1], [0, 0, 2]]
    same = text_metrics(["a red square on grey"], ["a red square on grey"])
    assert same == {"exact_match": 1.0, "bleu": pytest.approx(100.0), "rougeL": pytest.approx(1.0)}
    other = text_metrics(["a red square on grey"], ["a blue circle"])
    assert other["exact_match"] == 0.0 and other["bleu"] < 20 and 0 < other["rougeL"] < 0.5


def test_classification_metrics_weight_f1_by_class_support():
    metrics = classification_metrics([0, 0, 0, 1], [0, 0, 1, 1], ["a", "b"])
    # class a: precision 1, recall 2/3, F1 0.8 (3 rows); class b: precision 1/2, recall 1, F1 2/3 (1 row)
    assert metrics["accuracy"] == pytest.approx(0.75)
    assert metrics["macro_f1"] == pytest.approx((0.8 + 2 / 3) / 2)
    assert metrics["weighted_f1"] == pytest.approx((3 * 0.8 + 2 / 3) / 4)
    assert metrics["confusion_matrix"] == [[2, 1], [0, 1]]


def test_fit_leaves_curves_confusion_matrix_and_tensorboard_logs(tmp_path, llm_dir, vit_dir, colours):
    train, test = colours
    model = attach(vit_dir, llm_dir)
    out = tmp_path / "run"
    model.fit(train, test, output_dir=str(out), max_steps=4, logging_steps=1, eval_strategy="steps", eval_steps=2,
              save_strategy="no", report_to="tensorboard", learning_rate=5e-3, projector_lr=5e-3, disable_tqdm=True)
    for name in ("training_curves.png", "confusion_matrix.png"):
        with Image.open(out / name) as picture:
            assert picture.size[0] > 200 and picture.size[1] > 200
    events = [f for _, _, files in os.walk(out) for f in files if f.startswith("events.out.tfevents")]
    assert events, "report_to='tensorboard' should write TensorBoard event files"


def test_fit_and_evaluate_accept_cached_features_formatted_as_torch(tmp_path, llm_dir, vit_dir):
    """Cached features as a dataset the user formatted as torch (labels come out as tensors)."""
    from vlm_adapters.features import with_image_features

    model = attach(vit_dir, llm_dir)
    shape = (model.projector.num_vision_tokens, model.config.vision_signature["hidden_size"])
    plain = with_image_features(colour_dataset(3, seed=4), model.vision, token_shape=shape, cache_dir=str(tmp_path))
    formatted = plain.with_format("torch")
    assert isinstance(formatted[0]["label"], torch.Tensor)
    model.fit(formatted, output_dir=str(tmp_path / "run"), max_steps=2, save_strategy="no", disable_tqdm=True)
    assert model.evaluate(formatted)["accuracy"] == model.evaluate(plain)["accuracy"]


def _folder(root, layout: dict[str, int], rng) -> None:
    """`layout`: {"split/class" or "class": number of PNGs}."""
    for where, count in layout.items():
        os.makedirs(root / where, exist_ok=True)
        for i in range(count):
            colour_image(where.split("/")[-1], rng).save(root / where / f"{i}.png")


def test_split_folders_are_found_share_class_indices_and_keep_dicom(tmp_path):
    import pydicom

    from vlm_adapters.images import load_image
    from vlm_adapters.sources import load_splits

    rng = np.random.default_rng(5)
    _folder(tmp_path, {"train/red": 3, "train/green": 2, "train/blue": 2, "Test/red": 1, "Test/blue": 2,
                       "val/green": 1}, rng)
    dicom = os.path.join(os.path.dirname(pydicom.__file__), "data", "test_files", "CT_small.dcm")
    os.makedirs(tmp_path / "train" / "red" / "scans")
    with open(dicom, "rb") as src, open(tmp_path / "train" / "red" / "scans" / "ct.DCM", "wb") as dst:
        dst.write(src.read())  # DICOM, upper-case suffix, one level deeper: still a red image
    (tmp_path / "train" / "red" / "notes.txt").write_text("not an image")
    (tmp_path / "train" / "red" / ".hidden.png").write_bytes(b"")

    splits = load_splits(str(tmp_path))
    assert set(splits) == {"train", "test", "validation"}
    for split in splits.values():  # one ClassLabel for every split, even where a class is missing
        assert split.features["label"].names == ["blue", "green", "red"]
    train = splits["train"]
    assert len(train) == 8 and sum(row["image"]["path"].endswith("ct.DCM") for row in train) == 1
    assert [train.features["label"].int2str(i) for i in splits["test"]["label"]] == ["blue", "blue", "red"]
    assert load_image(train[-1]["image"]).mode == "RGB"  # paths stay undecoded until load_image reads them
    # no `split` needed: a split source gives the split the caller prefers
    assert len(load_data(str(tmp_path))) == 8
    assert len(load_data(str(tmp_path), prefer=("test", "validation"))) == 3
    assert len(load_data(str(tmp_path / "val"))) == 1  # a flat class folder is its own single split
    with pytest.raises(ValueError, match=r"has splits \['train'\], not 'test'"):
        load_data(str(tmp_path / "val"), split="test")


def test_image_folder_mistakes_are_named_and_changed_files_are_seen(tmp_path):
    from vlm_adapters.sources import load_splits

    rng = np.random.default_rng(6)
    colour_image("red", rng).save(tmp_path / "loose.png")
    with pytest.raises(ValueError, match="holds images directly; put each class's images in a sub-folder"):
        load_data(str(tmp_path))
    (tmp_path / "loose.png").unlink()
    os.makedirs(tmp_path / "red")
    (tmp_path / "red" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="no class sub-folders with image files"):
        load_data(str(tmp_path))
    colour_image("red", rng).save(tmp_path / "red" / "0.png")
    before = load_splits(str(tmp_path))["train"]._fingerprint
    assert load_splits(str(tmp_path))["train"]._fingerprint == before  # the feature cache is reused...
    colour_image("red", rng, size=40).save(tmp_path / "red" / "0.png")
    assert load_splits(str(tmp_path))["train"]._fingerprint != before  # ...until a file changes in place


def test_a_folder_with_metadata_keeps_its_answers(tmp_path):
    rng = np.random.default_rng(7)
    colour_image("red", rng).save(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "answer": "A red square."}) + "\n")
    assert load_data(str(tmp_path))[0]["answer"] == "A red square."


def test_label_map_renames_merges_and_names_unknown_labels(tmp_path):
    from vlm_adapters.sources import read_label_map, rename_labels

    data = colour_dataset(2)  # red, green, blue as a ClassLabel
    renamed = rename_labels(data, {"red": "warm", "green": "cool", "blue": "cool"})
    assert renamed.features["label"].names == ["warm", "cool"]
    assert [renamed.features["label"].int2str(i) for i in renamed["label"]] == ["warm"] * 2 + ["cool"] * 4
    strings = datasets.Dataset.from_dict({"image": data["image"], "label": ["red", "red", "x", "x", "y", "y"]})
    assert rename_labels(strings, {"x": "red"})["label"] == ["red"] * 4 + ["y"] * 2
    with pytest.raises(ValueError, match=r"renames \['purple'\], which are not labels of this data"):
        rename_labels(data, {"purple": "violet"})
    (tmp_path / "bad.json").write_text("{'red': 'warm'}")
    with pytest.raises(ValueError, match="is not valid JSON"):
        read_label_map(str(tmp_path / "bad.json"))
    (tmp_path / "list.json").write_text('["red"]')
    with pytest.raises(ValueError, match="must hold a JSON object of label -> new label"):
        read_label_map(str(tmp_path / "list.json"))


def test_label_rows_and_answer_rows_mix_and_bad_rows_are_named():
    from vlm_adapters.data import as_dataset, image_counts, label_names, row_kinds

    rng = np.random.default_rng(5)
    red, blue = colour_image("red", rng), colour_image("blue", rng)
    mixed = as_dataset([
        {"image": red, "label": "red", "answer": None},
        {"images": [red, blue], "label": None, "answer": "red, then blue", "prompt": "Name both colours."},
        {"image": blue, "label": "blue", "answer": None},
    ])
    assert row_kinds(mixed) == ["label", "answer", "label"] and label_names(mixed) == ["blue", "red"]
    assert image_counts(mixed) == [1, 2, 1]
    problems = [
        ([{"image": red, "label": "red", "answer": "a red square"}], "row 0 has both a 'label' and an 'answer'"),
        ([{"image": red, "label": "red"}, {"image": red, "answer": None}], "row 1 has neither"),
        ([{"image": red, "answer": "x"}, {"image": red, "answer": None}], "row 1 has no 'answer'"),
        ([{"image": red, "images": [red], "label": "red"}], "row 0 has both 'image' and 'images'"),
        ([{"images": [red], "label": "red"}, {"images": [], "label": "red"}], "row 1 has an empty 'images' list"),
        ([{"image": red, "label": "red"}, {"images": None, "label": "red"}], "row 1 has neither 'image'"),
    ]
    for rows, message in problems:
        with pytest.raises(ValueError, match=message):
            as_dataset(rows)
