"""Views of the label rows' images for the label prior's probe (prior_views.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vlm_adapters import attach
from vlm_adapters.label_prior import LabelPrior, out_of_fold_logits, pool_images, probe_pipeline
from vlm_adapters.prior_fit import view_features
from vlm_adapters.prior_views import image_views, resolve_view_kinds

LABELS = ["red", "green", "blue"]


def test_views_move_the_image_by_a_fourteenth_and_mirror_it():
    array = np.zeros((28, 28), np.uint8)
    array[:, 10] = 255
    array[:, :3] = [[5, 6, 7]]  # the image reflected at its edge fills the strip a shift uncovers
    left, right, mirrored = (np.asarray(v) for v in image_views(Image.fromarray(array), ["shift", "flip"]))
    assert [np.flatnonzero(v[0] == 255).tolist() for v in (left, right, mirrored)] == [[8], [12], [17]]
    assert right[0, :5].tolist() == [7, 6, 5, 6, 7] and left[0, -2:].tolist() == [0, 0]
    colour = Image.fromarray(np.zeros((6, 70, 3), np.uint8))
    assert [v.size for v in image_views(colour, ["shift"])] == [(70, 6), (70, 6)]  # 5-pixel steps


def test_default_views_are_shifts_for_small_classes_only():
    assert resolve_view_kinds(None, np.repeat([0, 1], [49, 300])) == ["shift"]
    assert resolve_view_kinds(None, np.repeat([0, 1], [50, 300])) == []
    assert resolve_view_kinds(["flip"], np.repeat([0, 1], [50, 300])) == ["flip"]
    with pytest.raises(ValueError, match="prior_views \\['crop'\\] unknown"):
        resolve_view_kinds(["crop"], np.zeros(3, int))


def test_the_probe_trains_on_rows_and_views_but_held_out_rows_keep_their_views_out():
    rng = np.random.default_rng(0)
    targets = np.arange(90) % 3
    pooled = rng.normal(size=(90, 40))  # no signal: only memorising a row predicts it
    views = pooled[None] + rng.normal(scale=1e-3, size=(2, 90, 40))
    held_out = out_of_fold_logits(pooled, targets, 3, views=views)
    assert (held_out.argmax(1) == targets).mean() < 0.6  # a view of a held-out row in its fold would memorise it
    prior, _ = LabelPrior.fit(pooled, targets, LABELS, views=views)
    stacked = probe_pipeline().fit(np.concatenate([pooled, *views]), np.tile(targets, 3))
    test = rng.normal(size=(50, 40))
    predicted = prior.log_probs(torch.from_numpy(test)[:, None], LABELS).argmax(-1).numpy()
    assert predicted.tolist() == stacked.predict(test).tolist()
    in_sample = prior.log_probs(torch.from_numpy(pooled)[:, None], LABELS).argmax(-1).numpy()
    assert (in_sample == targets).mean() > 0.8  # what a probe that saw a row's views makes of the row


def test_fit_adds_shifted_views_to_the_probe_of_a_small_set(tmp_path, llm_dir, vit_dir, colours, cache_dir):
    train, test = colours
    rows = np.arange(len(train))
    images = [train[i]["image"] for i in rows]
    targets = np.asarray(train["label"])
    probe_on = {}
    for kinds in (None, []):
        model = attach(vit_dir, llm_dir)
        model.fit(train, output_dir=str(tmp_path / "run"), max_steps=1, save_strategy="no", seed=0,
                  prior_views=kinds)
        probe_on[str(kinds)] = model.label_prior
    pooled = pool_images(model.vision.encode_images(images)).numpy()
    views = np.stack([pool_images(model.vision.encode_images([image_views(image, ["shift"])[k] for image in images]))
                      .numpy() for k in (0, 1)])  # [views, N, C]: left shifts, then right shifts
    calls = []  # fit encoded the views into the feature cache: reading them again runs no encoder
    hook = model.vision.encoder.register_forward_hook(lambda *a: calls.append(1))
    torch.testing.assert_close(view_features(model, train, rows, ["shift"]), views.astype(np.float64),
                               rtol=1e-4, atol=1e-5)
    hook.remove()
    assert not calls
    features = model.vision.encode_images([test[i]["image"] for i in range(len(test))])
    for kinds, expected_views in (("None", views), ("[]", None)):
        expected, _ = LabelPrior.fit(pooled, targets, LABELS, seed=0, views=expected_views)
        torch.testing.assert_close(probe_on[kinds].log_probs(features, LABELS), expected.log_probs(features, LABELS),
                                   rtol=1e-3, atol=1e-3)
    assert not torch.allclose(probe_on["None"].weight, probe_on["[]"].weight)
