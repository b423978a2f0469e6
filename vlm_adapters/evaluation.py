"""`evaluate`: classification metrics from every label's probability for label data, text metrics otherwise.

Label data is scored over the adapter's own labels (`config.labels`, set by `fit`): every label's
log-likelihood in one pass over the label trie (`score_labels`), the calibrated softmax of those
(`label_probabilities`), the argmax as the prediction. The probabilities give ROC-AUC, PR-AUC,
calibration error and the abstention curve, which the top label alone cannot.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import datasets
import numpy as np
import torch
from tqdm.auto import tqdm

from .data import as_dataset, label_indices, label_names
from .features import FEATURES_COLUMN, features_as_tensors
from .metrics import classification_metrics, module_results, sensitivity_at_specificity, text_metrics
from .modeling import VisionLanguageCore

CARD_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc", "ece")
PLOTS = ("confusion_matrix_png", "roc_curve_png", "reliability_diagram_png", "coverage_accuracy_png")


def _batches(
    model: VisionLanguageCore, data: datasets.Dataset, batch_size: int, progress: bool
) -> Iterator[tuple[torch.Tensor, dict[str, Any]]]:
    """(encoder features, rows) per batch: cached features where the data has them, else the encoder."""
    for start in tqdm(range(0, len(data), batch_size), desc="Evaluating", unit="batch", disable=not progress):
        rows = data[start : start + batch_size]
        if FEATURES_COLUMN in rows:
            yield torch.as_tensor(rows[FEATURES_COLUMN]).float(), rows
        else:
            yield model.vision.encode_images(rows["image"]), rows


def adapter_labels(model: VisionLanguageCore, data: datasets.Dataset) -> list[str]:
    """The adapter's labels; the data's for an adapter that has none (not trained on labels)."""
    return list(model.config.labels) or list(label_names(data) or [])


@torch.no_grad()
def label_scores(
    model: VisionLanguageCore,
    data: datasets.Dataset,
    labels: Sequence[str],
    prompt: str | None = None,
    batch_size: int = 16,
    progress: bool = True,
) -> torch.Tensor:
    """[N, K] log-likelihood of each label for each row of `data` (features cached or encoded here)."""
    data = features_as_tensors(data)
    prompt = prompt or model.config.classify_prompt
    out = []
    with model.reuse_prompt_cache():  # the prompt head once for all batches
        for features, _ in _batches(model, data, batch_size, progress):
            out.append(model.score_labels(features, labels, prompt).float().cpu())
    return torch.cat(out)


def _positive_index(names: Sequence[str], at_specificity: float | None, positive_label: str | None) -> int | None:
    """The label whose sensitivity `at_specificity` asks for: `positive_label`, or the second of two."""
    if at_specificity is None:
        return None
    if not 0.0 < at_specificity < 1.0:
        raise ValueError(f"at_specificity={at_specificity!r}; expected a specificity in (0, 1), e.g. 0.95.")
    if positive_label is None:
        if len(names) != 2:
            raise ValueError(
                f"at_specificity needs positive_label when there are {len(names)} labels ({list(names)}); "
                "the sensitivity is then that label's against the rest."
            )
        return 1
    if positive_label not in names:
        raise ValueError(f"positive_label={positive_label!r} is not one of the adapter's labels {list(names)}.")
    return list(names).index(positive_label)


def _plots(true: list[int], probs: np.ndarray, report: dict[str, Any], output_dir: str) -> dict[str, str]:
    from .plots import plot_confusion_matrix, plot_coverage_accuracy, plot_reliability_diagram, plot_roc_curves

    os.makedirs(output_dir, exist_ok=True)
    names = report["labels"]
    confidence, correct = probs.max(-1), probs.argmax(-1) == np.asarray(true)
    files = {key: os.path.join(output_dir, key.removesuffix("_png") + ".png") for key in PLOTS}
    return {
        "confusion_matrix_png": plot_confusion_matrix(report["confusion_matrix"], names, files["confusion_matrix_png"]),
        "roc_curve_png": plot_roc_curves(true, probs, names, files["roc_curve_png"]),
        "reliability_diagram_png": plot_reliability_diagram(confidence, correct, report["ece"],
                                                            files["reliability_diagram_png"]),
        "coverage_accuracy_png": plot_coverage_accuracy(confidence, correct, files["coverage_accuracy_png"]),
    }


def evaluate(
    model: VisionLanguageCore,
    dataset: Any,
    *,
    batch_size: int = 16,
    prompt: str | None = None,
    output_dir: str | None = None,
    max_new_tokens: int = 48,
    progress: bool = True,
    metrics: Sequence[Any] = (),
    at_specificity: float | None = None,
    positive_label: str | None = None,
) -> dict[str, Any]:
    """Classification metrics for label data, text metrics (exact match, BLEU, ROUGE-L) otherwise.

    Label data: accuracy, balanced accuracy, macro / weighted F1, per-class precision, recall
    (= sensitivity), specificity, F1, support, ROC-AUC and PR-AUC; macro one-vs-rest `roc_auc` and
    `pr_auc`; `ece` (15 bins); the confusion matrix; `coverage_accuracy` (the share of images kept and
    their accuracy for each `abstain_below` threshold 0, 0.05, ..., 1). Scored over the adapter's labels;
    a label it does not know is an error. `at_specificity=0.95` adds `sensitivity_at_specificity`
    for `positive_label` (default: the second of two labels) with the probability threshold that
    reaches it. `metrics` are `evaluate` modules (or paths / names for `evaluate.load`) whose results
    join the report. With `output_dir`: confusion matrix, ROC, reliability and coverage PNGs there.
    """
    data = features_as_tensors(as_dataset(dataset))
    if "label" not in data.column_names:
        return _evaluate_text(model, data, batch_size, prompt, max_new_tokens, progress, metrics)
    names = adapter_labels(model, data)
    true = label_indices(data, names, "the evaluation data")
    positive = _positive_index(names, at_specificity, positive_label)
    probs = model.label_probabilities(label_scores(model, data, names, prompt, batch_size, progress)).numpy()
    report = classification_metrics(true, probs, names)
    if positive is not None:
        report["sensitivity_at_specificity"] = sensitivity_at_specificity(true, probs, positive, at_specificity, names)
    report.update(module_results(metrics, probs.argmax(-1).tolist(), true, probs))
    if output_dir:
        report.update(_plots(true, probs, report, output_dir))
    card = {k: report[k] for k in CARD_METRICS if report[k] is not None}
    model.metrics = {**getattr(model, "metrics", {}), **card}
    return report


@torch.no_grad()
def _evaluate_text(
    model: VisionLanguageCore,
    data: datasets.Dataset,
    batch_size: int,
    prompt: str | None,
    max_new_tokens: int,
    progress: bool,
    metrics: Sequence[Any],
) -> dict[str, Any]:
    refs, outs = [], []
    with model.reuse_prompt_cache():
        for features, rows in _batches(model, data, batch_size, progress):
            prompts = rows.get("prompt") or [None] * len(rows["answer"])
            for i, text in enumerate(prompts):  # prompts may differ per row
                outs += model.generate_from_features(
                    features[i : i + 1], prompt or text or model.config.describe_prompt, max_new_tokens
                )
            refs += rows["answer"]
    return {**text_metrics(refs, outs), **module_results(metrics, outs, refs), "predictions": outs}
