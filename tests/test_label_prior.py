"""The label prior: a linear probe on pooled encoder features plus a gate (>= 0, closed at first) on the
LLM's centred label log-likelihoods."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import colour_dataset, colour_image

from vlm_adapters import attach, load
from vlm_adapters.hub import AdapterLoadError
from vlm_adapters.label_prior import (
    MIN_GATE_ROWS_PER_CLASS,
    LabelPrior,
    calibrate,
    mixed_log_probs,
    out_of_fold_logits,
    pool_images,
    probe_pipeline,
    save_prior,
)

LABELS = ["red", "green", "blue"]
PROMPT = "What is shown in this image?"


@pytest.fixture(scope="module")
def data():
    ds = colour_dataset(8, seed=5)
    return [ds[i]["image"] for i in range(len(ds))], np.array(ds["label"])


def _with_prior(model, images, targets):
    features = model.vision.encode_images(images)
    pooled = features.mean(1).double().numpy()
    model.label_prior, held_out = LabelPrior.fit(pooled, targets, LABELS)
    return features, pooled, held_out


def test_closed_gate_scores_and_predicts_as_the_probe(llm_dir, vit_dir, data):
    """Before the gate opens, label scores are the probe's calibrated log-probabilities (scaler and
    temperature folded in) and predict returns the probe's predictions: the LLM can only add."""
    images, targets = data
    model = attach(vit_dir, llm_dir)
    features, pooled, _ = _with_prior(model, images, targets)
    probe = probe_pipeline().fit(pooled, targets)
    temperature, floor = calibrate(out_of_fold_logits(pooled, targets, 3), targets)
    logits = torch.from_numpy(probe.decision_function(pooled) / temperature).float()
    torch.testing.assert_close(model.score_labels(features, LABELS, PROMPT), mixed_log_probs(logits, floor),
                               rtol=1e-4, atol=1e-4)
    assert model.predict_labels(features, LABELS, PROMPT).tolist() == probe.predict(pooled).tolist()
    subset = model.score_labels(features, ["blue", "red"], PROMPT)  # renormalised over the candidates given
    torch.testing.assert_close(subset, mixed_log_probs(logits[:, [2, 0]], floor), rtol=1e-4, atol=1e-4)


def test_open_gate_adds_the_centred_llm_scores_and_predict_agrees(llm_dir, vit_dir, data):
    images, targets = data
    model = attach(vit_dir, llm_dir)
    features, _, _ = _with_prior(model, images, targets)
    prior = model.label_prior
    prior.weight.mul_(1e-3)  # a probe this unsure leaves the decision to the LLM
    prior.gate.fill_(3.0)
    prior.center.copy_(torch.tensor([0.5, -2.0, 1.0]))
    combined = model.score_labels(features, LABELS, PROMPT)
    llm = model.score_labels(features, LABELS, PROMPT, prior=False)
    torch.testing.assert_close(combined, prior.log_probs(features, LABELS) + 3.0 * (llm - prior.center))
    assert not torch.equal(combined.argmax(-1), prior.log_probs(features, LABELS).argmax(-1))  # the LLM counts
    assert model.predict_labels(features, LABELS, PROMPT).tolist() == combined.argmax(-1).tolist()
    unknown = ["red", "blue", "purple"]  # a label the prior does not know: the LLM alone
    expected = model.score_labels(features, unknown, PROMPT, prior=False).argmax(-1)
    assert model.predict_labels(features, unknown, PROMPT).tolist() == expected.tolist()


def _pairs(model, n: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """[n, 2, tokens, hidden] features of rows of two images, labelled by the second's colour (the first
    is another colour)."""
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, 3, n)
    firsts = (targets + rng.integers(1, 3, n)) % 3
    encode = model.vision.encode_images
    first = encode([colour_image(LABELS[k], rng) for k in firsts])
    second = encode([colour_image(LABELS[k], rng) for k in targets])
    return torch.stack([first, second], 1), targets


