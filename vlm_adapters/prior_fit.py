"""Fitting the label prior inside `fit`: which rows it is fit on, their pooled cached features (plus
extra views for a small probe, prior_views.py), the rows kept out of the LLM's training for the gate,
and the LLM's label scores on them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from .label_prior import LabelPrior, pool_images
from .prior_views import resolve_view_kinds, views_of

if TYPE_CHECKING:
    import datasets

    from .modeling import VisionLanguageCore


def label_rows(data: datasets.Dataset, names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(indices, class indices) of the label rows (answer rows left out); `names` are the adapter's labels."""
    from .data import label_indices

    indices = label_indices(data, names)
    keep = [i for i, index in enumerate(indices) if index is not None]
    return np.array(keep, dtype=int), np.array([indices[i] for i in keep], dtype=int)


def pooled_features(data: datasets.Dataset, rows: np.ndarray, chunk: int = 256) -> np.ndarray:
    """[N, C] cached encoder features of `rows`, each image mean-pooled (`pool_images`); where rows carry
    different numbers of images, every token of a row pooled together (one width for all rows)."""
    from .data import FEATURES_COLUMN

    table = data.with_format("torch", columns=[FEATURES_COLUMN])
    per_image = []  # pooled chunk by chunk: the rows' full features would not fit in memory
    for start in range(0, len(rows), chunk):
        per_image += [pool_images(f[None])[0] for f in table[rows[start : start + chunk].tolist()][FEATURES_COLUMN]]
    if len({p.shape for p in per_image}) > 1:  # all tokens together: the mean of its images' (equal-sized) means
        hidden = data.features[FEATURES_COLUMN].shape[-1]
        per_image = [p.reshape(-1, hidden).mean(0) for p in per_image]
    return torch.stack(per_image).numpy()


def view_features(model: VisionLanguageCore, images: datasets.Dataset, rows: np.ndarray, kinds: Sequence[str]
                  ) -> np.ndarray | None:
    """[views, N, C] pooled encoder features of the views `kinds` of the images of `rows` (prior_views.py),
    through the feature cache; None where there is nothing to view."""
    from .features import with_image_features

    views = views_of(images, rows, kinds)
    if views is None:
        return None
    cached = with_image_features(views, model.vision, token_shape=model.feature_shape)
    pooled = pooled_features(cached, np.arange(len(views)))  # [N * views, C], each row's views in turn
    return pooled.reshape(len(rows), -1, pooled.shape[-1]).transpose(1, 0, 2)  # float64, as pool_images pools


def llm_label_scores(model: VisionLanguageCore, data: datasets.Dataset, rows: np.ndarray, names: Sequence[str],
                     batch_size: int = 16) -> np.ndarray:
    """[N, K] each label's log-likelihood under the LLM alone after the classify prompt, from cached features."""
    from .data import FEATURES_COLUMN

    table = data.with_format("torch", columns=[FEATURES_COLUMN])
    out = []
    with model.reuse_prompt_cache():
        for start in range(0, len(rows), batch_size):
            features = table[rows[start : start + batch_size].tolist()][FEATURES_COLUMN]
            for group in [features] if isinstance(features, torch.Tensor) else [f[None] for f in features]:
                scores = model.score_labels(group.to(model.device), names, model.config.classify_prompt, prior=False)
                out.append(scores.float().cpu().numpy())
    return np.concatenate(out)


def can_fit_prior(data: datasets.Dataset, names: Sequence[str]) -> bool:
    """A probe needs label rows of at least two classes and out-of-fold predictions at least two rows."""
    targets = label_rows(data, names)[1]
    return len(targets) >= 2 and len(set(targets.tolist())) >= 2


def hold_out_gate_rows(data: datasets.Dataset, names: Sequence[str], share: float, seed: int,
                       most: int = 500) -> tuple[datasets.Dataset, np.ndarray | None]:
    """(the rows the LLM trains on, the label rows kept out to fit the gate): a stratified `share` of the
    label rows, at most `most`. The gate must be fit where the LLM has not seen the images, or a fine-tuned
    LLM, sure of its own training rows, gets a gate far too open. None (no rows kept) when `share` is 0
    or a class has fewer than two rows."""
    from sklearn.model_selection import train_test_split

    rows, targets = label_rows(data, names)
    counts = np.bincount(targets)
    size = min(most, max(int((counts > 0).sum()), round(share * len(rows))))
    if share <= 0 or counts[counts > 0].min() < 2 or size * 2 > len(rows):
        return data, None
    _, gate = train_test_split(rows, test_size=size, stratify=targets, random_state=seed)
    gate = np.sort(gate)
    return data.select(np.setdiff1d(np.arange(len(data)), gate)), gate


def prior_view_features(model: VisionLanguageCore, train: datasets.Dataset, names: Sequence[str],
                        images: datasets.Dataset | None, view_kinds: Sequence[str] | None) -> np.ndarray | None:
    """The pooled features of the views `view_kinds` (None: prior_views.py's default) of the label rows' images,
    from `images` (`train` before its features were cached; None where rows were dropped since: no views)."""
    rows, targets = label_rows(train, names)
    kinds = resolve_view_kinds(view_kinds, targets)
    same_rows = images is not None and len(images) == len(train)  # else skip_bad_images dropped rows
    return view_features(model, images, rows, kinds) if same_rows else None


def fit_label_prior(model: VisionLanguageCore, train: datasets.Dataset, eval_data: datasets.Dataset | None,
                    gate_rows: np.ndarray | None, names: Sequence[str], seed: int,
                    class_weight: dict[str, float] | None = None, most: int = 500,
                    views: np.ndarray | None = None) -> LabelPrior:
    """The probe on every label row of `train` (cached features) and their `views` (`prior_view_features`);
    the gate on `gate_rows` of `train` (kept out of the LLM's training) with their out-of-fold probe log-probs,
    else on the eval split's label rows, else on at most `most` training rows (a seeded draw; each costs one
    scoring pass of the LLM)."""
    rows, targets = label_rows(train, names)
    by_index = {names.index(label): w for label, w in class_weight.items()} if class_weight else None
    prior, held_out = LabelPrior.fit(pooled_features(train, rows), targets, names, seed, by_index, views)
    prior.to(model.device)
    gate_data, picked = train, np.searchsorted(rows, gate_rows) if gate_rows is not None else None
    gate_targets = targets
    eval_rows = label_rows(eval_data, names) if picked is None and eval_data is not None else None
    has_eval = eval_rows is not None and len(eval_rows[0]) > 0
    eval_pooled = torch.from_numpy(pooled_features(eval_data, eval_rows[0]))[:, None] if has_eval else None
    if eval_pooled is not None and prior.covers(names, eval_pooled):  # else the training rows
        gate_data, (rows, gate_targets) = eval_data, eval_rows
        held_out = prior.log_probs(eval_pooled, names).double().cpu().numpy()
    if picked is None:
        picked = np.sort(np.random.default_rng(seed).permutation(len(rows))[:most])
    scores = llm_label_scores(model, gate_data, rows[picked], names)
    prior.fit_gate(held_out[picked], scores.astype(np.float64), gate_targets[picked])
    return prior
