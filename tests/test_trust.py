"""Imbalance, clinical metrics, calibration and abstention (issue #15) on the tiny models of conftest.

The coloured-squares task after one short epoch is a model that is right about two times in three
and overconfident, which is what calibration and abstention are for; longer runs reach 100%.

What each test proves:
- class_weight_balanced_raises_minority_recall: on 1:8 data, class weights and balanced sampling each lift the
  minority's recall by >= 0.5 over the plain run with the same seed; the weights follow scikit-learn's convention.
- balanced_sampler_draws_classes_equally_and_the_same_rows_per_epoch: half the draws are the minority; an epoch's
  draws repeat when the epoch is set again.
- balanced_sampling_resumes_exactly: a run resumed mid-way ends at the uninterrupted run's weights.
- collator_carries_class_weights_and_fit_checks_them: each row's class weight reaches the batch; unknown labels and
  free-text data are refused by name.
- evaluate_argmax_equals_predict_labels_over_the_adapter_labels: evaluate's prediction (argmax of every label's
  score) is predict_labels' label; an eval set missing a class is still scored over all the adapter's labels.
- label_rows_among_answer_rows: in a mixed set the label rows get exactly their label-only report (answer rows scored
  as text beside them), calibrate fits the same temperature, 'balanced' weights count label rows only and answer
  rows weigh 1.
- a_label_the_adapter_does_not_know_is_an_error: evaluate, calibrate and fit name the unknown label and the known ones.
- evaluate_report_plots_sensitivity_at_specificity_and_modules: the operating point's threshold gives the reported
  sensitivity and specificity; the four PNGs are written; a local `evaluate` module's result joins the report.
- calibrate_lowers_held_out_ece_and_survives_save_and_load: ECE on images not used for fitting falls by > 0.05, the
  predictions do not change, and probabilities are identical after save / load.
- fit_calibrate_on_the_eval_split: fit(calibrate=True) fits the temperature on the eval split (and needs one).
- abstention_raises_accuracy_on_the_kept_images: answers kept at abstain_below=0.8 are > 0.15 more accurate than all
  answers; abstain_below=0 equals predict and classify's top label.
- metric_for_best_model_roc_auc_picks_the_checkpoint: the restored checkpoint is the best on eval ROC-AUC, which
  neither accuracy nor the last step would have picked; an unknown metric is refused.
- cli_evaluate_reports_sensitivity_at_specificity: `vlm-adapters evaluate --at_specificity --positive_label`.
- cli_train_with_the_howto_flags: the X-ray how-to's train options run from the command line.
- an_undefined_metric_for_best_model_is_a_clear_error: ROC-AUC on a one-label eval split is refused by name.
"""

from __future__ import annotations

import json
import os

import datasets
import numpy as np
import pytest
import torch
from conftest import colour_dataset, colour_image
from safetensors.torch import load_file

from vlm_adapters import VLMCollator, attach, load
from vlm_adapters.cli import main
from vlm_adapters.config import CONFIG_NAME
from vlm_adapters.data import as_dataset, class_weights
from vlm_adapters.evaluation import label_scores
from vlm_adapters.trainer import BalancedSampler

LABELS = ["red", "green", "blue"]
# label_prior=False: a probe alone separates these colours perfectly, which would leave nothing for class
# weights, calibration or abstention to change; these tests are about the LLM's own scores.
QUICK = dict(learning_rate=5e-3, projector_lr=5e-3, disable_tqdm=True, logging_steps=100, label_prior=False)


def two_colours(counts: dict[str, int], seed: int) -> datasets.Dataset:
    rng = np.random.default_rng(seed)
    names = list(counts)
    rows = [(colour_image(name, rng), i) for i, name in enumerate(names) for _ in range(counts[name])]
    return datasets.Dataset.from_dict(
        {"image": [r[0] for r in rows], "label": [r[1] for r in rows]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)}),
    )


@pytest.fixture(scope="module")
def splits():
    return {"train": colour_dataset(8, seed=0), "valid": colour_dataset(10, seed=1), "test": colour_dataset(20, seed=2)}


