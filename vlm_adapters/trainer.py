"""`VLMTrainer`: transformers' Trainer with what it lacks for this model.

- checkpoints hold only the trained parts (projector + PEFT adapter, safetensors), never the
  frozen 4-bit LLM, are written atomically, and resume / best-model loading read them back;
- the callbacks the adapter's PEFT method needs (AdaLoRA's rank budget, updated every step);
- a separate projector learning rate and LLaVA's optional projector-only alignment stage;
- classification metrics (accuracy, ROC-AUC, ...) as eval metrics, from label scoring, for
  `metric_for_best_model` and early stopping;
- class-balanced sampling of the training rows, if asked (`BalancedSampler`);
- a clear stop on a NaN/inf loss, naming the step and the last good checkpoint.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
from peft import set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import Trainer
from transformers.trainer_utils import get_last_checkpoint, rotate_checkpoints

from .adapters import adapter_callbacks, check_reloadable
from .evaluation import evaluate
from .files import replace_folder
from .hub import PEFT_WEIGHTS, PROJECTOR_FILE, write_adapter_files
from .metrics import SCALAR_METRICS


class BalancedSampler(torch.utils.data.WeightedRandomSampler):
    """Draws rows with replacement, each with chance 1 / (n_classes * count of its class), so every
    class is drawn equally often on average (answer rows of a mixed set, label None, count as one more
    class); an epoch draws as many rows as the data holds. Seeded by
    the run's seed and the epoch (the Trainer calls `set_epoch`), so a resumed run draws the rows an
    uninterrupted one did."""

    def __init__(self, labels: Sequence[str], seed: int) -> None:
        counts = Counter(labels)
        super().__init__([1.0 / counts[label] for label in labels], len(labels), replacement=True)
        self.seed = seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.generator = torch.Generator().manual_seed(self.seed + int(epoch))


class VLMTrainer(Trainer):
    def __init__(
        self,
        *args: Any,
        projector_lr: float,
        eval_labels: list[str] | None,
        sample_labels: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> None:
        """`sample_labels`: each training row's label, to draw the rows class-balanced (`BalancedSampler`)."""
        super().__init__(*args, **kwargs)
        for callback in adapter_callbacks(self.model.llm):  # e.g. AdaLoRA's rank allocation after each step
            self.add_callback(callback)
        if self.args.load_best_model_at_end:
            check_reloadable(self.model.llm, "load_best_model_at_end (early_stopping_patience)")
        self.projector_lr = projector_lr
        self.eval_labels = eval_labels
        self.sample_labels = sample_labels

    def _get_train_sampler(self, train_dataset: Any = None) -> torch.utils.data.Sampler | None:
        if self.sample_labels is None:
            return super()._get_train_sampler(train_dataset)
        return BalancedSampler(self.sample_labels, self.args.seed)

    def create_optimizer(self, model: Any = None) -> torch.optim.Optimizer:
        """AdamW with the projector at its own learning rate (LLaVA / nanoVLM train it faster)."""
        if self.optimizer is None:
            groups = self.model.trainable_parameters()
            param_groups = [
                {"params": groups["projector"], "lr": self.projector_lr},
                {"params": groups["adapter"], "lr": self.args.learning_rate},
            ]
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
            optimizer_kwargs.pop("lr", None)
            self.optimizer = optimizer_cls(
                [g for g in param_groups if g["params"]], weight_decay=self.args.weight_decay, **optimizer_kwargs
            )
        return self.optimizer

    def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss):
            last = get_last_checkpoint(self.args.output_dir) if os.path.isdir(self.args.output_dir) else None
            raise FloatingPointError(
                f"training loss became {loss.item()} at step {self.state.global_step + 1}. Likely causes: a learning "
                "rate too high (lower learning_rate / projector_lr) or fp16 overflow (use bf16 or float32). "
                f"The last good checkpoint is {last or 'none (no checkpoint saved yet)'}; resume with "
                "fit(..., resume_from_checkpoint=True) after fixing the cause."
            )
        return loss

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        """Write the checkpoint into a hidden staging folder, then rename it into place: a crash or
        a full disk mid-save leaves only a staging folder behind, never a half checkpoint that
        `resume_from_checkpoint=True` would pick."""
        if not self.args.should_save:  # other ranks of a multi-process run write nothing
            return super()._save_checkpoint(model, trial)
        run_dir = self.args.output_dir
        os.makedirs(run_dir, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".checkpoint-staging-", dir=run_dir)
        name = f"checkpoint-{self.state.global_step}"
        self.args.output_dir = staging
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.output_dir = run_dir
        replace_folder(os.path.join(staging, name), os.path.join(run_dir, name))
        shutil.rmtree(staging, ignore_errors=True)
        if self.state.best_model_checkpoint and self.state.best_model_checkpoint.startswith(staging):
            self.state.best_model_checkpoint = os.path.join(run_dir, name)
        rotate_checkpoints(
            output_dir=run_dir,
            save_total_limit=self.args.save_total_limit,
            best_model_checkpoint=self.state.best_model_checkpoint,
        )

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir or self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        write_adapter_files(self.model, output_dir)

    def _load_trained_weights(self, checkpoint: str) -> None:
        self.model.projector.load_state_dict(load_file(os.path.join(checkpoint, PROJECTOR_FILE)))
        peft_file = os.path.join(checkpoint, PEFT_WEIGHTS)
        if os.path.exists(peft_file):
            set_peft_model_state_dict(self.model.llm, load_file(peft_file))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        check_reloadable(self.model.llm, "resume_from_checkpoint")
        self._load_trained_weights(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        # The recorded path may name the staging folder it was written in; the checkpoint now sits here.
        name = os.path.basename(self.state.best_model_checkpoint)
        self._load_trained_weights(os.path.join(self.args.output_dir, name))

    def evaluation_loop(self, dataloader: Any, description: str, *args: Any, **kwargs: Any) -> Any:
        """Eval loss from the Trainer, plus `evaluate`'s scalar metrics (accuracy, balanced accuracy,
        macro-F1, ROC-AUC, ...) from label scoring on label data, for `metric_for_best_model`."""
        output = super().evaluation_loop(dataloader, description, *args, **kwargs)
        if self.eval_labels:
            prefix = kwargs.get("metric_key_prefix", "eval")
            scores = evaluate(
                self.model, dataloader.dataset, batch_size=self.args.per_device_eval_batch_size,
                progress=not self.args.disable_tqdm, answers=False,  # answer rows count in the loss only
            )
            output.metrics.update({f"{prefix}_{k}": scores[k] for k in SCALAR_METRICS if scores.get(k) is not None})
            chosen = (self.args.metric_for_best_model or "").removeprefix(f"{prefix}_")
            if chosen in SCALAR_METRICS and scores.get(chosen) is None:
                present = [name for name, row in scores.get("per_class", {}).items() if row["support"]]
                raise ValueError(
                    f"metric_for_best_model={chosen!r} is undefined on the eval data, which holds images of "
                    f"{present} only; it needs images of at least two labels. Use a larger or stratified eval split "
                    "(data.split_for_eval) or another metric."
                )
        return output