def test_a_prior_on_rows_of_two_images_pools_each_image_on_its_own(llm_dir, vit_dir):
    """Pooling both images together loses which is second; side by side, the probe reads the second.
    Rows of another image count are scored by the LLM alone."""
    model = attach(vit_dir, llm_dir)
    (train, targets), (test, truth) = _pairs(model, 60, seed=0), _pairs(model, 30, seed=1)
    model.label_prior, _ = LabelPrior.fit(pool_images(train).numpy(), targets, LABELS)
    assert model.label_prior.weight.shape[1] == 2 * train.shape[-1]
    assert (model.predict_labels(test, LABELS, PROMPT).numpy() == truth).mean() >= 0.9
    together, _ = LabelPrior.fit(train.flatten(1, -2).mean(1).double().numpy(), targets, LABELS)
    assert (together.log_probs(test, LABELS).argmax(-1).numpy() == truth).mean() <= 0.75
    single = test[:, 1]
    assert not model.label_prior.covers(LABELS, single)
    torch.testing.assert_close(model.score_labels(single, LABELS, PROMPT),
                               model.score_labels(single, LABELS, PROMPT, prior=False))
    with pytest.raises(ValueError, match="rows of 2 image"):
        model.label_prior.log_probs(single, LABELS)


def test_gate_opens_only_where_the_llm_adds_significant_likelihood(data):
    _, targets = data
    rng = np.random.default_rng(0)
    probe = np.log(np.full((len(targets), 3), 1 / 3) + 0.3 * np.eye(3)[targets])  # right, unsure
    prior = LabelPrior(torch.zeros(3, 4), torch.zeros(3), LABELS)
    offsets = np.array([5.0, -3.0, 0.0])  # a label's length moves its log-likelihood, whatever the image
    prior.fit_gate(probe, rng.normal(size=(len(targets), 3)) * 4 + offsets, targets)
    assert float(prior.gate) == 0.0  # noise
    useful = 2.0 * np.eye(3)[targets] + offsets + rng.normal(size=(len(targets), 3)) * 0.3
    prior.fit_gate(probe, useful, targets)
    assert float(prior.gate) > 0.5
    np.testing.assert_allclose(prior.center.numpy(), useful.mean(0), rtol=1e-5)
    # a weak signal on a few rows does not pass the likelihood-ratio test; the same rows 40 times over do
    few = [0, 1, 8, 9, 16, 17]
    weak = 0.4 * np.eye(3)[targets[few]] + rng.normal(size=(6, 3))
    prior.fit_gate(probe[few], weak, targets[few])
    assert float(prior.gate) == 0.0
    prior.fit_gate(np.tile(probe[few], (40, 1)), np.tile(weak, (40, 1)), np.tile(targets[few], 40))
    assert float(prior.gate) > 0.1
    # a strong signal on fewer than MIN_GATE_ROWS_PER_CLASS rows per class keeps the gate closed
    rows = np.concatenate([np.flatnonzero(targets == k)[: MIN_GATE_ROWS_PER_CLASS - 1] for k in range(3)])
    prior.fit_gate(probe[rows], useful[rows], targets[rows])
    assert float(prior.gate) == 0.0
    rows = np.concatenate([np.flatnonzero(targets == k)[:MIN_GATE_ROWS_PER_CLASS] for k in range(3)])
    prior.fit_gate(probe[rows], useful[rows], targets[rows])
    assert float(prior.gate) > 0.5


def test_held_out_log_probs_are_calibrated_and_less_sure_than_in_sample(data):
    _, targets = data
    pooled = np.random.default_rng(0).normal(size=(len(targets), 40)) + 0.5 * targets[:, None]
    prior, held_out = LabelPrior.fit(pooled, targets, LABELS)
    assert held_out.shape == (len(targets), 3) and np.allclose(np.exp(held_out).sum(1), 1.0)
    logits = torch.from_numpy(out_of_fold_logits(pooled, targets, 3))
    truth = np.arange(len(targets)), targets
    temperature, floor = calibrate(logits.numpy(), targets)
    nll = lambda t, f: -mixed_log_probs(logits / t, f).numpy()[truth].mean()  # noqa: E731
    assert nll(temperature, floor) < min(nll(temperature * 1.2, floor), nll(temperature / 1.2, floor), nll(1.0, 0.0))
    np.testing.assert_allclose(held_out, mixed_log_probs(logits / temperature, floor).numpy())
    in_sample = prior.log_probs(torch.from_numpy(pooled)[:, None], LABELS).numpy()
    assert in_sample[truth].mean() > held_out[truth].mean()


