"""`evaluate`: classification metrics from label scoring for label data, text metrics otherwise."""

from __future__ import annotations

import os
from typing import Any

import torch
from tqdm.auto import tqdm

from .data import as_dataset, label_names, label_text
from .features import FEATURES_COLUMN, features_as_tensors
from .metrics import classification_metrics, plot_confusion_matrix, text_metrics
from .modeling import VisionLanguageCore


@torch.no_grad()
def evaluate(
    model: VisionLanguageCore,
    dataset: Any,
    *,
    batch_size: int = 16,
    prompt: str | None = None,
    output_dir: str | None = None,
    max_new_tokens: int = 48,
    progress: bool = True,
    zero_shot_baseline: bool = False,
) -> dict[str, Any]:
    """Classification metrics for label data (label scoring over the class names), text metrics otherwise.

    With `output_dir`, a confusion-matrix PNG is written there for label data. With `zero_shot_baseline`,
    `clip_zero_shot_accuracy` is the accuracy of the encoder's own CLIP / SigLIP zero-shot scores (see
    `zero_shot.py`; needs the full checkpoint and the images).
    """
    baseline: dict[str, float] = {}
    if zero_shot_baseline:  # first: a model without a text tower fails before the evaluation runs
        from .zero_shot import zero_shot_accuracy

        baseline["clip_zero_shot_accuracy"] = zero_shot_accuracy(model, dataset, batch_size)
    data = features_as_tensors(as_dataset(dataset))
    names = label_names(data) or None
    was_training = model.training
    model.eval()
    true, pred, refs, outs = [], [], [], []
    try:
        with model.reuse_prompt_cache():  # the prompt head once for all batches
            for start in tqdm(range(0, len(data), batch_size), desc="Evaluating", unit="batch", disable=not progress):
                rows = data[start : start + batch_size]
                if FEATURES_COLUMN in rows:
                    features = torch.as_tensor(rows[FEATURES_COLUMN]).float()
                else:
                    features = model.vision.encode_images(rows["image"])
                if names:
                    pred += model.predict_labels(features, names, prompt or model.config.classify_prompt).tolist()
                    true += [names.index(label_text(label, names)) for label in rows["label"]]
                else:
                    prompts = rows.get("prompt") or [None] * len(rows["answer"])
                    for i, text in enumerate(prompts):  # prompts may differ per row
                        outs += model.generate_from_features(
                            features[i : i + 1], prompt or text or model.config.describe_prompt, max_new_tokens
                        )
                    refs += rows["answer"]
    finally:
        model.train(was_training)
    if not names:
        return {**text_metrics(refs, outs), "predictions": outs}
    metrics = {**classification_metrics(true, pred, names), **baseline}
    if output_dir:
        os.makedirs(output_dir, exist_ok=True)
        metrics["confusion_matrix_png"] = plot_confusion_matrix(
            metrics["confusion_matrix"], names, os.path.join(output_dir, "confusion_matrix.png")
        )
    model.metrics = {**getattr(model, "metrics", {}), "accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"]}
    return metrics
