"""`VLMTrainer`: transformers' Trainer with what it lacks for this model.

- checkpoints hold only the trained parts (projector + PEFT adapter, safetensors), never the
  frozen 4-bit LLM, are written atomically, and resume / best-model loading read them back;
- the callbacks the adapter's PEFT method needs (AdaLoRA's rank budget, updated every step);
- a separate projector learning rate and LLaVA's optional projector-only alignment stage;
- classification accuracy / macro-F1 as eval metrics (for early stopping), from label scoring;
- a clear stop on a NaN/inf loss, naming the step and the last good checkpoint.
"""

from __future__ import annotations

import os
import shutil
import tempfile
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


class VLMTrainer(Trainer):
    def __init__(self, *args: Any, projector_lr: float, eval_labels: list[str] | None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for callback in adapter_callbacks(self.model.llm):  # e.g. AdaLoRA's rank allocation after each step
            self.add_callback(callback)
        if self.args.load_best_model_at_end:
            check_reloadable(self.model.llm, "load_best_model_at_end (early_stopping_patience)")
        self.projector_lr = projector_lr
        self.eval_labels = eval_labels

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
        """Eval loss from the Trainer, plus accuracy / macro-F1 from label scoring on label data."""
        output = super().evaluation_loop(dataloader, description, *args, **kwargs)
        if self.eval_labels:
            prefix = kwargs.get("metric_key_prefix", "eval")
            scores = evaluate(
                self.model, dataloader.dataset, batch_size=self.args.per_device_eval_batch_size,
                progress=not self.args.disable_tqdm, answers=False,  # answer rows count in the loss only
            )
            output.metrics.update({f"{prefix}_{k}": scores[k] for k in ("accuracy", "macro_f1") if k in scores})
        return output
