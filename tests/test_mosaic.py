"""The Fashion-MNIST mosaic task: reproducible mosaics from the right split, questions with the right
answers, captions that parse back (also from messy generated text), and metrics on known predictions."""

from __future__ import annotations

import gzip
import os

import numpy as np
import pytest
from conftest import needs_fashion_mnist

from vlm_adapters.demo import assets
from vlm_adapters.demo.mosaic_data import (
    POSITIONS,
    ask,
    build_mosaics,
    caption,
    caption_metrics,
    parse_answer,
    parse_caption,
    question_metrics,
    task_rows,
    worked_answer,
)
from vlm_adapters.demo.mosaic_report import SECTION_END, SECTION_START, write_results_section

HAND_MADE = ["Sneaker", "Bag", "Sandal", "Trouser"]


def _split_items(prefix: str) -> dict[bytes, str]:
    """Every item of a split's IDX files: pixel bytes -> class name."""
    with gzip.open(os.path.join(assets.FASHION_MNIST_ROOT, f"{prefix}-images-idx3-ubyte.gz")) as fh:
        images = np.frombuffer(fh.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(os.path.join(assets.FASHION_MNIST_ROOT, f"{prefix}-labels-idx1-ubyte.gz")) as fh:
        labels = np.frombuffer(fh.read(), np.uint8, offset=8)
    return {image.tobytes(): assets.FASHION_MNIST_LABELS[label] for image, label in zip(images, labels)}


def _cells(image: object) -> list[np.ndarray]:
    grid = np.asarray(image)
    return [grid[r : r + 28, c : c + 28] for r in (0, 28) for c in (0, 28)]


@needs_fashion_mnist
def test_mosaics_are_reproducible_from_their_seed() -> None:
    first, again, other = (build_mosaics("train", 12, seed=seed) for seed in (5, 5, 6))
    assert first["cells"] == again["cells"]
    np.testing.assert_array_equal(*(np.stack([np.asarray(i) for i in m["image"]]) for m in (first, again)))
    assert first["cells"] != other["cells"]
    assert first[0]["image"].size == (56, 56) and first[0]["image"].mode == "L"


@needs_fashion_mnist
@pytest.mark.parametrize("split, prefix", [("train", "train"), ("test", "t10k")])
def test_each_cell_is_an_item_of_its_split_with_its_class(split: str, prefix: str) -> None:
    items = _split_items(prefix)
    mosaics = build_mosaics(split, 25, seed=0)
    seen = set()
    for row in mosaics:
        for pixels, name in zip(_cells(row["image"]), row["cells"], strict=True):
            assert items.get(pixels.tobytes()) == name
            seen.add(pixels.tobytes())
    assert len(seen) == 100  # each item used once
    if split == "test":
        train = _split_items("train")
        assert sum(key in train for key in seen) == 0


def test_caption_parses_back_to_its_cells() -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        cells = [assets.FASHION_MNIST_LABELS[i] for i in rng.integers(10, size=4)]
        assert parse_caption(caption(cells)) == cells
    assert caption(HAND_MADE) == "top left: Sneaker; top right: Bag; bottom left: Sandal; bottom right: Trouser"


@pytest.mark.parametrize(
    "text, cells",
    [
        ("Bottom Right : trousers. TOP-LEFT: sneakers,  top right - bag; bottom left: sandal", HAND_MADE),
        ("upper left: t-shirt; upper right: ankle boot; lower left: Shirt; lower right: T-shirt/top",
         ["T-shirt/top", "Ankle boot", "Shirt", "T-shirt/top"]),
        ("top left: Coat; top right: Coat; top left: Bag", ["Coat", "Coat", None, None]),
        ("This image shows Sneaker.", [None, None, None, None]),
        ("top left: a hat; top right: Dress", [None, "Dress", None, None]),
    ],
)
def test_messy_generated_captions_parse(text: str, cells: list) -> None:
    assert parse_caption(text) == cells


def test_each_question_type_answers_the_hand_made_mosaic() -> None:
    rng = np.random.default_rng(0)
    whats = {ask("what", HAND_MADE, rng)[1:] for _ in range(40)}
    assert whats == {(f"What is in the {p}?", c) for p, c in zip(POSITIONS, HAND_MADE)}
    yes_no = [ask("yes_no", HAND_MADE, rng)[1:] for _ in range(200)]
    assert ("Is there a bag?", "yes") in yes_no and ("Is there a coat?", "no") in yes_no
    assert ("Is there an ankle boot?", "no") in yes_no
    assert all((answer == "yes") == any(c.lower() in q for c in HAND_MADE) for q, answer in yes_no)
    assert 80 < sum(answer == "yes" for _, answer in yes_no) < 120  # balanced
    assert ask("count", HAND_MADE, rng) == ("count", "How many shoes are there?", "2")
    assert ask("count", ["Ankle boot"] * 4, rng)[2] == "4"
    wheres = {ask("where", HAND_MADE, rng)[1:] for _ in range(40)}
    assert ("Where is the bag?", "top right") in wheres and ("Where is the trouser?", "bottom right") in wheres
    # "where" only asks about a class present exactly once: the sneaker, never a duplicated bag
    assert {ask("where", ["Bag", "Bag", "Sneaker", "Bag"], rng)[1:] for _ in range(10)} == {
        ("Where is the sneaker?", "bottom left")
    }
    assert ask("where", ["Bag", "Bag", "Coat", "Coat"], rng)[0] == "what"


def test_task_rows_hold_a_caption_and_every_question_type() -> None:
    import datasets

    mosaics = datasets.Dataset.from_dict({"cells": [HAND_MADE, ["Coat"] * 4]})
    rows = task_rows(mosaics, questions=4, seed=0)
    assert len(rows) == 10
    text = caption(HAND_MADE)
    assert rows[0] == dict(
        mosaic=0, prompt="Describe this image.", answer=text, truth=text, question_type="caption", cells=HAND_MADE
    )
    assert all(r["answer"] == r["truth"] for r in rows)
    assert sorted(r["question_type"] for r in rows[1:5]) == sorted(["what", "yes_no", "count", "where"])
    assert [r["question_type"] for r in rows[6:]].count("what") == 2  # four coats: no "where" question
    assert task_rows(mosaics, 4, seed=0) == rows
    listed = task_rows(mosaics, 4, seed=0, answer_style="listed")
    assert [r["truth"] for r in listed] == [r["truth"] for r in rows]
    assert listed[1]["answer"] == f"{text}. Answer: {rows[1]['truth']}"
    worked = task_rows(mosaics, 4, seed=0, answer_style="worked")
    assert [r["truth"] for r in worked] == [r["truth"] for r in rows] and worked[0] == rows[0]
    for row in (r for r in worked if r["question_type"] != "caption"):  # each parses to its own truth
        assert parse_answer(row["question_type"], row["answer"]) == row["truth"], row
    with pytest.raises(ValueError, match="answer_style"):
        task_rows(mosaics, 1, answer_style="chatty")


def test_worked_answers_walk_the_cells_with_a_running_value() -> None:
    """Each step names a cell and the value so far: found yet, shoes so far, where found."""
    cells = ["Sneaker", "Bag", "T-shirt/top", "Ankle boot"]
    assert worked_answer("what", "What is in the bottom left?", "T-shirt/top", cells) == (
        "bottom left: T-shirt/top. Answer: T-shirt/top"
    )
    assert worked_answer("yes_no", "Is there a t-shirt/top?", "yes", cells) == (
        "top left: Sneaker, no; top right: Bag, no; bottom left: T-shirt/top, yes; bottom right: Ankle boot, yes. "
        "Answer: yes"
    )
    assert worked_answer("yes_no", "Is there a shirt?", "no", cells).endswith("Ankle boot, no. Answer: no")
    assert worked_answer("count", "How many shoes are there?", "2", cells) == (
        "top left: Sneaker, 1; top right: Bag, 1; bottom left: T-shirt/top, 1; bottom right: Ankle boot, 2. Answer: 2"
    )
    assert worked_answer("where", "Where is the bag?", "top right", cells) == (
        "top left: Sneaker, none; top right: Bag, top right; bottom left: T-shirt/top, top right; "
        "bottom right: Ankle boot, top right. Answer: top right"
    )


def test_answers_parse_forgivingly() -> None:
    assert parse_answer("yes_no", " Yes, there is.") == "yes" and parse_answer("yes_no", "Nope") is None
    assert parse_answer("count", "There are two shoes.") == "2" and parse_answer("count", "3") == "3"
    assert parse_answer("where", "In the Upper-Right corner") == "top right"
    assert parse_answer("what", "sneakers") == "Sneaker"
    # after the listed cells, only the text after the last "Answer:" counts
    listed = "top left: Sneaker; top right: Bag; bottom left: Sandal; bottom right: Trouser. Answer: bottom right"
    assert parse_answer("where", listed) == "bottom right" and parse_answer("what", listed + " answer: Coat") == "Coat"


def test_metrics_on_hand_made_predictions() -> None:
    cells = [HAND_MADE, ["Coat", "Dress", "Bag", "Shirt"]]
    texts = [caption(HAND_MADE), "top left: Coat; top right: Dress; bottom left: Bag; bottom right: T-shirt/top"]
    m = caption_metrics(cells, texts)
    assert m["per_cell"]["accuracy"] == 7 / 8 and m["per_cell"]["n"] == 8
    assert m["per_cell"]["stderr"] == pytest.approx(np.sqrt(7 / 8 * 1 / 8 / 8))
    assert m["all_cells"]["accuracy"] == 0.5 and m["exact_match"] == 0.5
    assert 0 < m["bleu"] < 100 and 0.5 < m["rougeL"] < 1
    rows = [
        {"question_type": "count", "truth": "2"}, {"question_type": "count", "truth": "0"},
        {"question_type": "yes_no", "truth": "no"}, {"question_type": "where", "truth": "top left"},
    ]
    q = question_metrics(rows, ["2", "one", "No.", "bottom left"])
    assert q["count"]["accuracy"] == 0.5 and q["count"]["n"] == 2
    assert q["yes_no"]["accuracy"] == 1.0 and q["where"]["accuracy"] == 0.0


def test_results_section_replaces_the_earlier_one_and_keeps_the_rest(tmp_path) -> None:
    results, png = tmp_path / "results.md", tmp_path / "run" / "mosaic_captions.png"
    png.parent.mkdir()
    png.write_bytes(b"png")
    results.write_text("# Demo results\n\nclassification table\n")
    write_results_section(str(results), "| first table |", str(png))
    write_results_section(str(results), "| second table |", str(png))
    text = results.read_text()
    assert text.startswith("# Demo results\n\nclassification table\n")
    assert text.count(SECTION_START) == 1 == text.count(SECTION_END)
    assert "| second table |" in text and "| first table |" not in text
    assert (tmp_path / "mosaic_captions.png").read_bytes() == b"png"
