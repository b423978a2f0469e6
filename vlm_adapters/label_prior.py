"""`LabelPrior`: the linear probe on the frozen encoder's pooled features, kept inside the model, and a
gate that decides how much the LLM adds to it.

Logistic regression on standardised, mean-pooled encoder features is the cheapest strong classifier
there is; from a few examples per class it beats a fine-tuned LLM that has to learn a projector first.
So a label's score is

    probe log-prob + gate * (LLM label log-likelihood - the label's mean log-likelihood)

with the gate a scalar >= 0 that starts at 0 (zero-init gating, as LLaMA-Adapter gates its adaption
prompts): before the gate is fit the model predicts exactly as the probe. `fit` fits the probe on the
cached features and, after training, the gate by the log-likelihood of the true labels on rows the
probe did not see (out-of-fold probe log-probs, stacking; the eval split when there is one). Centring
each label's LLM score on its mean keeps a label's length and wording, which move its log-likelihood by
several nats, from swamping the probe.

The scaler and the temperature are folded into the linear map; the prior is saved beside the projector
(`label_prior.safetensors`), rows in the order of `labels`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

PRIOR_FILE = "label_prior.safetensors"
CHI2_1DOF_95 = 3.841  # the 95% quantile of chi-square with one degree of freedom
# Fewer held-out rows per class than this and the gate stays closed: on 2 rows per class a likelihood gain
# that passed the test still cost accuracy (docs/results.md, learning curve, float32 at 10 per class).
MIN_GATE_ROWS_PER_CLASS = 5


class LabelPrior(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, labels: Sequence[str], floor: float = 0.0) -> None:
        super().__init__()
        if weight.dim() != 2 or weight.shape[0] != len(labels) or bias.shape != (len(labels),):
            raise ValueError(f"a prior over {len(labels)} labels needs weight [K, C] and bias [K]; "
                             f"got {tuple(weight.shape)} and {tuple(bias.shape)}.")
        self.labels = list(labels)
        # float64, as sklearn fits it: in float32 the folded map flips near-ties against the probe's own predictions
        self.register_buffer("weight", weight.double())
        self.register_buffer("bias", bias.double())
        self.register_buffer("floor", torch.tensor(float(floor)))  # see `calibrate`
        self.register_buffer("gate", torch.tensor(0.0))
        self.register_buffer("center", torch.zeros(len(labels)))

    def covers(self, candidates: Sequence[str], features: torch.Tensor) -> bool:
        """Whether the prior knows every candidate and can pool these rows as it was fit: rows of as many
        images as its own, or any rows for a prior one image wide (all their images pooled together)."""
        return set(candidates) <= set(self.labels) and self._pooling(features) is not None

    @property
    def gated(self) -> bool:
        """Whether the LLM counts at all (gate > 0); with the gate closed the probe alone decides."""
        return bool(self.gate > 0)

    def log_probs(self, features: torch.Tensor, candidates: Sequence[str]) -> torch.Tensor:
        """[B, K] probe log-probabilities over `candidates` (a subset of `labels`) from encoder features
        [B, tokens, hidden] or [B, images, tokens, hidden] (see `pool_images`)."""
        pool = self._pooling(features)
        if pool is None:
            raise ValueError(f"this label prior was fit on rows of {self.weight.shape[1] // features.shape[-1]} "
                             f"image(s); these rows have {features.shape[1] if features.dim() == 4 else 1}. "
                             "Score them with prior=False (the LLM alone).")
        pooled = pool(features).to(self.weight.device)
        rows = self._rows(candidates)
        return mixed_log_probs(pooled @ self.weight[rows].T + self.bias[rows], float(self.floor)).float()

    def offset_and_scale(self, features: torch.Tensor, candidates: Sequence[str]) -> tuple[torch.Tensor, float]:
        """(offset [B, K], scale): a label's score is offset + scale * its LLM log-likelihood."""
        gate = float(self.gate)
        return self.log_probs(features, candidates) - gate * self.center[self._rows(candidates)], gate

    def added_to(self, llm_scores: torch.Tensor, features: torch.Tensor, candidates: Sequence[str]) -> torch.Tensor:
        offset, scale = self.offset_and_scale(features, candidates)
        return offset + scale * llm_scores

    def _pooling(self, features: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """How to pool these rows as the prior was fit, read off the shapes: each image on its own, or
        (a prior whose width is one image's) every image together; None when neither gives its width."""
        images = features.shape[1] if features.dim() == 4 else 1
        if images * features.shape[-1] == self.weight.shape[1]:
            return pool_images
        if features.shape[-1] == self.weight.shape[1]:
            return pool_together
        return None

    def _rows(self, candidates: Sequence[str]) -> torch.Tensor:
        return torch.tensor([self.labels.index(c) for c in candidates], device=self.weight.device)

    @classmethod
    def fit(cls, pooled: np.ndarray, targets: np.ndarray, labels: Sequence[str], seed: int = 0,
            class_weight: dict[int, float] | None = None, views: np.ndarray | None = None
            ) -> tuple[LabelPrior, np.ndarray]:
        """The demo's probe on every row (weighted by fit's class_weight, as the LLM's loss is) and its
        `views` [V, N, C] (more examples of each row's class, prior_views.py), calibrated on held-out
        predictions; returns it with each row's held-out (out-of-fold) log-probabilities."""
        held_out = out_of_fold_logits(pooled, targets, len(labels), seed=seed, class_weight=class_weight, views=views)
        temperature, floor = calibrate(held_out, targets)
        probe = probe_pipeline(seed, class_weight=class_weight).fit(*_with_views(pooled, targets, views))
        weight, bias = _fold(probe, len(labels))
        prior = cls(torch.from_numpy(weight / temperature), torch.from_numpy(bias / temperature), labels, floor)
        return prior, mixed_log_probs(torch.from_numpy(held_out / temperature), floor).numpy()

    def fit_gate(self, probe_log_probs: np.ndarray, llm_scores: np.ndarray, targets: np.ndarray) -> None:
        """Centre each label's LLM scores on these rows' mean, then pick the gate in [0, 4] that maximises
        the log-likelihood of the true labels under probe + gate * centred LLM (a 1-D convex problem).
        The gate opens only if the LLM's gain passes a likelihood-ratio test (chi-square, one degree of
        freedom, 5%) on at least MIN_GATE_ROWS_PER_CLASS rows per class: from a few held-out rows the
        optimum is noisy, and a gate opened on noise costs accuracy where the probe is better than the LLM."""
        from scipy.optimize import minimize_scalar
        from scipy.special import log_softmax

        center = llm_scores.mean(0)
        centred, truth = llm_scores - center, (np.arange(len(targets)), targets)

        def nll(gate: float) -> float:
            return -log_softmax(probe_log_probs + gate * centred, axis=1)[truth].mean()

        best = minimize_scalar(nll, bounds=(0.0, 4.0), method="bounded").x
        enough = len(targets) >= MIN_GATE_ROWS_PER_CLASS * len(np.unique(targets))
        gate = float(best) if enough and 2 * len(targets) * (nll(0.0) - nll(best)) > CHI2_1DOF_95 else 0.0
        self.center.copy_(torch.from_numpy(center))
        self.gate.fill_(gate)


def pool_images(features: torch.Tensor) -> torch.Tensor:
    """[B, images * hidden] each image's tokens mean-pooled, the images side by side in row order, from
    [B, tokens, hidden] or [B, images, tokens, hidden]: pooling the images together would lose which is
    which (a probe on rows of two images could not tell the second from the first)."""
    return features.double().mean(-2).flatten(1)


def pool_together(features: torch.Tensor) -> torch.Tensor:
    """[B, hidden] every token of each row mean-pooled, whatever image it belongs to."""
    return features.flatten(1, -2).double().mean(1)


def probe_pipeline(seed: int = 0, c: float = 0.5, class_weight: dict[int, float] | None = None):  # noqa: ANN201
    """The linear probe every comparison uses (the demo, the mosaic task, the learning curve, the label prior):
    `StandardScaler` + multinomial `LogisticRegression`, an unfitted sklearn pipeline."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    regression = LogisticRegression(max_iter=3000, C=c, random_state=seed, class_weight=class_weight)
    return make_pipeline(StandardScaler(), regression)


def _fold(probe, num_labels: int) -> tuple[np.ndarray, np.ndarray]:  # noqa: ANN001 - sklearn pipeline
    """The fitted pipeline as one linear map [K, C] + bias [K] on raw pooled features."""
    scaler, regression = probe[0], probe[1]
    weight = np.zeros((num_labels, len(scaler.mean_)))
    bias = np.full(num_labels, -1e4)  # a class absent from the data is never predicted
    coef = regression.coef_ / scaler.scale_
    if len(regression.classes_) == 2:  # sklearn keeps one row for two classes: logit(class 1) - logit(class 0)
        coef, intercept = np.stack([-coef[0] / 2, coef[0] / 2]), np.array([-1, 1]) * regression.intercept_[0] / 2
    else:
        intercept = regression.intercept_
    weight[regression.classes_] = coef
    bias[regression.classes_] = intercept - coef @ scaler.mean_
    return weight, bias


def _with_views(pooled: np.ndarray, targets: np.ndarray, views: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """The rows and their views stacked as more rows of the same classes."""
    if views is None:
        return pooled, targets
    return np.concatenate([pooled, *views]), np.tile(targets, len(views) + 1)


def out_of_fold_logits(pooled: np.ndarray, targets: np.ndarray, num_labels: int, folds: int = 5, seed: int = 0,
                       class_weight: dict[int, float] | None = None, views: np.ndarray | None = None) -> np.ndarray:
    """[N, K] each row's probe logits from a probe that did not see it (nor its views): on its own
    training rows a probe is right and sure, which says nothing about new images."""
    from sklearn.model_selection import KFold, StratifiedKFold

    counts = np.bincount(targets, minlength=num_labels)
    smallest = int(counts[counts > 0].min())
    if smallest >= 2:
        splits = StratifiedKFold(min(folds, smallest), shuffle=True, random_state=seed)
    else:  # a class with one row cannot be stratified
        splits = KFold(min(folds, len(targets)), shuffle=True, random_state=seed)
    out = np.zeros((len(targets), num_labels))  # uniform where a fold's rows leave a single class
    for train, held in splits.split(pooled, targets):
        if len(set(targets[train].tolist())) > 1:
            fold_views = None if views is None else views[:, train]
            probe = probe_pipeline(seed, class_weight=class_weight)
            weight, bias = _fold(probe.fit(*_with_views(pooled[train], targets[train], fold_views)), num_labels)
            out[held] = pooled[held] @ weight.T + bias
    return out


def calibrate(logits: np.ndarray, targets: np.ndarray) -> tuple[float, float]:
    """(T, eps) minimising the held-out negative log-likelihood of (1 - eps) softmax(logits / T) + eps / K:
    temperature scaling (Guo et al., 2017) with a floor. From a few images per class the probe is wrong
    by tens of nats on some rows, which no temperature alone tempers; the floor bounds what one bad
    probe prediction costs, and both shrink as the data grows."""
    from scipy.optimize import minimize
    from scipy.special import expit

    truth = np.arange(len(targets)), targets

    def nll(params: np.ndarray) -> float:
        scaled = torch.from_numpy(logits / np.exp(params[0]))
        return -float(mixed_log_probs(scaled, float(expit(params[1]))).numpy()[truth].mean())

    best = minimize(nll, np.array([0.0, -4.0]), method="Nelder-Mead")
    return float(np.exp(best.x[0])), float(expit(best.x[1]))


def mixed_log_probs(logits: torch.Tensor, floor: float) -> torch.Tensor:
    """log((1 - floor) softmax(logits) + floor / K), row-wise."""
    if not floor > 0:
        return logits.log_softmax(-1)
    uniform = torch.tensor(math.log(floor / logits.shape[-1]))
    return torch.logaddexp(math.log1p(-floor) + logits.log_softmax(-1), uniform)


def save_prior(prior: LabelPrior, path: str) -> None:
    """Rows in the order of the adapter config's `labels`, which names them (one metadata key only:
    safetensors writes several in a per-process order, and a saved file must be byte-stable)."""
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in prior.state_dict().items()}, path, {"format": "pt"})


def load_prior(path: str, labels: Sequence[str] | None) -> LabelPrior:
    from safetensors.torch import load_file

    tensors = load_file(path)
    expected = {"weight", "bias", "floor", "gate", "center"}
    if not labels or set(tensors) != expected or len(tensors["bias"]) != len(labels) or not tensors["gate"] >= 0:
        raise ValueError(f"{path} is not a label prior for this adapter: expected tensors {sorted(expected)}, one "
                         f"row per label of its config ({len(labels or [])}) and a gate >= 0. Delete the file to "
                         "score labels with the LLM alone.")
    prior = LabelPrior(tensors["weight"], tensors["bias"], labels)
    prior.load_state_dict(tensors)
    return prior
