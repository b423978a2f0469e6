"""`fit`: train the projector and the adapter on a dataset with `VLMTrainer`.

It checks the data, caches the encoder features once, sets the projector's channel statistics,
mixes in describe rows for label data, then runs LLaVA's optional projector-only stage and the
fine-tuning stage, and evaluates on the eval split.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from typing import Any

import datasets
import numpy as np
import torch
from transformers import EarlyStoppingCallback, TrainingArguments

from .collator import VLMCollator
from .compiled import compiled_layers
from .config import FitOptions
from .data import align_labels, as_dataset, class_weights, label_names, row_labels
from .evaluation import evaluate
from .features import FEATURES_COLUMN, features_as_tensors, with_image_features
from .metrics import LOWER_IS_BETTER, SCALAR_METRICS
from .modeling import VisionLanguageCore
from .plots import plot_training_curves
from .prior_fit import can_fit_prior, fit_label_prior, hold_out_gate_rows, prior_view_features
from .trainer import VLMTrainer

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


def _check_classes(data: datasets.Dataset, names: list[str]) -> None:
    feature = data.features.get("label")
    if isinstance(feature, datasets.ClassLabel):
        present = {int(label) for label in data.with_format(None)["label"] if label is not None}
        empty = [name for i, name in enumerate(names) if i not in present]
        if empty:
            raise ValueError(
                f"classes {empty} have no training examples. Add examples, or drop them from the ClassLabel "
                "(e.g. data.cast_column('label', ClassLabel(names=[...])) after remapping)."
            )


def split_options(options: dict[str, Any]) -> tuple[FitOptions, dict[str, Any]]:
    """`fit`'s own options (FitOptions fields) apart from the TrainingArguments ones."""
    own = {f.name for f in dataclasses.fields(FitOptions)}
    return FitOptions(**{k: v for k, v in options.items() if k in own}), {
        k: v for k, v in options.items() if k not in own
    }


def _cache_features(
    model: VisionLanguageCore, data: datasets.Dataset | None, options: FitOptions
) -> datasets.Dataset | None:
    if data is None:
        return None
    return with_image_features(
        data, model.vision, batch_size=options.feature_batch_size, skip_bad_images=options.skip_bad_images,
        token_shape=model.feature_shape,
    )


def _set_feature_statistics(model: VisionLanguageCore, train: datasets.Dataset) -> None:
    """Channel statistics for the projector's standardisation, unless it has them (resumed or reloaded)."""
    if model.projector.standardizes:
        return
    # 1024 rows spread over the whole set (tens of thousands of tokens) pin down the statistics.
    picked = np.linspace(0, len(train) - 1, min(len(train), 1024)).round().astype(int)
    rows = train.select(np.unique(picked)).with_format("torch", columns=[FEATURES_COLUMN])
    model.projector.set_feature_statistics(  # rows of several images come as a list of [images, tokens, hidden]
        torch.cat([f.reshape(-1, f.shape[-1]) for f in rows[start : start + 256][FEATURES_COLUMN]]).to(model.device)
        for start in range(0, len(rows), 256)
    )


def _with_describe_rows(train: datasets.Dataset, ratio: float, seed: int) -> datasets.Dataset:
    """Mark a fixed, seeded share of label rows as describe examples (the same on resume)."""
    if ratio <= 0:
        return train
    draw = np.random.default_rng(seed).random(len(train))
    return train.add_column("describe", (draw < ratio).tolist())


def _eval_args(args: dict[str, Any], options: FitOptions, has_labels: bool) -> list[Any]:
    """Evaluate as often as checkpoints are saved (or every `eval_steps`). The user's
    `metric_for_best_model` is kept (any scalar metric of `evaluate`, or loss); early stopping uses it,
    else accuracy (loss for text)."""
    args.setdefault("eval_strategy", "steps" if "eval_steps" in args else args["save_strategy"])
    if args.get("save_strategy") == "steps":
        args.setdefault("eval_steps", args.get("save_steps"))
    if options.early_stopping_patience:
        args.setdefault("metric_for_best_model", "accuracy" if has_labels else "loss")
        args["load_best_model_at_end"] = True
    metric = args.get("metric_for_best_model")
    if metric:
        name = metric.removeprefix("eval_")
        known = ("loss", *SCALAR_METRICS) if has_labels else ("loss",)
        if name not in known:
            raise ValueError(
                f"metric_for_best_model={metric!r} is not computed during training; choose one of {list(known)}."
            )
        if name in LOWER_IS_BETTER or name == "loss":
            args.setdefault("greater_is_better", False)
    return [EarlyStoppingCallback(options.early_stopping_patience)] if options.early_stopping_patience else []


