"""`evaluate`: classification metrics from every label's probability on label rows, text metrics on
answer rows.

Label rows are scored over the adapter's own labels (`config.labels`, set by `fit`): every label's
log-likelihood in one pass over the label trie (`score_labels`), the calibrated softmax of those
(`label_probabilities`), the argmax as the prediction. The probabilities give ROC-AUC, PR-AUC,
calibration error and the abstention curve, which the top label alone cannot. Answer rows are
answered as `describe` does and scored by exact match / BLEU / ROUGE-L. A dataset may mix both
kinds; the two sets of metrics are reported side by side. Rows run in batches of the same kind,
prompt and image count (one token layout), so per-row prompts batch as well as a single one.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import datasets
import numpy as np
import torch
from tqdm.auto import tqdm

from .data import FEATURES_COLUMN, as_dataset, image_counts, label_indices, label_names, row_images, row_kinds
from .features import features_as_tensors
from .generation import resolve_generation_config
from .metrics import classification_metrics, module_results, sensitivity_at_specificity, text_metrics
from .modeling import VisionLanguageCore

CARD_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc", "ece")
PLOTS = ("confusion_matrix_png", "roc_curve_png", "reliability_diagram_png", "coverage_accuracy_png")


def adapter_labels(model: VisionLanguageCore, data: datasets.Dataset) -> list[str]:
    """The adapter's labels; the data's for an adapter that has none (not trained on labels)."""
    return list(model.config.labels) or list(label_names(data) or [])


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
def _run(
    model: VisionLanguageCore,
    data: datasets.Dataset,
    labels: Sequence[str],
    *,
    prompt: str | None,
    batch_size: int,
    progress: bool,
    answers: bool,
    config: Any = None,
) -> tuple[dict[int, torch.Tensor], dict[int, str]]:
    """Every label's log-likelihood ([K]) for each label row, and the generated text for each answer
    row, by row index."""
    groups = _groups(data, model, prompt, answers)
    batches = [(key, rows[s : s + batch_size]) for key, rows in groups.items() for s in range(0, len(rows), batch_size)]
    scores: dict[int, torch.Tensor] = {}
    outs: dict[int, str] = {}
    was_training = model.training
    model.eval()
    try:
        with model.reuse_prompt_cache():  # the prompt head once for all batches
            for (kind, text, count), index in tqdm(batches, desc="Evaluating", unit="batch", disable=not progress):
                features = _features(model, data[index], count)
                if kind == "label":
                    scores.update(zip(index, model.score_labels(features, labels, text).float().cpu()))
                else:
                    outs.update(zip(index, model.generate_from_features(features, text, config)))
    finally:
        model.train(was_training)
    return scores, outs


def label_scores(
    model: VisionLanguageCore,
    data: datasets.Dataset,
    labels: Sequence[str],
    prompt: str | None = None,
    batch_size: int = 16,
    progress: bool = True,
) -> torch.Tensor:
    """[N, K] log-likelihood of each label for each label row of `data`, in row order (answer rows
    skipped; features cached or encoded here)."""
    scores, _ = _run(model, features_as_tensors(data), labels, prompt=prompt, batch_size=batch_size,
                     progress=progress, answers=False)
    return torch.stack([scores[i] for i in sorted(scores)])


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
    progress: bool = True,
    metrics: Sequence[Any] = (),
    at_specificity: float | None = None,
    positive_label: str | None = None,
    answers: bool = True,
    zero_shot_baseline: bool = False,
    generation_config: Any = None,
    **generation: Any,
) -> dict[str, Any]:
    """Classification metrics on label rows, exact match / BLEU / ROUGE-L on answer rows (text
    generated as `describe` does; `generation` takes its options: `max_new_tokens`, `num_beams`,
    `stop`, ...), side by side for a mixed set.

    Label rows: accuracy, balanced accuracy, macro / weighted F1, per-class precision, recall (= sensitivity),
    specificity, F1, support, ROC-AUC and PR-AUC; macro one-vs-rest `roc_auc` and `pr_auc`; `ece` (15 bins); the
    confusion matrix; `predicted_labels` (each label row's top label, in order); `coverage_accuracy` (the share
    of rows kept and their accuracy for each `abstain_below` threshold 0, 0.05, ..., 1). Scored over the adapter's
    labels; a label it does not know is an error. `at_specificity=0.95` adds `sensitivity_at_specificity` for
    `positive_label` (default: the second of two labels) with the probability threshold that reaches it. `metrics`
    are `evaluate` modules (or paths / names for `evaluate.load`) whose results join the report (computed on the
    label rows, or on the answer rows of a set without labels). With `output_dir`: confusion matrix, ROC,
    reliability and coverage PNGs there.

    Each row is asked its own prompt unless `prompt` is given. `answers=False` skips the answer rows
    (the Trainer's per-evaluation metrics). With `zero_shot_baseline`, `clip_zero_shot_accuracy` is the
    accuracy of the encoder's own CLIP / SigLIP zero-shot scores (see `zero_shot.py`; needs the full
    checkpoint and the images).
    """
    report: dict[str, Any] = {}
    if zero_shot_baseline:  # first: a model without a text tower fails before the evaluation runs
        from .zero_shot import zero_shot_accuracy

        report["clip_zero_shot_accuracy"] = zero_shot_accuracy(model, dataset, batch_size)
    data = features_as_tensors(as_dataset(dataset))
    names = adapter_labels(model, data)
    true = label_indices(data, names, "the evaluation data") if "label" in data.column_names else []
    positive = _positive_index(names, at_specificity, positive_label)
    config = resolve_generation_config(generation_config, **generation)
    scores, outs = _run(model, data, names, prompt=prompt, batch_size=batch_size, progress=progress,
                        answers=answers, config=config)
    if outs:
        order = sorted(outs)
        answer_column = list(data.select_columns(["answer"]).with_format(None)["answer"])  # no image decoded
        refs, generated = [answer_column[i] for i in order], [outs[i] for i in order]
        report.update(text_metrics(refs, generated), predictions=generated)
        if not scores:
            report.update(module_results(metrics, generated, refs))
    if scores:
        order = sorted(scores)
        probs = model.label_probabilities(torch.stack([scores[i] for i in order])).numpy()
        report.update(_classification(model, [true[i] for i in order], probs, names, positive, at_specificity,
                                      metrics, output_dir))
    return report


def _classification(
    model: VisionLanguageCore,
    true: list[int],
    probs: np.ndarray,
    names: list[str],
    positive: int | None,
    at_specificity: float | None,
    metrics: Sequence[Any],
    output_dir: str | None,
) -> dict[str, Any]:
    """The label rows' report (see `evaluate`); its headline numbers go on the model card."""
    report = classification_metrics(true, probs, names)
    top = probs.argmax(-1).tolist()
    report["predicted_labels"] = [names[i] for i in top]  # per label row, in the data's order
    if positive is not None:
        report["sensitivity_at_specificity"] = sensitivity_at_specificity(true, probs, positive, at_specificity, names)
    report.update(module_results(metrics, top, true, probs))
    if output_dir:
        report.update(_plots(true, probs, report, output_dir))
    card = {k: report[k] for k in CARD_METRICS if report[k] is not None}
    model.metrics = {**getattr(model, "metrics", {}), **card}
    return report