@pytest.fixture(scope="module")
def half_trained(tmp_path_factory, llm_dir, vit_dir, splits):
    """One epoch on 24 images: about two in three right on the test split, and overconfident."""
    model = attach(vit_dir, llm_dir)
    model.fit(splits["train"], output_dir=str(tmp_path_factory.mktemp("run")), num_train_epochs=1,
              save_strategy="no", **QUICK)
    return model


def test_class_weight_balanced_raises_minority_recall(tmp_path, llm_dir, vit_dir):
    """1:8 red:green, one epoch, the same seed: weighting the loss or drawing rows class-balanced
    lifts the recall of green over the plain run (measured 0.1 -> 1.0 and 1.0 here)."""
    train, test = two_colours({"red": 64, "green": 8}, seed=0), two_colours({"red": 20, "green": 20}, seed=1)
    recall, results = {}, {}
    for name, option in (("plain", {}), ("weights", {"class_weight": "balanced"}),
                         ("sampling", {"balanced_sampling": True})):
        model = attach(vit_dir, llm_dir, seed=0)
        results[name] = model.fit(train, output_dir=str(tmp_path / name), num_train_epochs=1, save_strategy="no",
                                  seed=0, **option, **QUICK)
        recall[name] = model.evaluate(test, progress=False)["per_class"]["green"]["recall"]
    assert results["weights"]["class_weights"] == {"red": pytest.approx(72 / 128), "green": pytest.approx(72 / 16)}
    assert recall["weights"] >= recall["plain"] + 0.5, recall
    assert recall["sampling"] >= recall["plain"] + 0.5, recall


def test_balanced_sampler_draws_classes_equally_and_the_same_rows_per_epoch():
    sampler = BalancedSampler(["red"] * 64 + ["green"] * 8, seed=0)
    draws = []
    for epoch in range(20):
        sampler.set_epoch(epoch)
        draws += list(sampler)
    assert len(draws) == 20 * 72
    assert np.mean(np.array(draws) >= 64) == pytest.approx(0.5, abs=0.05)  # green is rows 64..71
    sampler.set_epoch(3)
    assert list(sampler) == draws[3 * 72 : 4 * 72]


