"""PNG plots of evaluation results (matplotlib's Agg backend, no display needed): confusion matrix,
one-vs-rest ROC curves, reliability diagram, coverage vs accuracy, training curves."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .metrics import ECE_BINS, reliability_bins


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def plot_confusion_matrix(matrix: Sequence[Sequence[int]], names: Sequence[str], path: str) -> str:
    from sklearn.metrics import ConfusionMatrixDisplay

    fig, ax = _pyplot().subplots(figsize=(1.0 + 0.6 * len(names), 0.8 + 0.6 * len(names)))
    display = ConfusionMatrixDisplay(np.asarray(matrix), display_labels=list(names))
    display.plot(ax=ax, cmap="Blues", xticks_rotation=45, colorbar=False)
    ax.set(xlabel="predicted", ylabel="true")
    return _save(fig, path)


def plot_roc_curves(y_true: Sequence[int], probs: np.ndarray, names: Sequence[str], path: str) -> str:
    """One-vs-rest ROC curve of each label that has positive and negative images (one curve for two labels)."""
    from sklearn.metrics import RocCurveDisplay

    true = np.asarray(y_true)
    fig, ax = _pyplot().subplots(figsize=(5, 4.5))
    shown = [1] if len(names) == 2 else range(len(names))  # with two labels both curves are the same
    for k in shown:
        if 0 < (true == k).sum() < len(true):
            RocCurveDisplay.from_predictions(true == k, probs[:, k], name=names[k], ax=ax)
    ax.plot([0, 1], [0, 1], ls=":", c="grey")
    ax.set(xlabel="1 - specificity (false positive rate)", ylabel="sensitivity (true positive rate)")
    return _save(fig, path)


def plot_reliability_diagram(confidence: np.ndarray, correct: np.ndarray, ece: float, path: str) -> str:
    """Accuracy against mean top-label confidence per bin; a calibrated model sits on the diagonal."""
    fig, ax = _pyplot().subplots(figsize=(5, 4.5))
    bins = reliability_bins(confidence, correct, ECE_BINS)
    ax.bar([b["lo"] for b in bins], [b["accuracy"] for b in bins], width=1 / ECE_BINS, align="edge",
           edgecolor="black", alpha=0.7, label="accuracy")
    ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o", c="C3", label="mean confidence")
    ax.plot([0, 1], [0, 1], ls=":", c="grey")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="top-label probability", ylabel="accuracy",
           title=f"reliability (ECE {ece:.3f}, {len(confidence)} images)")
    ax.legend(loc="upper left")
    return _save(fig, path)


def plot_coverage_accuracy(confidence: np.ndarray, correct: np.ndarray, path: str) -> str:
    """Accuracy on the images kept against the share kept, keeping the most confident first; the
    `abstain_below` thresholds 0.5 .. 0.95 are marked."""
    order = np.argsort(-np.asarray(confidence), kind="stable")
    hits = np.asarray(correct, dtype=np.float64)[order]
    kept = np.arange(1, len(hits) + 1)
    fig, ax = _pyplot().subplots(figsize=(5, 4.5))
    ax.plot(kept / len(hits), np.cumsum(hits) / kept, label="keep the most confident")
    for threshold in (0.5, 0.7, 0.9, 0.95):
        mask = np.asarray(confidence) >= threshold
        if mask.any():
            ax.plot(mask.mean(), np.asarray(correct)[mask].mean(), "o")
            ax.annotate(f"{threshold:g}", (mask.mean(), np.asarray(correct)[mask].mean()), fontsize=8)
    ax.set(xlim=(0, 1.02), xlabel="coverage (share of images answered)", ylabel="accuracy on answered images",
           title="abstention: coverage vs accuracy")
    return _save(fig, path)


def plot_training_curves(log_history: Sequence[dict[str, Any]], path: str) -> str:
    """Training loss per logging step and every eval metric per evaluation, from Trainer's log_history."""
    train = [(row["step"], row["loss"]) for row in log_history if "loss" in row and "step" in row]
    evals = [row for row in log_history if any(k.startswith("eval_") for k in row)]
    fig, axes = _pyplot().subplots(1, 2, figsize=(10, 3.6))
    if train:
        axes[0].plot(*zip(*train), marker=".")
    axes[0].set(title="training loss", xlabel="step", ylabel="loss")
    for key in ("eval_loss", "eval_accuracy", "eval_macro_f1", "eval_roc_auc"):
        points = [(row["step"], row[key]) for row in evals if row.get(key) is not None]
        if points:
            axes[1].plot(*zip(*points), marker="o", label=key)
    axes[1].set(title="evaluation", xlabel="step")
    if evals:
        axes[1].legend()
    return _save(fig, path)