def test_fit_adds_the_prior_and_it_is_saved_and_loaded(tmp_path, llm_dir, vit_dir, colours):
    train, test = colours
    model = attach(vit_dir, llm_dir)
    result = model.fit(train, output_dir=str(tmp_path / "run"), max_steps=2, save_strategy="no", disable_tqdm=True)
    assert model.label_prior is not None and model.label_prior.labels == LABELS
    assert result["label_prior_gate"] == float(model.label_prior.gate) >= 0
    images = [test[i]["image"] for i in range(6)]
    before = model.classify(images, LABELS)
    again = load(model.save_pretrained(str(tmp_path / "adapter")))
    for name, tensor in model.label_prior.state_dict().items():
        torch.testing.assert_close(again.label_prior.state_dict()[name], tensor)
    for a, b in zip(before, again.classify(images, LABELS), strict=True):
        assert a.keys() == b.keys() and np.allclose(list(a.values()), list(b.values()), atol=1e-4)
    folder = tmp_path / "adapter"
    save_prior(LabelPrior(torch.zeros(2, 4), torch.zeros(2), LABELS[:2]), str(folder / "label_prior.safetensors"))
    with pytest.raises(AdapterLoadError, match="one row per label of its config"):
        load(str(folder))
    with_eval = attach(vit_dir, llm_dir)  # an eval split: the gate is fit on its rows, all of them
    with_eval.fit(train, test, output_dir=str(tmp_path / "eval"), max_steps=1, save_strategy="no")
    features = with_eval.vision.encode_images([test[i]["image"] for i in range(len(test))])
    llm = with_eval.score_labels(features, LABELS, with_eval.config.classify_prompt, prior=False)
    torch.testing.assert_close(with_eval.label_prior.center, llm.mean(0), rtol=1e-4, atol=1e-3)
    off = attach(vit_dir, llm_dir)
    off.fit(train, output_dir=str(tmp_path / "off"), max_steps=1, save_strategy="no", label_prior=False)
    assert off.label_prior is None


def test_gate_rows_are_kept_out_of_the_llm_training_stratified(colours):
    from vlm_adapters.prior_fit import hold_out_gate_rows

    train = colours[0].add_column("row", list(range(len(colours[0]))))
    rest, gate = hold_out_gate_rows(train, LABELS, 0.25, seed=0)
    assert len(gate) == 18 and len(rest) == len(train) - 18
    assert np.bincount(np.asarray(train["label"])[gate]).tolist() == [6, 6, 6]
    assert rest["row"] == np.setdiff1d(np.arange(len(train)), gate).tolist()  # every other row, in order
    assert hold_out_gate_rows(train, LABELS, 0.0, seed=0)[1] is None
    assert hold_out_gate_rows(train.select(range(0, 72, 12)), LABELS, 0.5, seed=0)[1].tolist() == [0, 3, 5]
    assert hold_out_gate_rows(train.select(range(0, 72, 24)), LABELS, 0.5, seed=0)[1] is None  # 1 per class


def test_class_weight_reaches_the_probe():
    """fit(class_weight=...) weights the probe as it weights the LLM's loss: the folded prior predicts what
    sklearn's weighted probe predicts, and the rare class more often than the unweighted probe."""
    rng = np.random.default_rng(0)
    targets = np.array([0] * 90 + [1] * 10)
    pooled = rng.normal(size=(100, 4)) + targets[:, None] * 1.0  # overlapping classes, 9:1
    labels = ["common", "rare"]
    weights = {0: 100 / 180, 1: 100 / 20}  # 'balanced'
    plain, _ = LabelPrior.fit(pooled, targets, labels)
    weighted, _ = LabelPrior.fit(pooled, targets, labels, class_weight=weights)
    features = torch.from_numpy(pooled)[:, None]
    predicted = weighted.log_probs(features, labels).argmax(-1).numpy()
    assert predicted.tolist() == probe_pipeline(class_weight=weights).fit(pooled, targets).predict(pooled).tolist()
    assert (predicted == 1).sum() > (plain.log_probs(features, labels).argmax(-1).numpy() == 1).sum()
