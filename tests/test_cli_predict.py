"""`vlm-adapters predict` on a real-looking folder, with a tiny adapter.

What each test proves:
- test_every_file_gets_a_row_and_bad_ones_a_reason: a folder at any depth (PNG, JPEG, DICOM, a text
  file, a truncated and an empty PNG, a hidden file) gives one row per visible file, in order; the bad
  ones carry the reason load_image gives, the good ones every label's probability, equal to `classify`,
  and the description `describe` gives; the model is called once per batch, not once per image.
- test_top_k_and_abstain_below: --top_k fills only the k most likely labels' columns; --abstain_below
  writes "abstained" with the top label in the reason.
- test_an_interrupted_run_keeps_its_rows_and_resumes: a run stopped in its second batch leaves the
  first batch on disk; --resume (after a line cut in half by the kill) writes each remaining file
  once and ends with the rows of an uninterrupted run; an existing output is not overwritten by
  accident, and a resume with other columns is refused.
- test_globs_and_empty_matches: a glob selects files; a pattern matching nothing is a clear error.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import colour_image

from vlm_adapters import attach, load
from vlm_adapters.cli import main
from vlm_adapters.model import VisionLanguageModel

LABELS = ["red", "green", "blue"]


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, llm_dir, vit_dir) -> str:
    model = attach(vit_dir, llm_dir)
    model.config.labels = list(LABELS)
    return model.save_pretrained(tmp_path_factory.mktemp("adapter") / "colours")


@pytest.fixture(scope="module")
def reference(adapter):
    return load(adapter)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("scans")
    rng = np.random.default_rng(2)
    for i, name in enumerate(LABELS * 2):
        colour_image(name, rng).save(root / f"{i}_{name}.png")
    (root / "deeper").mkdir()
    colour_image("red", rng).convert("RGB").save(root / "deeper" / "photo.JPG")
    shutil.copy(Path(pydicom.__file__).parent / "data" / "test_files" / "CT_small.dcm", root / "deeper" / "ct.dcm")
    (root / "notes.txt").write_text("not an image")
    (root / "truncated.png").write_bytes((root / "0_red.png").read_bytes()[:150])
    (root / "empty.png").write_bytes(b"")
    (root / ".DS_Store").write_bytes(b"\0\0")
    return root


def visible_files(root: Path) -> list[str]:
    return sorted(str(p) for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture
def calls(monkeypatch) -> list[int]:
    """The number of images of each `classify` call (the real method runs)."""
    sizes: list[int] = []
    original = VisionLanguageModel.classify

    def spy(self, images, *args, **kwargs):
        sizes.append(len(images))
        return original(self, images, *args, **kwargs)

    monkeypatch.setattr(VisionLanguageModel, "classify", spy)
    return sizes


def test_every_file_gets_a_row_and_bad_ones_a_reason(tmp_path, adapter, reference, folder, calls):
    out = tmp_path / "predictions.csv"
    assert main(["predict", "--adapter", adapter, "--images", str(folder), "--output", str(out),
                 "--batch_size", "5", "--max_new_tokens", "3", "--no_progress"]) == 0
    assert calls == [5, 3]  # batches of 5 files: 5 images, 3 images + 2 bad files, then only bad files
    rows = read_csv(out)
    assert list(rows[0]) == ["image", "label", "probability", "description", "reason", "p_red", "p_green", "p_blue"]
    assert [row["image"] for row in rows] == visible_files(folder)  # .DS_Store left out, the rest in order
    by_name = {Path(row["image"]).name: row for row in rows}
    assert by_name["notes.txt"]["reason"] == "skipped: not an image file (suffix .txt)"
    assert "the image is truncated or corrupt" in by_name["truncated.png"]["reason"]
    assert "the file is empty (0 bytes)" in by_name["empty.png"]["reason"]
    good = [row for row in rows if not row["reason"]]
    assert len(good) == 8 and {Path(row["image"]).suffix for row in good} == {".png", ".JPG", ".dcm"}
    # the same batches of 5 as the CLI: batch shape changes the last float digits on some CPUs
    expected = reference.classify([row["image"] for row in good], LABELS, batch_size=5)
    for row, probs in zip(good, expected):
        assert {label: float(row[f"p_{label}"]) for label in LABELS} == pytest.approx(probs, abs=1e-6)
        assert row["label"] == next(iter(probs)) and float(row["probability"]) == pytest.approx(max(probs.values()))
    assert [row["description"] for row in good] == reference.describe(
        [row["image"] for row in good], max_new_tokens=3, batch_size=5
    )
    assert len(rows) == 11


def test_top_k_and_abstain_below(tmp_path, adapter, folder):
    out = tmp_path / "top.jsonl"
    assert main(["predict", "--adapter", adapter, "--images", str(folder / "*.png"), "--output", str(out),
                 "--top_k", "1", "--abstain_below", "0.99", "--no_describe", "--no_progress"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    good = [row for row in rows if not row["reason"].startswith("skipped")]
    assert len(good) == 6
    for row in good:
        filled = {label: row[f"p_{label}"] for label in LABELS if row[f"p_{label}"] is not None}
        assert list(filled.values()) == [row["probability"]]  # only the top label's probability
        top = next(iter(filled))
        if row["probability"] < 0.99:
            assert row["label"] == "abstained" and row["reason"].endswith(f"< 0.99 (top label: {top})")
        else:
            assert row["label"] == top and row["reason"] == ""
    assert 0 < sum(row["label"] == "abstained" for row in good) < 6  # both cases happen


def test_an_interrupted_run_keeps_its_rows_and_resumes(tmp_path, adapter, folder, monkeypatch):
    options = ["--adapter", adapter, "--images", str(folder), "--batch_size", "3", "--no_describe", "--no_progress"]
    whole = tmp_path / "whole.csv"
    main(["predict", *options, "--output", str(whole)])

    out = tmp_path / "run.csv"
    original = VisionLanguageModel.classify
    seen = []

    def killed_in_second_batch(self, images, *args, **kwargs):
        seen.append(len(images))
        if len(seen) == 2:
            raise KeyboardInterrupt
        return original(self, images, *args, **kwargs)

    monkeypatch.setattr(VisionLanguageModel, "classify", killed_in_second_batch)
    with pytest.raises(KeyboardInterrupt):
        main(["predict", *options, "--output", str(out)])
    monkeypatch.setattr(VisionLanguageModel, "classify", original)
    assert read_csv(out) == read_csv(whole)[:3]  # the first batch is on disk
    with open(out, "a", encoding="utf-8") as fh:
        fh.write(f"{visible_files(folder)[3]},re")  # a row cut in half by a kill

    with pytest.raises(FileExistsError, match="pass --resume to continue it or --overwrite"):
        main(["predict", *options, "--output", str(out)])
    main(["predict", *options, "--output", str(out), "--resume"])
    assert read_csv(out) == read_csv(whole)  # each file once, as an uninterrupted run wrote them

    with pytest.raises(ValueError, match="has columns .* but this run writes"):
        main(["predict", *options, "--output", str(out), "--resume", "--labels", "red,blue"])
    main(["predict", *options, "--output", str(out), "--overwrite", "--labels", "red,blue"])
    assert list(read_csv(out)[0])[-2:] == ["p_red", "p_blue"]


def test_globs_and_empty_matches(tmp_path, adapter, folder):
    out = tmp_path / "glob.csv"
    main(["predict", "--adapter", adapter, "--images", str(folder / "**" / "*.dcm"), "--output", str(out),
          "--no_describe", "--no_progress"])
    assert [Path(row["image"]).name for row in read_csv(out)] == ["ct.dcm"]
    with pytest.raises(FileNotFoundError, match="no files match"):
        main(["predict", "--adapter", adapter, "--images", str(folder / "*.nothing"), "--output", str(out),
              "--overwrite"])
