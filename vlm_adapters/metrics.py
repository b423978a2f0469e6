"""Metrics, computed offline: classification from scikit-learn, text from sacrebleu (BLEU) and
rouge-score (ROUGE-L), the maintained implementations the `evaluate` library wraps. `evaluate`
modules a user passes (`evaluate(ds, metrics=[...])`) run beside these (`module_results`).

Classification metrics read the label probabilities, not only the top label: one-vs-rest ROC-AUC
and PR-AUC, expected calibration error, sensitivity at a chosen specificity, coverage vs accuracy.
A value that the data cannot define (ROC-AUC of a class with no positive example) is None.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

ECE_BINS = 15
# The scalar metrics `evaluate` reports for label data; the Trainer logs them as eval_<name>.
SCALAR_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "weighted_f1", "roc_auc", "pr_auc", "ece")
LOWER_IS_BETTER = frozenset({"ece"})
COVERAGE_THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(21))


def classification_metrics(
    y_true: Sequence[int], probs: np.ndarray, names: Sequence[str]
) -> dict[str, Any]:
    """Everything from the true label indices and the [N, K] label probabilities (argmax = prediction),
    over every class in `names` (a class absent from the data still has its row)."""
    from sklearn.metrics import (
        accuracy_score,
        balanced_accuracy_score,
        classification_report,
        confusion_matrix,
        multilabel_confusion_matrix,
    )

    true, probs = np.asarray(y_true), np.asarray(probs, dtype=np.float64)
    pred = probs.argmax(-1)
    labels = list(range(len(names)))
    report = classification_report(true, pred, labels=labels, target_names=list(names), output_dict=True,
                                   zero_division=0)
    per_class_auc = [_one_vs_rest(true, probs, k) for k in labels]
    (tn, fp), _ = np.moveaxis(multilabel_confusion_matrix(true, pred, labels=labels), 0, -1)
    per_class = {
        name: {
            "precision": float(report[name]["precision"]),
            "recall": float(report[name]["recall"]),
            "sensitivity": float(report[name]["recall"]),  # the clinician's name for recall
            "specificity": _ratio(tn[k], tn[k] + fp[k]),
            "f1": float(report[name]["f1-score"]),
            "support": int(report[name]["support"]),
            "roc_auc": per_class_auc[k][0],
            "pr_auc": per_class_auc[k][1],
        }
        for k, name in enumerate(names)
    }
    confidence, correct = probs.max(-1), pred == true
    return {
        "accuracy": float(accuracy_score(true, pred)),
        "balanced_accuracy": float(balanced_accuracy_score(true, pred)),
        "macro_f1": float(report["macro avg"]["f1-score"]),
        "weighted_f1": float(report["weighted avg"]["f1-score"]),
        "roc_auc": _mean([auc for auc, _ in per_class_auc]),
        "pr_auc": _mean([ap for _, ap in per_class_auc]),
        "ece": expected_calibration_error(confidence, correct),
        "per_class": per_class,
        "confusion_matrix": confusion_matrix(true, pred, labels=labels).tolist(),
        "coverage_accuracy": coverage_accuracy(confidence, correct),
        "labels": list(names),
        "images": len(true),
    }


def paired_difference(a: Sequence[int], b: Sequence[int], truth: Sequence[int]) -> dict[str, float]:
    """Accuracy of predictions `a` minus that of `b` on the same rows, with the standard error of that
    paired difference. Its variance comes only from the rows exactly one of the two gets right, so two
    classifiers that mostly agree are compared far more tightly than their two accuracies' own errors allow."""
    a, b, truth = (np.asarray(x) for x in (a, b, truth))
    if not len(a) == len(b) == len(truth) > 0:
        raise ValueError(f"paired_difference needs two predictions per row: {len(a)}, {len(b)}, {len(truth)} rows")
    only_a, only_b = int(((a == truth) & (b != truth)).sum()), int(((b == truth) & (a != truth)).sum())
    n = len(truth)
    diff = (only_a - only_b) / n
    se = float(np.sqrt(max(only_a + only_b - n * diff**2, 0.0)) / n)
    return {"diff": diff, "se": se, "only_a": only_a, "only_b": only_b, "n": n}


