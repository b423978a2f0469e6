"""Temperature scaling (Guo et al. 2017): one number T, fit on held-out images, that divides the label
log-likelihoods before the softmax. It changes how sure the probabilities are, never their order,
so the predicted labels and ROC-AUC stay the same while the calibration error falls.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .data import as_dataset, label_indices
from .evaluation import adapter_labels, label_scores
from .metrics import expected_calibration_error
from .modeling import VisionLanguageCore

# T is searched as log T in this range: a held-out set that the model gets all right would otherwise
# drive T towards 0 (ever sharper), and one it gets all wrong towards infinity.
LOG_T_RANGE = (math.log(1e-2), math.log(1e2))


def fit_temperature(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """The T minimising the negative log-likelihood of softmax(scores / T) on `targets` (LBFGS on log T)."""
    scores, targets = scores.detach().double(), torch.as_tensor(targets, dtype=torch.long)
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(scores / log_t.clamp(*LOG_T_RANGE).exp(), targets)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().clamp(*LOG_T_RANGE).exp())


def _nll_and_ece(scores: torch.Tensor, targets: torch.Tensor, temperature: float) -> tuple[float, float]:
    logprobs = (scores.double() / temperature).log_softmax(-1)
    nll = float(torch.nn.functional.nll_loss(logprobs, targets))
    confidence, predicted = logprobs.exp().max(-1)
    return nll, expected_calibration_error(confidence.numpy(), (predicted == targets).numpy())


def calibrate(
    model: VisionLanguageCore,
    dataset: Any,
    *,
    batch_size: int = 16,
    prompt: str | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """Fit the temperature on the label rows of held-out data (not the training set, where the model is
    overconfident) and store it in `model.config.temperature`, which `save_pretrained` / `push_to_hub`
    write and `load` restores. Returns the temperature and the ECE / NLL on `dataset` with the
    previous temperature (`*_before`) and the new one (`*_after`)."""
    data = as_dataset(dataset, "calibration dataset")
    if "label" not in data.column_names:
        raise ValueError("calibrate needs label data (a 'label' column): it fits label probabilities.")
    names = adapter_labels(model, data)
    targets = torch.tensor([i for i in label_indices(data, names, "the calibration data") if i is not None])
    if not len(targets):
        raise ValueError("calibrate needs label rows; this calibration data holds answer rows only.")
    scores = label_scores(model, data, names, prompt, batch_size, progress).double()
    before = _nll_and_ece(scores, targets, model.config.temperature)
    temperature = fit_temperature(scores, targets)
    after = _nll_and_ece(scores, targets, temperature)
    model.config.temperature = temperature
    return {
        "temperature": temperature,
        "ece_before": before[1],
        "ece_after": after[1],
        "nll_before": before[0],
        "nll_after": after[0],
        "images": len(targets),
    }
