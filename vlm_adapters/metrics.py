"""Offline metrics and plots.

`evaluate.load(...)` fetches metric code from the Hub, which is neither possible offline nor safe
to execute, so classification metrics come from scikit-learn and text metrics from sacrebleu
(BLEU) and rouge-score (ROUGE-L): the same maintained implementations `evaluate` wraps.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int], names: Sequence[str]) -> dict[str, Any]:
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    labels = list(range(len(names)))
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "weighted_f1": float(f1_score(y_true, y_pred, labels=labels, average="weighted", zero_division=0)),
        "per_class": {
            name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for name, p, r, f, s in zip(names, precision, recall, f1, support)
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


def plot_confusion_matrix(matrix: Sequence[Sequence[int]], names: Sequence[str], path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = np.asarray(matrix)
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * len(names), 0.8 + 0.6 * len(names)))
    ax.imshow(data, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for (i, j), value in np.ndenumerate(data):
        ax.text(j, i, str(value), ha="center", va="center", color="white" if value > data.max() / 2 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_training_curves(log_history: Sequence[dict[str, Any]], path: str) -> str:
    """Training loss per logging step and every eval metric per evaluation, from Trainer's log_history."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
