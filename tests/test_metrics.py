"""Metrics and temperature fitting on numbers whose answers are known (no model).

What each test proves:
- classification_metrics_from_probabilities: balanced accuracy, per-class specificity, macro ROC-AUC (equal to
  scikit-learn's multi-class one) by hand.
- a_class_without_images_keeps_its_row_and_has_no_auc: an absent class has support 0 and ROC-AUC None; JSON-safe.
- expected_calibration_error_by_hand: 15-bin top-label ECE on two hand-made cases.
- sensitivity_at_specificity_and_its_threshold: the operating point and its threshold on a hand-made ROC; one-sided
  data is refused by name.
- coverage_accuracy_keeps_the_confident_images: coverage and accuracy per abstention threshold.
- paired_difference_by_hand: accuracy difference of two classifiers on the same rows and its standard error from the
  rows only one gets right; rows of unequal count are refused.
- evaluate_modules_run_offline_from_a_local_script: a metric script written here loads offline (as a path and as a
  module), gets the label probabilities it asks for, and a name the built-ins use is prefixed.
- fit_temperature_recovers_a_known_temperature: scores made 3x too sharp (or 2x too flat) give T = 3 (0.5).
- temperature_and_class_weight_options: the config's temperature defaults to 1 (also for adapters saved before it
  existed) and must be positive; class_weight parses the CLI's JSON and refuses bad values.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from vlm_adapters.calibration import fit_temperature
from vlm_adapters.config import CONFIG_NAME, AdapterConfig, FitOptions
from vlm_adapters.metrics import (
    classification_metrics,
    coverage_accuracy,
    expected_calibration_error,
    module_results,
    paired_difference,
    sensitivity_at_specificity,
)

NAMES = ["a", "b", "c"]


def _probs(rows):
    probs = np.asarray(rows, dtype=np.float64)
    return probs / probs.sum(-1, keepdims=True)


def test_classification_metrics_from_probabilities():
    true = [0, 0, 1, 1, 2, 2]
    probs = _probs([[.8, .1, .1], [.6, .3, .1], [.2, .7, .1], [.1, .3, .6], [.1, .2, .7], [.2, .2, .6]])
    m = classification_metrics(true, probs, NAMES)
    assert m["accuracy"] == pytest.approx(5 / 6)
    assert m["balanced_accuracy"] == pytest.approx((1 + 0.5 + 1) / 3)
    assert m["macro_f1"] == pytest.approx((1 + 2 / 3 + 0.8) / 3)
    b = m["per_class"]["b"]
    assert b["precision"] == 1.0 and b["recall"] == b["sensitivity"] == 0.5 and b["support"] == 2
    assert b["specificity"] == 1.0  # no a / c image was called b
    assert m["per_class"]["c"]["specificity"] == pytest.approx(3 / 4)  # one b image called c
    assert m["confusion_matrix"] == [[2, 0, 0], [0, 1, 1], [0, 0, 2]]
    assert m["roc_auc"] == pytest.approx(roc_auc_score(true, probs, multi_class="ovr", average="macro"))
    assert m["per_class"]["a"]["roc_auc"] == pytest.approx(1.0)
    assert 0 < m["pr_auc"] <= 1 and m["images"] == 6


def test_a_class_without_images_keeps_its_row_and_has_no_auc():
    m = classification_metrics([0, 1, 0], _probs([[.9, .05, .05], [.2, .7, .1], [.5, .1, .4]]), NAMES)
    assert m["per_class"]["c"]["support"] == 0 and m["per_class"]["c"]["roc_auc"] is None
    assert m["roc_auc"] == pytest.approx(1.0)  # the mean over the classes that have both outcomes
    assert len(m["confusion_matrix"]) == 3
    json.dumps(m)  # None, not NaN: the report is valid JSON


def test_expected_calibration_error_by_hand():
    # bin (0.6, 0.667]: 0.65, 0.65 with one right -> |0.5 - 0.65|; bin (0.933, 1]: 0.95 right -> |1 - 0.95|
    confidence, correct = np.array([0.65, 0.65, 0.95]), np.array([True, False, True])
    assert expected_calibration_error(confidence, correct) == pytest.approx((2 * 0.15 + 0.05) / 3)
    assert expected_calibration_error(np.array([0.99, 0.99]), np.array([True, True])) == pytest.approx(0.01)


def test_sensitivity_at_specificity_and_its_threshold():
    true = np.array([0] * 10 + [1] * 10)
    p_pos = np.array([.05, .1, .15, .2, .25, .3, .35, .4, .45, .9, .3, .5, .55, .6, .65, .7, .75, .8, .85, .95])
    probs = np.stack([1 - p_pos, p_pos], 1)
    point = sensitivity_at_specificity(true, probs, 1, 0.9, ["normal", "pneumonia"])
    # specificity 0.9 allows one false positive (the negative at 0.9): threshold 0.5 catches 9 of 10 positives
    assert point == {"positive_label": "pneumonia", "target_specificity": 0.9, "sensitivity": pytest.approx(0.9),
                     "specificity": pytest.approx(0.9), "threshold": pytest.approx(0.5)}
    called = p_pos >= point["threshold"]  # the threshold means what it says
    assert (1 - called[:10].mean(), called[10:].mean()) == pytest.approx((0.9, 0.9))
    strict = sensitivity_at_specificity(true, probs, 1, 0.95, ["normal", "pneumonia"])  # no false positive
    assert strict["specificity"] == 1.0 and strict["sensitivity"] == pytest.approx(0.1)  # only the 0.95
    with pytest.raises(ValueError, match="pneumonia"):
        sensitivity_at_specificity(np.zeros(4, int), np.full((4, 2), 0.5), 1, 0.9, ["normal", "pneumonia"])


def test_coverage_accuracy_keeps_the_confident_images():
    points = coverage_accuracy(np.array([0.9, 0.8, 0.6, 0.4]), np.array([1, 1, 0, 0]), thresholds=[0.0, 0.7, 0.95])
    assert points == [
        {"threshold": 0.0, "coverage": 1.0, "accuracy": 0.5},
        {"threshold": 0.7, "coverage": 0.5, "accuracy": 1.0},
        {"threshold": 0.95, "coverage": 0.0, "accuracy": None},
    ]


METRIC_SCRIPT = '''
import datasets
import evaluate


class Hits(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="right answers and the mean probability given to the true label", citation="",
            inputs_description="",
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64"),
                                        "prediction_scores": datasets.Sequence(datasets.Value("float32"))}),
        )

    def _compute(self, predictions, references, prediction_scores):
        return {"hits": sum(p == r for p, r in zip(predictions, references)),
                "accuracy": -1.0,
                "true_probability": sum(s[r] for s, r in zip(prediction_scores, references)) / len(references)}
'''


def test_paired_difference_by_hand():
    truth = [0, 1, 2, 2, 0]
    p = paired_difference([0, 1, 2, 0, 1], [0, 1, 0, 1, 1], truth)  # 3 right vs 2: only row 2 differs
    assert (p["only_a"], p["only_b"], p["n"]) == (1, 0, 5) and p["diff"] == pytest.approx(0.2)
    d = np.array([0, 0, 1, 0, 0])  # per-row difference of "right"
    assert p["se"] == pytest.approx(d.std() / np.sqrt(5))
    same = paired_difference(truth, truth, truth)
    assert same["diff"] == 0 and same["se"] == 0
    with pytest.raises(ValueError, match="two predictions per row"):
        paired_difference([0, 1], [0], [0, 1])


def test_evaluate_modules_run_offline_from_a_local_script(tmp_path):
    import evaluate

    script = tmp_path / "hits.py"
    script.write_text(METRIC_SCRIPT)
    probs = _probs([[.8, .2], [.4, .6], [.7, .3]])
    for module in (str(script), evaluate.load(str(script))):
        out = module_results([module], [0, 1, 0], [0, 1, 1], probs)
        assert out["hits"] == 2 and out["true_probability"] == pytest.approx((.8 + .6 + .3) / 3)
        assert out["hits_accuracy"] == -1.0 and "accuracy" not in out  # a built-in name is prefixed


def test_fit_temperature_recovers_a_known_temperature():
    generator = torch.Generator().manual_seed(0)
    logits = 2.0 * torch.randn(4000, 4, generator=generator)
    targets = torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]
    assert fit_temperature(3.0 * logits, targets) == pytest.approx(3.0, rel=0.08)  # scores 3x too sharp
    assert fit_temperature(0.5 * logits, targets) == pytest.approx(0.5, rel=0.08)


def test_temperature_and_class_weight_options(tmp_path):
    assert AdapterConfig().temperature == 1.0
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"adapter": "lora"}))  # written before the field existed
    assert AdapterConfig.load(tmp_path).temperature == 1.0
    with pytest.raises(ValueError, match="temperature"):
        AdapterConfig(temperature=0.0)
    assert FitOptions(class_weight='{"pneumonia": 4}').class_weight == {"pneumonia": 4.0}  # the CLI's JSON
    for bad in ("balance", {"a": 0}, {"a": "2"}):
        with pytest.raises(ValueError, match="class_weight"):
            FitOptions(class_weight=bad)
