"""`model.explain` and `vlm-adapters explain` on a task whose evidence sits at a known place: a coloured
square (label = its colour) at a random position on grey noise (conftest's `object_image`).

What each test proves:
- heatmap_points_at_the_object: after `fit`, the heatmap's peak lies on the square for most held-out
  images (the pointing game, >= 0.6; chance = the square's share of the image = 1/16), for LoRA and prefix.
- explanation_of_the_top_label: `label=None` explains the top label of the adapter's labels with
  classify's probability; heatmap [H, W] of the image (non-square too), finite, within the token scores.
- explicit_label: another label is explained against the rest: the square is evidence against it.
- save_writes_an_overlay_png_of_the_image_size: the PNG has the image's size, colours the peak and
  leaves pixels without positive heat as they were.
- heatmap_covers_what_a_center_crop_keeps: with CLIP's crop, the map covers the crop only.
- cli_writes_one_overlay_per_image_and_skips_unreadable_files: one PNG per readable image (sub-folders
  kept), a message naming each skipped file.
- adapter_without_labels_needs_a_label: a clear error instead of an empty explanation (and for
  repeated labels or an empty window).
- occlusion_points_at_the_only_tokens_the_score_reads / upsample_keeps_rows_and_columns_apart: the
  occlusion and the stretch over the image, on a score and token grids whose answer is known.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from conftest import object_dataset, object_image, save_vision
from PIL import Image

from vlm_adapters import attach
from vlm_adapters.cli import main
from vlm_adapters.explain import _grid_shape, occlusion, seen_box, upsample, windows

LABELS = ["red", "green", "blue"]
# explain occludes the LLM's image tokens; fit's label prior would add the probe to classify's scores
FAST = dict(disable_tqdm=True, save_strategy="no", logging_steps=1000, label_prior=False)
# Prefix tuning learns this task slower than LoRA: 0.73 held-out accuracy after 6 epochs at 5e-3,
# 0.97 after 10 at 1e-2 (30 images); an explanation can only point at what the model has learnt.
SCHEDULE = {
    "lora": dict(num_train_epochs=6, learning_rate=5e-3),
    "prefix": dict(num_train_epochs=10, learning_rate=1e-2),
}


@pytest.fixture(scope="module")
def vit64_dir(tmp_path_factory) -> str:
    return save_vision(str(tmp_path_factory.mktemp("vit64")), image_size=64)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, vit64_dir, llm_dir):
    """adapter kind -> a model trained by `fit` on the object task (each trained once per module)."""
    models = {}

    def get(adapter: str):
        if adapter not in models:
            train, _ = object_dataset(40, seed=100)
            models[adapter] = attach(vit64_dir, llm_dir, adapter=adapter, seed=0)
            schedule = SCHEDULE[adapter]
            models[adapter].fit(train, output_dir=str(tmp_path_factory.mktemp(adapter)), **schedule,
                                projector_lr=schedule["learning_rate"], **FAST)
        return models[adapter]

    return get


@pytest.fixture
def lora_model(fitted):
    return fitted("lora")


def _peak(heatmap: np.ndarray) -> tuple[int, int]:
    y, x = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    return int(x), int(y)


@pytest.mark.parametrize("adapter", ["lora", "prefix"])
def test_heatmap_points_at_the_object(fitted, adapter):
    trained = fitted(adapter)
    test, boxes = object_dataset(10, seed=200)
    hits = []
    for row, (left, top, right, bottom) in zip(test, boxes):
        explanation = trained.explain(row["image"], label=LABELS[row["label"]])
        x, y = _peak(explanation.heatmap)
        hits.append(left <= x < right and top <= y < bottom)
    assert np.mean(hits) >= 0.6, hits  # chance: 16 * 16 / (64 * 64) = 0.0625


def test_explanation_of_the_top_label(lora_model):
    image, _ = object_image("green", np.random.default_rng(7), size=64)
    wide = image.resize((96, 64))
    for picture in (image, wide):
        explanation = lora_model.explain(picture)
        probabilities = lora_model.classify(picture, LABELS)
        assert explanation.label == max(probabilities, key=probabilities.get)
        assert explanation.score == pytest.approx(probabilities[explanation.label], abs=1e-5)
        assert explanation.labels == LABELS
        assert explanation.heatmap.shape == (picture.height, picture.width)
        assert explanation.tokens.shape == (8, 8)  # 64 px / 8 px patches
        assert np.isfinite(explanation.heatmap).all()
        assert explanation.tokens.min() - 1e-5 <= explanation.heatmap.min()
        assert explanation.heatmap.max() <= explanation.tokens.max() + 1e-5
        assert explanation.heatmap.max() > 0
        assert explanation.image.size == picture.size


def test_explicit_label(lora_model):
    image, (left, top, right, bottom) = object_image("red", np.random.default_rng(3), size=64)
    top_label = lora_model.explain(image)
    other = lora_model.explain(image, label="blue")
    assert top_label.label == "red" and other.label == "blue"
    assert other.score == pytest.approx(lora_model.classify(image, LABELS)["blue"], abs=1e-5)
    on_square = (slice(top, bottom), slice(left, right))
    assert top_label.heatmap[on_square].mean() > 0 > other.heatmap[on_square].mean()


def test_save_writes_an_overlay_png_of_the_image_size(lora_model, tmp_path):
    image, _ = object_image("blue", np.random.default_rng(5), size=64)
    image = image.resize((80, 64))
    explanation = lora_model.explain(image)
    path = explanation.save(tmp_path / "overlay.png")
    with Image.open(path) as saved:
        assert saved.format == "PNG" and saved.size == image.size
        pixels = np.asarray(saved.convert("RGB")).astype(int)
    original = np.asarray(image).astype(int)
    x, y = _peak(explanation.heatmap)
    assert np.abs(pixels[y, x] - original[y, x]).sum() > 30  # the peak is coloured
    cold = explanation.heatmap <= 0
    assert cold.any() and (pixels[cold] == original[cold]).all()  # no positive heat, no colour


def test_heatmap_covers_what_a_center_crop_keeps():
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    assert seen_box(processor, 200, 100) == (50.0, 0.0, 150.0, 100.0)  # 64x32 -> the middle 32x32
    assert seen_box(processor, 100, 100) == (0.0, 0.0, 100.0, 100.0)
    from transformers import ViTImageProcessor

    assert seen_box(ViTImageProcessor(size={"height": 32, "width": 32}), 200, 100) == (0.0, 0.0, 200.0, 100.0)


def test_cli_writes_one_overlay_per_image_and_skips_unreadable_files(lora_model, tmp_path, capsys):
    adapter = lora_model.save_pretrained(tmp_path / "adapter")
    images = tmp_path / "images"
    (images / "more").mkdir(parents=True)
    rng = np.random.default_rng(11)
    object_image("red", rng)[0].save(images / "a.png")
    object_image("green", rng)[0].save(images / "more" / "a.png")  # same name in a sub-folder
    object_image("blue", rng)[0].save(images / "b.jpg")
    (images / "broken.png").write_bytes((images / "a.png").read_bytes()[:200])  # cut short
    (images / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    assert main(["explain", "--adapter", adapter, "--images", str(images), "--output_dir", str(out)]) == 0
    written = sorted(os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs)
    assert written == ["a.png", "b.png", os.path.join("more", "a.png")]
    with Image.open(out / "b.png") as overlay:
        assert overlay.size == (64, 64)
    err = capsys.readouterr().err
    assert "skipped " + str(images / "broken.png") + ": the image is truncated or corrupt" in err
    assert "notes.txt: not an image file" in err


def test_adapter_without_labels_needs_a_label(vit64_dir, llm_dir):
    model = attach(vit64_dir, llm_dir, adapter="lora", seed=0)  # never trained: no labels recorded
    image, _ = object_image("red", np.random.default_rng(0))
    with pytest.raises(ValueError, match="pass label="):
        model.explain(image)
    assert model.explain(image, label="red").heatmap.shape == (64, 64)
    assert model.explain(image, labels=LABELS).label in LABELS
    with pytest.raises(ValueError, match="unique non-empty strings"):
        model.explain(image, labels=["red", "red"])
    with pytest.raises(ValueError, match="window=0: pass the side"):
        model.explain(image, label="red", window=0)


def test_occlusion_points_at_the_only_tokens_the_score_reads():
    """A score that reads only the tokens of one off-centre region (rows 1-2, columns 5-6 of an 8 x 8
    grid): the occlusion map peaks there, and is negative far from it (hiding plain tokens with the
    mean token adds evidence), whichever the window."""
    grid, region = (8, 8), np.zeros((8, 8), dtype=bool)
    region[1:3, 5:7] = True
    embeds = torch.zeros(1, 64, 4)
    embeds[0, torch.from_numpy(region.flatten())] = 1.0
    for size in (1, 2, 3):
        masks = windows(grid, size)
        assert masks.shape == ((8 + size - 1) ** 2, 64)
        assert (masks.sum(0) == size * size).all()  # every token hidden by size * size blocks
        tokens = occlusion(embeds, lambda batch: batch.sum((1, 2)), masks, batch_size=7).reshape(grid).numpy()
        assert region[np.unravel_index(tokens.argmax(), grid)], (size, tokens)
        assert tokens[6:, :3].max() < 0


def test_upsample_keeps_rows_and_columns_apart():
    """One hot token at row 1, column 6 of a 4 x 8 grid lands at that place of a 100 x 50 image."""
    tokens = np.zeros((4, 8), dtype=np.float32)
    tokens[1, 6] = 1.0
    heatmap = upsample(tokens, (0.0, 0.0, 100.0, 50.0), 100, 50)
    y, x = np.unravel_index(int(heatmap.argmax()), heatmap.shape)
    assert heatmap.shape == (50, 100) and 12 <= y < 25 and 75 <= x < 87
    assert _grid_shape(32, 50, 100) == (4, 8) and _grid_shape(32, 100, 50) == (8, 4)