def test_balanced_sampling_resumes_exactly(tmp_path, llm_dir, vit_dir, splits):
    args = dict(QUICK, max_steps=6, save_strategy="steps", save_steps=3, seed=0, balanced_sampling=True)
    full = attach(vit_dir, llm_dir)
    full.fit(splits["train"], output_dir=str(tmp_path / "full"), **args)  # 24 rows: 3 steps per epoch
    resumed = attach(vit_dir, llm_dir)
    resumed.fit(splits["train"], output_dir=str(tmp_path / "full"),
                resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"), **args)
    for a, b in zip(full.projector.parameters(), resumed.projector.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_collator_carries_class_weights_and_fit_checks_them(llm_dir, vit_dir):
    model = attach(vit_dir, llm_dir)
    rows = colour_dataset(1, seed=4)
    collator = VLMCollator(model, LABELS, class_weights={"red": 1.0, "green": 3.0, "blue": 0.5})
    batch = collator([rows[i] for i in range(3)])
    assert batch["row_weights"].tolist() == [1.0, 3.0, 0.5]
    assert "row_weights" not in VLMCollator(model, LABELS)([rows[0]])
    with pytest.raises(ValueError, match="purple"):
        model.fit(rows, class_weight={"purple": 2.0}, output_dir="unused")
    text = [{"image": rows[0]["image"], "answer": "a red square"}]
    with pytest.raises(ValueError, match="class_weight needs label data"):
        model.fit(text, class_weight="balanced", output_dir="unused")


def test_evaluate_argmax_equals_predict_labels_over_the_adapter_labels(half_trained, splits):
    model, test = half_trained, splits["test"]
    features = model.vision.encode_images(list(test["image"]))
    top = model.predict_labels(features, LABELS, model.config.classify_prompt)
    scores = label_scores(model, test, LABELS, progress=False)
    assert torch.equal(scores.argmax(-1), top)
    report = model.evaluate(test, progress=False)
    expected = np.zeros((3, 3), int)
    np.add.at(expected, (test["label"], top.numpy()), 1)
    assert report["confusion_matrix"] == expected.tolist()
    assert report["predicted_labels"] == [LABELS[i] for i in top]  # row by row, in the data's order
    # an eval set holding two of the three classes (string labels) is still scored over all three
    only_two = [{"image": row["image"], "label": LABELS[row["label"]]} for row in test if row["label"] != 2]
    partial = model.evaluate(only_two, progress=False)
    assert partial["labels"] == LABELS and len(partial["confusion_matrix"]) == 3
    assert partial["per_class"]["blue"]["support"] == 0
    assert partial["confusion_matrix"][:2] == report["confusion_matrix"][:2]


def test_label_rows_among_answer_rows(half_trained, splits):
    model, test = half_trained, splits["test"]
    labelled = [{"image": row["image"], "label": LABELS[row["label"]], "answer": None} for row in test]
    answers = [{"image": row["image"], "label": None, "answer": "a square"} for row in list(test)[:4]]
    mixed = labelled[:10] + answers + labelled[10:]
    alone = model.evaluate(labelled, progress=False)
    both = model.evaluate(mixed, max_new_tokens=2, progress=False)
    for key in ("accuracy", "balanced_accuracy", "roc_auc", "ece", "confusion_matrix", "coverage_accuracy",
                "predicted_labels"):
        assert both[key] == alone[key], key
    assert both["images"] == len(labelled) and len(both["predictions"]) == 4 and "exact_match" in both
    temperature = model.config.temperature
    try:
        fitted = model.calibrate(mixed, progress=False)
        model.config.temperature = temperature
        assert fitted == model.calibrate(labelled, progress=False)
    finally:
        model.config.temperature = temperature  # the module's model stays uncalibrated for the other tests
    assert class_weights(as_dataset(mixed), LABELS, "balanced") == class_weights(as_dataset(labelled), LABELS,
                                                                                   "balanced")
    collator = VLMCollator(model, LABELS, class_weights={"red": 2.0, "green": 3.0, "blue": 0.5})
    batch = collator([mixed[0], mixed[10], mixed[14]])
    assert batch["row_weights"].tolist() == [{"red": 2.0, "green": 3.0, "blue": 0.5}[labelled[0]["label"]], 1.0,
                                             {"red": 2.0, "green": 3.0, "blue": 0.5}[labelled[10]["label"]]]


def test_a_label_the_adapter_does_not_know_is_an_error(half_trained, splits):
    rows = [{"image": splits["test"][0]["image"], "label": "purple"}, {"image": splits["test"][1]["image"],
                                                                       "label": "red"}]
    with pytest.raises(ValueError, match=r"\['purple'\].*\['red', 'green', 'blue'\]"):
        half_trained.evaluate(rows)
    with pytest.raises(ValueError, match="purple"):
        half_trained.calibrate(rows)
    with pytest.raises(ValueError, match=r"the eval dataset has labels \['purple'\]"):  # before any image is encoded
        half_trained.fit(splits["train"], rows, output_dir="unused")


def test_evaluate_report_plots_sensitivity_at_specificity_and_modules(half_trained, splits, tmp_path):
    script = tmp_path / "hits.py"
    script.write_text(
        "import datasets\nimport evaluate\n\n\nclass Hits(evaluate.Metric):\n    def _info(self):\n"
        "        return evaluate.MetricInfo(description='', citation='', inputs_description='', features="
        "datasets.Features({'predictions': datasets.Value('int64'), 'references': datasets.Value('int64')}))\n\n"
        "    def _compute(self, predictions, references):\n"
        "        return {'hits': sum(p == r for p, r in zip(predictions, references))}\n"
    )
    report = half_trained.evaluate(splits["test"], output_dir=str(tmp_path / "eval"), at_specificity=0.9,
                                   positive_label="green", metrics=[str(script)], progress=False)
    assert report["hits"] == round(report["accuracy"] * 60)
    point = report["sensitivity_at_specificity"]
    assert point["positive_label"] == "green" and point["specificity"] >= 0.9
    probs = half_trained.classify(list(splits["test"]["image"]), LABELS)
    called = np.array([p["green"] >= point["threshold"] for p in probs])
    is_green = np.array(splits["test"]["label"]) == 1
    assert called[is_green].mean() == pytest.approx(point["sensitivity"])
    assert 1 - called[~is_green].mean() == pytest.approx(point["specificity"])
    for key in ("confusion_matrix_png", "roc_curve_png", "reliability_diagram_png", "coverage_accuracy_png"):
        assert os.path.getsize(report[key]) > 10_000, key
    assert report["coverage_accuracy"][0] == {"threshold": 0.0, "coverage": 1.0, "accuracy": report["accuracy"]}
    json.dumps(report)
    with pytest.raises(ValueError, match="positive_label"):
        half_trained.evaluate(splits["test"], at_specificity=0.9)  # three labels: which one is positive?


def test_calibrate_lowers_held_out_ece_and_survives_save_and_load(half_trained, splits, tmp_path):
    model = half_trained
    model.config.temperature = 1.0
    before = model.evaluate(splits["test"], progress=False)
    result = model.calibrate(splits["valid"], progress=False)
    after = model.evaluate(splits["test"], progress=False)
    assert model.config.temperature == result["temperature"] != 1.0
    assert result["ece_after"] <= result["ece_before"] and result["nll_after"] <= result["nll_before"]
    assert after["ece"] < before["ece"] - 0.05, (before["ece"], after["ece"])  # on images it was not fit on
    assert after["confusion_matrix"] == before["confusion_matrix"]  # the order of the labels never changes
    images = list(splits["test"]["image"])[:6]
    probs = model.classify(images, LABELS)
    folder = model.save_pretrained(str(tmp_path / "adapter"))
    assert json.loads((tmp_path / "adapter" / CONFIG_NAME).read_text())["temperature"] == result["temperature"]
    assert load(folder).classify(images, LABELS) == probs


def test_fit_calibrate_on_the_eval_split(tmp_path, llm_dir, vit_dir, splits):
    model = attach(vit_dir, llm_dir)
    with pytest.raises(ValueError, match="eval"):
        model.fit(splits["train"], calibrate=True, output_dir=str(tmp_path / "no-eval"))
    result = model.fit(splits["train"], splits["valid"], output_dir=str(tmp_path / "run"), num_train_epochs=1,
                       save_strategy="no", calibrate=True, **QUICK)
    assert result["calibration"]["temperature"] == model.config.temperature != 1.0
    assert result["calibration"]["images"] == len(splits["valid"])
    assert result["eval_ece"] == pytest.approx(result["calibration"]["ece_after"], abs=1e-6)


def test_abstention_raises_accuracy_on_the_kept_images(half_trained, splits):
    model, images, truth = half_trained, list(splits["test"]["image"]), [LABELS[i] for i in splits["test"]["label"]]
    answered = model.predict(images, LABELS, abstain_below=0.8)
    kept = [(a, t) for a, t in zip(answered, truth) if a is not None]
    overall = np.mean([p == t for p, t in zip(model.predict(images, LABELS), truth)])
    assert 0 < len(kept) < len(images)
    assert np.mean([a == t for a, t in kept]) > overall + 0.15
    top = [max(p, key=p.get) for p in model.classify(images, LABELS)]
    assert model.predict(images, LABELS, abstain_below=0.0) == top == model.predict(images, LABELS)
    assert model.predict(images[0], LABELS, abstain_below=1.0) is None  # one image -> one answer
    with pytest.raises(ValueError, match="abstain_below"):
        model.predict(images[0], LABELS, abstain_below=80)


def test_metric_for_best_model_roc_auc_picks_the_checkpoint(tmp_path, llm_dir, vit_dir, splits):
    model = attach(vit_dir, llm_dir)
    run = tmp_path / "run"
    result = model.fit(splits["train"], colour_dataset(6, seed=1), output_dir=str(run), max_steps=12,
                       save_strategy="steps", save_steps=2, eval_strategy="steps", eval_steps=2,
                       save_total_limit=None, load_best_model_at_end=True, metric_for_best_model="roc_auc", **QUICK)
    evals = [row for row in result["log_history"] if "eval_roc_auc" in row]
    best = max(evals, key=lambda row: row["eval_roc_auc"])  # the first of equal values, as the Trainer keeps
    assert result["best_model_checkpoint"] == str(run / f"checkpoint-{best['step']}")
    # the test has power only if accuracy or the last step would have picked another checkpoint
    assert best["step"] != max(evals, key=lambda row: row["eval_accuracy"])["step"]
    assert best["step"] != evals[-1]["step"]
    restored = load_file(run / f"checkpoint-{best['step']}" / "projector.safetensors")
    assert all(torch.equal(restored[k], v) for k, v in model.projector.state_dict().items())
    with pytest.raises(ValueError, match="roc_auc"):
        attach(vit_dir, llm_dir).fit(splits["train"], splits["valid"], metric_for_best_model="auroc",
                                     output_dir=str(tmp_path / "bad"))


def test_cli_evaluate_reports_sensitivity_at_specificity(half_trained, splits, tmp_path):
    folder = half_trained.save_pretrained(str(tmp_path / "adapter"))
    splits["test"].save_to_disk(str(tmp_path / "data"))
    assert main(["evaluate", "--adapter", folder, "--data", str(tmp_path / "data"), "--output_dir",
                 str(tmp_path / "eval"), "--at_specificity", "0.9", "--positive_label", "green"]) == 0
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert report["sensitivity_at_specificity"]["positive_label"] == "green"
    assert {"roc_auc", "ece", "balanced_accuracy", "coverage_accuracy"} <= set(report)
    assert (tmp_path / "eval" / "roc_curve.png").exists()


def test_cli_train_with_the_howto_flags(tmp_path, llm_dir, vit_dir):
    """The X-ray how-to's `train` flags: class weights, a ROC-AUC-chosen checkpoint, calibration."""
    rng = np.random.default_rng(3)
    for name, count in (("red", 32), ("green", 8)):
        os.makedirs(tmp_path / "folder" / name)
        for i in range(count):
            colour_image(name, rng).save(tmp_path / "folder" / name / f"{i}.png")
    options = {"vision": vit_dir, "llm": llm_dir, "train": str(tmp_path / "folder"),
               "output_dir": str(tmp_path / "run"), "num_train_epochs": 2, "learning_rate": 5e-3,
               "projector_lr": 5e-3, "class_weight": "balanced", "calibrate": True, "eval_strategy": "epoch",
               "save_strategy": "epoch", "load_best_model_at_end": True, "metric_for_best_model": "roc_auc",
               "disable_tqdm": True, "label_prior": False}
    (tmp_path / "train.json").write_text(json.dumps(options))
    assert main(["train", str(tmp_path / "train.json")]) == 0
    config = json.loads((tmp_path / "run" / "adapter" / CONFIG_NAME).read_text())
    assert config["labels"] == ["green", "red"] and config["temperature"] != 1.0


def test_an_undefined_metric_for_best_model_is_a_clear_error(tmp_path, llm_dir, vit_dir, splits):
    only_red = splits["valid"].filter(lambda row: row["label"] == 0)
    with pytest.raises(ValueError, match=r"undefined on the eval data.*\['red'\]"):
        attach(vit_dir, llm_dir).fit(splits["train"], only_red, output_dir=str(tmp_path / "run"), max_steps=1,
                                     eval_strategy="steps", eval_steps=1, save_strategy="steps", save_steps=1,
                                     load_best_model_at_end=True, metric_for_best_model="roc_auc", **QUICK)