def _one_vs_rest(true: np.ndarray, probs: np.ndarray, k: int) -> tuple[float | None, float | None]:
    """ROC-AUC and PR-AUC (average precision) of class k against the rest; None without both outcomes.
    Per class, because sklearn's multi-class roc_auc_score refuses a class absent from the data."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    positive = true == k
    if positive.all() or not positive.any():
        return None, None
    return float(roc_auc_score(positive, probs[:, k])), float(average_precision_score(positive, probs[:, k]))


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    """Top-label ECE (Guo et al. 2017): the gap between confidence and accuracy per equal-width bin,
    weighted by the bin's share of images. Written out because scikit-learn's calibration_curve is
    binary-only and ECE is a few lines over `reliability_bins`."""
    return float(sum(b["count"] * abs(b["accuracy"] - b["confidence"]) for b in reliability_bins(
        confidence, correct, bins)) / max(len(confidence), 1))


def reliability_bins(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> list[dict[str, float]]:
    """Non-empty equal-width confidence bins (lo, hi]: count, mean confidence and accuracy in each."""
    confidence, correct = np.asarray(confidence, dtype=np.float64), np.asarray(correct, dtype=np.float64)
    index = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    return [
        {"lo": b / bins, "hi": (b + 1) / bins, "count": int((index == b).sum()),
         "confidence": float(confidence[index == b].mean()), "accuracy": float(correct[index == b].mean())}
        for b in range(bins) if (index == b).any()
    ]


def coverage_accuracy(
    confidence: np.ndarray, correct: np.ndarray, thresholds: Sequence[float] = COVERAGE_THRESHOLDS
) -> list[dict[str, float | None]]:
    """For each `abstain_below` threshold: the share of images kept (top probability >= threshold) and
    the accuracy on them (None when none is kept)."""
    confidence, correct = np.asarray(confidence), np.asarray(correct, dtype=np.float64)
    points = []
    for threshold in thresholds:
        kept = confidence >= threshold
        points.append({"threshold": float(threshold), "coverage": float(kept.mean()),
                       "accuracy": float(correct[kept].mean()) if kept.any() else None})
    return points


def sensitivity_at_specificity(
    y_true: Sequence[int], probs: np.ndarray, positive: int, target: float, names: Sequence[str]
) -> dict[str, Any]:
    """The best sensitivity of `positive` (one vs the rest) whose specificity is at least `target`, and
    the probability threshold that reaches it: call positive when P(positive) >= threshold."""
    from sklearn.metrics import roc_curve

    is_positive = np.asarray(y_true) == positive
    if is_positive.all() or not is_positive.any():
        raise ValueError(
            f"sensitivity at a specificity needs images of {names[positive]!r} and of the other labels; "
            f"this data has {int(is_positive.sum())} of {len(is_positive)} images labelled {names[positive]!r}."
        )
    fpr, tpr, thresholds = roc_curve(is_positive, np.asarray(probs)[:, positive])
    meets = np.flatnonzero(fpr <= 1 - target + 1e-12)  # fpr rises along the curve; the first point has fpr 0
    best = meets[np.argmax(tpr[meets])]  # first of equal sensitivities: the highest specificity
    return {
        "positive_label": names[positive],
        "target_specificity": float(target),
        "sensitivity": float(tpr[best]),
        "specificity": float(1 - fpr[best]),
        "threshold": float(thresholds[best]) if np.isfinite(thresholds[best]) else None,  # None: never positive
    }


def module_results(
    modules: Sequence[Any], predictions: Sequence[Any], references: Sequence[Any], probs: np.ndarray | None = None
) -> dict[str, Any]:
    """Results of `evaluate` modules (`evaluate.load(...)`, or a path / name to load): predictions and
    references, plus `prediction_scores` (the label probabilities) for a module whose inputs name them.
    A key that the built-in metrics already use is prefixed with the module's name."""
    out: dict[str, Any] = {}
    for module in modules:
        if isinstance(module, str):
            import evaluate as hf_evaluate

            module = hf_evaluate.load(module)
        inputs = {"predictions": list(predictions), "references": list(references)}
        if probs is not None and "prediction_scores" in _input_names(module):
            inputs["prediction_scores"] = np.asarray(probs).tolist()
        for key, value in (module.compute(**inputs) or {}).items():
            out[f"{module.name}_{key}" if key in out or key in BUILT_IN else key] = value
    return out


BUILT_IN = frozenset({"accuracy", "balanced_accuracy", "macro_f1", "weighted_f1", "roc_auc", "pr_auc", "ece",
                      "per_class", "confusion_matrix", "coverage_accuracy", "labels", "images",
                      "exact_match", "bleu", "rougeL", "predictions"})


def _input_names(module: Any) -> set[str]:
    features = module.features if isinstance(module.features, list) else [module.features]
    return {name for f in features if f for name in f}


def _ratio(num: float, den: float) -> float | None:
    return float(num / den) if den else None


def _mean(values: Sequence[float | None]) -> float | None:
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None


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
