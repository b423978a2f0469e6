"""`fit` and `evaluate` on top of transformers' Trainer.

What the stock Trainer lacks for this model, and is added here:
- checkpoints hold only the trained parts (projector + PEFT adapter, safetensors), never the
  frozen 4-bit LLM, and resume / best-model loading read them back;
- a separate projector learning rate and LLaVA's optional projector-only alignment stage;
- classification accuracy / macro-F1 as eval metrics (for early stopping), from label scoring;
- a clear stop on a NaN/inf loss, naming the step and the last good checkpoint.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from typing import TYPE_CHECKING, Any

import datasets
import numpy as np
import torch
from peft import set_peft_model_state_dict
from safetensors.torch import load_file
from tqdm.auto import tqdm
from transformers import EarlyStoppingCallback, Trainer, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint, rotate_checkpoints

from .data import (
    FEATURES_COLUMN,
    VLMCollator,
    as_dataset,
    features_as_tensors,
    label_names,
    label_text,
    with_image_features,
)
from .hub import PEFT_WEIGHTS, PROJECTOR_FILE, replace_directory, write_adapter_files
from .metrics import classification_metrics, plot_confusion_matrix, plot_training_curves, text_metrics

if TYPE_CHECKING:
    from .model import VisionLanguageModel

# Defaults that train well here without tuning; every one can be overridden by name in fit(**options).
DEFAULT_ARGS: dict[str, Any] = {
    "output_dir": "runs/vlm_adapters",
    "num_train_epochs": 2,
    "learning_rate": 2e-4,
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 16,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.05,
    "weight_decay": 0.0,
    "logging_steps": 10,
    "save_strategy": "epoch",
    "save_total_limit": 2,
    "report_to": "none",
    "seed": 0,
    "dataloader_num_workers": 0,
}


class VLMTrainer(Trainer):
    def __init__(self, *args: Any, projector_lr: float, eval_labels: list[str] | None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
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
        replace_directory(os.path.join(staging, name), os.path.join(run_dir, name))
        shutil.rmtree(staging, ignore_errors=True)
        if self.state.best_model_checkpoint and self.state.best_model_checkpoint.startswith(staging):
            self.state.best_model_checkpoint = os.path.join(run_dir, name)
        if self.args.should_save:
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
                progress=not self.args.disable_tqdm,
            )
            output.metrics.update({f"{prefix}_{k}": scores[k] for k in ("accuracy", "macro_f1")})
        return output


def _check_classes(data: datasets.Dataset, names: list[str]) -> None:
    feature = data.features.get("label")
    if isinstance(feature, datasets.ClassLabel):
        present = {int(label) for label in data.with_format(None)["label"]}
        empty = [name for i, name in enumerate(names) if i not in present]
        if empty:
            raise ValueError(
                f"classes {empty} have no training examples. Add examples, or drop them from the ClassLabel "
                "(e.g. data.cast_column('label', ClassLabel(names=[...])) after remapping)."
            )


def fit(
    model: VisionLanguageModel,
    train: Any,
    eval: Any = None,  # noqa: A002 - contract name
    *,
    projector_lr: float = 1e-3,
    align_epochs: float = 0.0,
    describe_ratio: float | None = None,
    describe_template: str = "This image shows {label}.",
    cache_features: bool = True,
    feature_batch_size: int = 32,
    skip_bad_images: bool = False,
    early_stopping_patience: int | None = None,
    resume_from_checkpoint: str | bool | None = None,
    callbacks: list[Any] | None = None,
    **training_args: Any,
) -> dict[str, Any]:
    """Train the projector and adapter; returns the Trainer's training metrics plus final eval metrics.

    Options not listed here are `TrainingArguments` names (`output_dir`, `num_train_epochs`,
    `learning_rate`, `per_device_train_batch_size`, `save_steps`, ...); `save_steps` / `eval_steps`
    without a strategy mean "steps", as in transformers. `align_epochs > 0` first
    trains the projector alone (LLaVA's stage 1). `describe_ratio` (default 0.25 for label data)
    mixes describe-prompt examples into classification training so `describe` names the class.
    """
    train_ds = as_dataset(train, "train dataset")
    eval_ds = as_dataset(eval, "eval dataset") if eval is not None else None
    names = label_names(train_ds)
    if names:
        _check_classes(train_ds, names)
        model.config.labels = names
    args = {**DEFAULT_ARGS, **training_args}
    if "save_steps" in training_args and "save_strategy" not in training_args:
        args["save_strategy"] = "steps"  # what save_steps means in transformers, whose default strategy is steps
    args.update(remove_unused_columns=False, prediction_loss_only=True, label_names=["labels"])
    # On a CPU model, accelerate sets up multi-process (torchrun) training only when told use_cpu.
    args.setdefault("use_cpu", model.device.type == "cpu")
    # TrainingArguments first: it sets up multi-process state that PartialState would otherwise preempt.
    main_args = TrainingArguments(**args)
    if cache_features:
        shape = (model.projector.num_vision_tokens, model.config.vision_signature["hidden_size"])
        encode = dict(batch_size=feature_batch_size, skip_bad_images=skip_bad_images, token_shape=shape)
        with main_args.main_process_first(desc="encoding images"):  # one process writes the cache
            train_ds = with_image_features(train_ds, model.vision, **encode)
            eval_ds = with_image_features(eval_ds, model.vision, **encode) if eval_ds is not None else None
        if not model.projector.standardizes:  # a resumed or reloaded projector keeps its statistics
            # 1024 rows spread over the whole set (tens of thousands of tokens) pin down the statistics.
            picked = np.linspace(0, len(train_ds) - 1, min(len(train_ds), 1024)).round().astype(int)
            rows = train_ds.select(np.unique(picked)).with_format("torch", columns=[FEATURES_COLUMN])
            model.projector.set_feature_statistics(
                rows[start : start + 256][FEATURES_COLUMN].to(model.device) for start in range(0, len(rows), 256)
            )
    ratio = (0.25 if names else 0.0) if describe_ratio is None else describe_ratio
    if ratio > 0:
        draw = np.random.default_rng(training_args.get("seed", DEFAULT_ARGS["seed"])).random(len(train_ds))
        train_ds = train_ds.add_column("describe", (draw < ratio).tolist())
    train_ds = features_as_tensors(train_ds)
    collator = VLMCollator(model, names, describe_template=describe_template)
    callbacks = list(callbacks or [])
    if eval_ds is not None:
        args.setdefault("eval_strategy", "steps" if "eval_steps" in training_args else args["save_strategy"])
        if args.get("save_strategy") == "steps":
            args.setdefault("eval_steps", args.get("save_steps"))
        if early_stopping_patience:
            metric = "eval_accuracy" if names else "eval_loss"
            args.update(load_best_model_at_end=True, metric_for_best_model=metric, greater_is_better=bool(names))
            callbacks.append(EarlyStoppingCallback(early_stopping_patience))
    if model.config.adapter == "prefix" and args.get("gradient_checkpointing"):
        raise ValueError(
            "PEFT prefix tuning does not support gradient checkpointing; set gradient_checkpointing=False."
        )
    model.to(model.device)
    stages = [("align", align_epochs)] if align_epochs > 0 and model.config.adapter != "none" else []
    stages.append(("finetune", args["num_train_epochs"]))
    result: dict[str, Any] = {}
    for stage, epochs in stages:
        model.set_stage(stage)
        stage_args = dict(args, num_train_epochs=epochs)
        if len(stages) > 1:
            stage_args["output_dir"] = os.path.join(args["output_dir"], stage)
        trainer = VLMTrainer(
            model=model,
            args=TrainingArguments(**stage_args),
            train_dataset=train_ds,
            eval_dataset=eval_ds,
            data_collator=collator,
            callbacks=list(callbacks),
            projector_lr=projector_lr,
            eval_labels=names,
        )
        output = trainer.train(resume_from_checkpoint=resume_from_checkpoint if stage == "finetune" else None)
        result.update({f"{stage}_{k}" if len(stages) > 1 else k: v for k, v in output.metrics.items()})
    skipped = [ds.info.description for ds in (train_ds, eval_ds) if ds is not None and ds.info.description]
    if skipped:
        result["skipped_bad_images"] = skipped
        print("\n".join(skipped))
    os.makedirs(args["output_dir"], exist_ok=True)
    plot_training_curves(trainer.state.log_history, os.path.join(args["output_dir"], "training_curves.png"))
    result["log_history"] = trainer.state.log_history
    if eval_ds is not None:
        scores = evaluate(model, eval_ds, output_dir=args["output_dir"])
        result.update({f"eval_{k}": v for k, v in scores.items()})
    model.metrics = {k: v for k, v in result.items() if isinstance(v, (int, float)) and math.isfinite(v)}
    return result


@torch.no_grad()
def evaluate(
    model: VisionLanguageModel,
    dataset: Any,
    *,
    batch_size: int = 16,
    prompt: str | None = None,
    output_dir: str | None = None,
    max_new_tokens: int = 48,
    progress: bool = True,
) -> dict[str, Any]:
    """Classification metrics for label data (label scoring over the class names), text metrics otherwise.

    With `output_dir`, a confusion-matrix PNG is written there for label data.
    """
    data = features_as_tensors(as_dataset(dataset))
    names = label_names(data) or None
    was_training = model.training
    model.eval()
    true, pred, refs, outs = [], [], [], []
    try:
        with model.reuse_prompt_cache():  # the prompt head once for all batches
            for start in tqdm(range(0, len(data), batch_size), desc="Evaluating", unit="batch", disable=not progress):
                rows = data[start : start + batch_size]
                if FEATURES_COLUMN in rows:
                    features = torch.as_tensor(rows[FEATURES_COLUMN]).float()
                else:
                    features = model.vision.encode_images(rows["image"])
                if names:
                    pred += model.predict_labels(features, names, prompt or model.config.classify_prompt).tolist()
                    true += [names.index(label_text(label, names)) for label in rows["label"]]
                else:
                    prompts = rows.get("prompt") or [None] * len(rows["answer"])
                    for i, text in enumerate(prompts):  # prompts may differ per row
                        outs += model.generate_from_features(
                            features[i : i + 1], prompt or text or model.config.describe_prompt, max_new_tokens
                        )
                    refs += rows["answer"]
    finally:
        model.train(was_training)
    if not names:
        return {**text_metrics(refs, outs), "predictions": outs}
    metrics = classification_metrics(true, pred, names)
    if output_dir:
        os.makedirs(output_dir, exist_ok=True)
        metrics["confusion_matrix_png"] = plot_confusion_matrix(
            metrics["confusion_matrix"], names, os.path.join(output_dir, "confusion_matrix.png")
        )
    model.metrics = {**getattr(model, "metrics", {}), "accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"]}
    return metrics