def _check_checkpointing(model: VisionLanguageCore, args: dict[str, Any]) -> None:
    if model.num_prefix_tokens and (args.get("gradient_checkpointing") or args.get("activation_checkpointing")):
        raise ValueError(
            "PEFT prefix tuning does not support gradient checkpointing; set gradient_checkpointing=False."
        )


def _train_stages(
    model: VisionLanguageCore,
    args: dict[str, Any],
    options: FitOptions,
    resume_from_checkpoint: str | bool | None,
    **trainer_kwargs: Any,
) -> tuple[dict[str, Any], VLMTrainer]:
    """LLaVA's projector-only stage (if asked) then projector + adapter, each its own Trainer run."""
    stages = [("align", options.align_epochs)] if options.align_epochs > 0 and model.config.adapter != "none" else []
    stages.append(("finetune", args["num_train_epochs"]))
    result: dict[str, Any] = {}
    with compiled_layers(model.base_llm) if options.compile_layers else contextlib.nullcontext():
        for stage, epochs in stages:
            model.set_stage(stage)
            stage_args = dict(args, num_train_epochs=epochs)
            if len(stages) > 1:
                stage_args["output_dir"] = os.path.join(args["output_dir"], stage)
            trainer = VLMTrainer(model=model, args=TrainingArguments(**stage_args), **trainer_kwargs)
            output = trainer.train(resume_from_checkpoint=resume_from_checkpoint if stage == "finetune" else None)
            result.update({f"{stage}_{k}" if len(stages) > 1 else k: v for k, v in output.metrics.items()})
    return result, trainer


