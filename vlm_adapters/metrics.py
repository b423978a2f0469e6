"""Metrics and plots, computed offline.

`evaluate.load(...)` fetches metric code from the Hub, which is neither possible offline nor safe
to execute, so classification metrics come from scikit-learn and text metrics from sacrebleu
(BLEU) and rouge-score (ROUGE-L): the same maintained implementations `evaluate` wraps.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int], names: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro / weighted F1, the per-class report and the confusion matrix, over every class
    in `names` (a class absent from the data still has its row)."""
    from sklearn.metrics import accuracy_score, classification_report, confusion_matrix

    labels = list(range(len(names)))
    report = classification_report(
        y_true, y_pred, labels=labels, target_names=list(names), output_dict=True, zero_division=0
    )
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(report["macro avg"]["f1-score"]),
        "weighted_f1": float(report["weighted avg"]["f1-score"]),
        "per_class": {
            name: {
                "precision": float(report[name]["precision"]),
                "recall": float(report[name]["recall"]),
                "f1": float(report[name]["f1-score"]),
                "support": int(report[name]["support"]),
            }
            for name in names
        },
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "labels": list(names),
    }


def text_metrics(references: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    import sacrebleu
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rouge = [scorer.score(ref, pred)["rougeL"].fmeasure for ref, pred in zip(references, predictions)]
    return {
        "exact_match": float(np.mean([r.strip() == p.strip() for r, p in zip(references, predictions)])),
        "bleu": float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score),
        "rougeL": float(np.mean(rouge)),
    }


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion_matrix(matrix: Sequence[Sequence[int]], names: Sequence[str], path: str) -> str:
    from sklearn.metrics import ConfusionMatrixDisplay

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * len(names), 0.8 + 0.6 * len(names)))
    display = ConfusionMatrixDisplay(np.asarray(matrix), display_labels=list(names))
    display.plot(ax=ax, cmap="Blues", xticks_rotation=45, colorbar=False)
    ax.set(xlabel="predicted", ylabel="true")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_training_curves(log_history: Sequence[dict[str, Any]], path: str) -> str:
    """Training loss per logging step and every eval metric per evaluation, from Trainer's log_history."""
    plt = _pyplot()
    train = [(row["step"], row["loss"]) for row in log_history if "loss" in row and "step" in row]
    evals = [row for row in log_history if any(k.startswith("eval_") for k in row)]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    if train:
        axes[0].plot(*zip(*train), marker=".")
    axes[0].set(title="training loss", xlabel="step", ylabel="loss")
    for key in ("eval_loss", "eval_accuracy", "eval_macro_f1"):
        points = [(row["step"], row[key]) for row in evals if key in row]
        if points:
            axes[1].plot(*zip(*points), marker="o", label=key)
    axes[1].set(title="evaluation", xlabel="step")
    if evals:
        axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
