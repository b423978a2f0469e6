"""`evaluate`: classification metrics on label rows (label scoring), text metrics on answer rows.

A dataset may mix both kinds (captions + questions + class labels); the two sets of metrics are
reported side by side. Rows are run in batches of the same kind, prompt and image count (one token
layout), so per-row prompts batch as well as a single one.
"""

from __future__ import annotations

import os
from typing import Any

import datasets
import torch
from tqdm.auto import tqdm

from .data import FEATURES_COLUMN, as_dataset, image_counts, label_names, label_text, row_images, row_kinds
from .features import features_as_tensors
from .generation import resolve_generation_config
from .metrics import classification_metrics, plot_confusion_matrix, text_metrics
from .modeling import VisionLanguageCore


def _groups(data: datasets.Dataset, model: VisionLanguageCore, prompt: str | None, answers: bool) -> dict:
    """Row indices by (kind, prompt, image count), in dataset order."""
    kinds = row_kinds(data)
    prompts = data["prompt"] if "prompt" in data.column_names else [None] * len(data)
    defaults = {"label": model.config.classify_prompt, "answer": model.config.describe_prompt}
    groups: dict[tuple[str, str, int], list[int]] = {}
    for i, (kind, text, count) in enumerate(zip(kinds, prompts, image_counts(data), strict=True)):
        if kind == "answer" and not answers:
            continue
        groups.setdefault((kind, prompt or text or defaults[kind], count), []).append(i)
    return groups


def _features(model: VisionLanguageCore, rows: dict[str, list[Any]], count: int) -> torch.Tensor:
    """[B, images, tokens, hidden] of a batch of rows with `count` images each (cached or encoded now)."""
    if FEATURES_COLUMN in rows:
        cached = [torch.as_tensor(f).float() for f in rows[FEATURES_COLUMN]]
        return torch.stack([f if f.dim() == 3 else f[None] for f in cached])
    keys = [k for k in ("image", "images") if k in rows]
    images = [img for r in range(len(rows[keys[0]])) for img in row_images({k: rows[k][r] for k in keys})]
    return model.vision.encode_images(images).unflatten(0, (-1, count))


@torch.no_grad()
def evaluate(
    model: VisionLanguageCore,
    dataset: Any,
    *,
    batch_size: int = 16,
    prompt: str | None = None,
    output_dir: str | None = None,
    progress: bool = True,
    answers: bool = True,
    zero_shot_baseline: bool = False,
    generation_config: Any = None,
    **generation: Any,
) -> dict[str, Any]:
    """Classification metrics on label rows (the top label by label scoring over the class names),
    exact match / BLEU / ROUGE-L on answer rows (text generated as `describe` does; `generation`
    takes its options: `max_new_tokens`, `num_beams`, `stop`, ...), side by side for a mixed set.

    Each row is asked its own prompt unless `prompt` is given. `answers=False` skips the answer rows
    (the Trainer's per-evaluation accuracy). With `output_dir`, a confusion-matrix PNG is written there.
    With `zero_shot_baseline`, `clip_zero_shot_accuracy` is the accuracy of the encoder's own CLIP /
    SigLIP zero-shot scores (see `zero_shot.py`; needs the full checkpoint and the images).
    """
    baseline: dict[str, float] = {}
    if zero_shot_baseline:  # first: a model without a text tower fails before the evaluation runs
        from .zero_shot import zero_shot_accuracy

        baseline["clip_zero_shot_accuracy"] = zero_shot_accuracy(model, dataset, batch_size)
    data = features_as_tensors(as_dataset(dataset))
    names = label_names(data)
    config = resolve_generation_config(generation_config, **generation)
    groups = _groups(data, model, prompt, answers)
    true: dict[int, int] = {}
    pred: dict[int, int] = {}
    outs: dict[int, str] = {}
    refs: dict[int, str] = {}
    was_training = model.training
    model.eval()
    batches = [(key, rows[s : s + batch_size]) for key, rows in groups.items() for s in range(0, len(rows), batch_size)]
    try:
        with model.reuse_prompt_cache():  # the prompt head once for all batches
            for (kind, text, count), index in tqdm(batches, desc="Evaluating", unit="batch", disable=not progress):
                rows = data[index]
                features = _features(model, rows, count)
                if kind == "label":
                    pred.update(zip(index, model.predict_labels(features, names, text).tolist()))
                    true.update((i, names.index(label_text(label, names))) for i, label in zip(index, rows["label"]))
                else:
                    outs.update(zip(index, model.generate_from_features(features, text, config)))
                    refs.update(zip(index, rows["answer"]))
    finally:
        model.train(was_training)
    metrics: dict[str, Any] = dict(baseline)
    if refs:
        generated = [outs[i] for i in sorted(refs)]
        metrics.update(text_metrics([refs[i] for i in sorted(refs)], generated), predictions=generated)
    if true:
        order = sorted(true)
        metrics.update(_classification(model, [true[i] for i in order], [pred[i] for i in order], names, output_dir))
    return metrics


def _classification(
    model: VisionLanguageCore, true: list[int], pred: list[int], names: list[str], output_dir: str | None
) -> dict[str, Any]:
    metrics = classification_metrics(true, pred, names)
    if output_dir:
        os.makedirs(output_dir, exist_ok=True)
        metrics["confusion_matrix_png"] = plot_confusion_matrix(
            metrics["confusion_matrix"], names, os.path.join(output_dir, "confusion_matrix.png")
        )
    model.metrics = {**getattr(model, "metrics", {}), "accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"]}
    return metrics