def fit(
    model: VisionLanguageCore,
    train: Any,
    eval: Any = None,  # noqa: A002 - contract name
    *,
    resume_from_checkpoint: str | bool | None = None,
    callbacks: list[Any] | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Train the projector and adapter; returns the Trainer's training metrics plus final eval metrics.

    `options` are `FitOptions` fields (`projector_lr`, `align_epochs`, `class_weight`, `calibrate`, ...)
    and `TrainingArguments` names (`output_dir`, `num_train_epochs`, `learning_rate`, `save_steps`,
    `metric_for_best_model`, ...); `save_steps` / `eval_steps` without a strategy mean "steps", as in
    transformers. `class_weight` weights each row's loss by its class; `balanced_sampling=True` draws rows
    class-balanced instead; `metric_for_best_model` may name any scalar metric of `evaluate`; `calibrate=True`
    fits the probability temperature on the eval split before the final evaluation.
    """
    fit_options, training_args = split_options(options)
    train_ds = as_dataset(train, "train dataset")
    eval_ds = as_dataset(eval, "eval dataset") if eval is not None else None
    names, eval_ds, weights = _labels(model, train_ds, eval_ds, fit_options)
    args = _training_arguments(model, training_args)
    callbacks = list(callbacks or []) + (_eval_args(args, fit_options, bool(names)) if eval_ds is not None else [])
    # TrainingArguments first: it sets up multi-process state that PartialState would otherwise preempt.
    main_args = TrainingArguments(**args)
    images = train_ds  # the images, for the label prior's views (prior_views.py)
    if fit_options.cache_features:
        with main_args.main_process_first(desc="encoding images"):  # one process writes the cache
            train_ds = _cache_features(model, train_ds, fit_options)
            eval_ds = _cache_features(model, eval_ds, fit_options)
        _set_feature_statistics(model, train_ds)
    prior_data, train_ds, gate_rows = _split_for_prior(train_ds, eval_ds, names, fit_options, args["seed"])
    label_only = names and "answer" not in train_ds.column_names  # users' own captions teach describing otherwise
    ratio = (0.25 if label_only else 0.0) if fit_options.describe_ratio is None else fit_options.describe_ratio
    train_ds = features_as_tensors(_with_describe_rows(train_ds, ratio, args["seed"]))
    _check_checkpointing(model, args)
    model.to(model.device)
    collator = VLMCollator(model, names, fit_options.describe_template, class_weights=weights)
    result, trainer = _train_stages(
        model, args, fit_options, resume_from_checkpoint,
        train_dataset=train_ds, eval_dataset=eval_ds, data_collator=collator,
        callbacks=callbacks, projector_lr=fit_options.projector_lr, eval_labels=names,
        sample_labels=row_labels(train_ds) if fit_options.balanced_sampling else None,
    )
    if prior_data is not None:  # the probe, weighted as the LLM's loss was; the gate on held-out rows
        with main_args.main_process_first(desc="encoding the label prior's views"):  # one process writes the cache
            views = prior_view_features(model, prior_data, names, images, fit_options.prior_views)
        model.label_prior = fit_label_prior(model, prior_data, eval_ds, gate_rows, names, args["seed"], weights,
                                            views=views)
        result["label_prior_gate"] = float(model.label_prior.gate)
    if weights:
        result["class_weights"] = weights
    if fit_options.calibrate:  # after the prior: the temperature scales the scores classify returns
        from .calibration import calibrate

        result["calibration"] = calibrate(model, eval_ds, batch_size=args["per_device_eval_batch_size"],
                                          progress=not args.get("disable_tqdm"))
    return _finish(model, result, trainer, args["output_dir"], train_ds, eval_ds)


def _training_arguments(model: VisionLanguageCore, given: dict[str, Any]) -> dict[str, Any]:
    """`TrainingArguments` values: fit's defaults, then the user's, then what fit's batches need."""
    args = {**DEFAULT_ARGS, **given}
    if "save_steps" in given and "save_strategy" not in given:
        args["save_strategy"] = "steps"  # what save_steps means in transformers, whose default strategy is steps
    args.update(remove_unused_columns=False, prediction_loss_only=True, label_names=["labels"])
    # On a CPU model, accelerate sets up multi-process (torchrun) training only when told use_cpu.
    args.setdefault("use_cpu", model.device.type == "cpu")
    return args


def _split_for_prior(
    train_ds: datasets.Dataset, eval_ds: datasets.Dataset | None, names: list[str] | None, options: FitOptions,
    seed: int,
) -> tuple[datasets.Dataset | None, datasets.Dataset, Any]:
    """(the label prior's probe data: every training row, the LLM's training rows, the rows held out to fit
    the gate on); no prior data when the prior is off or cannot be fit."""
    if not (names and options.label_prior and options.cache_features and can_fit_prior(train_ds, names)):
        return None, train_ds, None
    share = 0.0 if eval_ds is not None else options.gate_holdout
    return train_ds, *hold_out_gate_rows(train_ds, names, share, seed)


def _labels(
    model: VisionLanguageCore, train: datasets.Dataset, eval_ds: datasets.Dataset | None, options: FitOptions
) -> tuple[list[str] | None, datasets.Dataset | None, dict[str, float] | None]:
    """The training data's labels (which become the adapter's), the eval data renumbered to them, and
    the class weights; checked before any image is encoded."""
    names = label_names(train)
    if not names:
        for option in ("class_weight", "balanced_sampling", "calibrate"):
            if getattr(options, option):
                raise ValueError(f"{option} needs label data; this training set has free-text answers.")
        return None, eval_ds, None
    _check_classes(train, names)
    if options.calibrate and eval_ds is None:
        raise ValueError("calibrate=True fits the temperature on the eval split; pass eval data to fit.")
    if eval_ds is not None and "label" in eval_ds.column_names:
        eval_ds = align_labels(eval_ds, names, "the eval dataset")
    model.config.labels = names
    weights = class_weights(train, names, options.class_weight) if options.class_weight else None
    return names, eval_ds, weights


def _finish(
    model: VisionLanguageCore,
    result: dict[str, Any],
    trainer: VLMTrainer,
    output_dir: str,
    train_ds: datasets.Dataset,
    eval_ds: datasets.Dataset | None,
) -> dict[str, Any]:
    """Report skipped images, plot the curves, evaluate on the eval split, keep the numbers for the card."""
    skipped = [ds.info.description for ds in (train_ds, eval_ds) if ds is not None and ds.info.description]
    if skipped:
        result["skipped_bad_images"] = skipped
        print("\n".join(skipped))
    os.makedirs(output_dir, exist_ok=True)
    plot_training_curves(trainer.state.log_history, os.path.join(output_dir, "training_curves.png"))
    result["log_history"] = trainer.state.log_history
    if trainer.state.best_model_checkpoint:
        result["best_model_checkpoint"] = trainer.state.best_model_checkpoint
    if eval_ds is not None:
        scores = evaluate(model, eval_ds, output_dir=output_dir)
        result.update({f"eval_{k}": v for k, v in scores.items()})
    model.metrics = {k: v for k, v in result.items() if isinstance(v, (int, float)) and math.isfinite(v)}
    return result
