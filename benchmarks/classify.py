"""Section 2: images/s and accuracy of label scoring (`predict`) against generate + string match."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from benchmarks.common import log, ratios, stat, stopwatch
from benchmarks.context import Context
from benchmarks.reference import classify_by_generate
from vlm_adapters import VisionLanguageModel


def classify_library(model: VisionLanguageModel, images: list[Any], names: list[str], batch_size: int) -> list[int]:
    return [names.index(label) for label in model.predict(images, names, batch_size=batch_size)]


def classify_reference(model: VisionLanguageModel, images: list[Any], names: list[str], batch_size: int) -> list[int]:
    preds: list[int] = []
    for start in range(0, len(images), batch_size):  # the same batch size as the library
        preds += classify_by_generate(model, images[start : start + batch_size], names)
    return preds


def classify_cached(features: torch.Tensor) -> Callable[..., list[int]]:
    """Label scoring on encoder features already in the on-disk cache (what `evaluate` does on a
    dataset encoded before, e.g. the eval set at every epoch): the encoder does not run."""

    def run(model: VisionLanguageModel, images: list[Any], names: list[str], batch_size: int) -> list[int]:
        prompt = model.config.classify_prompt
        with model.reuse_prompt_cache():  # as `evaluate` runs its batches
            return [
                int(i)
                for start in range(0, len(images), batch_size)
                for i in model.predict_labels(features[start : start + batch_size], names, prompt)
            ]

    return run


CLASSIFIERS: dict[str, Callable[..., list[int]]] = {"library": classify_library, "reference": classify_reference}


def time_classifiers(
    ctx: Context, model: VisionLanguageModel, images: list[Any], names: list[str],
    classifiers: dict[str, Callable[..., list[int]]] = CLASSIFIERS,
) -> dict[str, Any]:
    """Seconds per image of the classifiers over the repeats (rotating order) and their predictions."""
    bs = ctx.sizes.classify_batch_size
    for fn in classifiers.values():  # warm-up
        fn(model, images[:1], names, bs)
    out: dict[str, Any] = {which: [] for which in classifiers} | {"preds": {}}
    order = list(classifiers)
    for r in range(ctx.repeats):
        for which in order[r % len(order):] + order[: r % len(order)]:
            with stopwatch() as t:
                preds = classifiers[which](model, images, names, bs)
            out[which].append(t[0] / len(images))
            out["preds"].setdefault(which, []).append(preds)
    return out


def bench_classify(ctx: Context) -> dict[str, Any]:
    model = ctx.library_trained_model()
    log(f"classify: {len(ctx.test_images)} test images, {len(ctx.names)} classes")
    features = torch.from_numpy(np.asarray(ctx.features("test").with_format("numpy")["image_features"])).float()
    classifiers = {**CLASSIFIERS, "cached": classify_cached(features)}
    res = time_classifiers(ctx, model, ctx.test_images, ctx.names, classifiers)
    truth = ctx.test_truth
    for which in classifiers:
        runs = res["preds"][which]
        res.setdefault("deterministic", {})[which] = all(p == runs[0] for p in runs)
        res.setdefault("accuracy", {})[which] = [
            sum(p == t for p, t in zip(preds, truth, strict=True)) / len(truth) for preds in runs
        ]
        res.setdefault("valid", {})[which] = [sum(p >= 0 for p in preds) / len(truth) for preds in runs]
        log(f"classify {which}: {statistics.median(res[which]):.3f} s/image, accuracy {res['accuracy'][which][0]:.3f}")
    res["ratio"] = ratios(res["reference"], res["library"])  # seconds per image, so reference / library = speed-up
    res["ratio_cached"] = ratios(res["reference"], res["cached"])
    return res


def report_classify(ctx: Context, res: dict[str, Any]) -> str:
    ips = {w: [1 / x for x in res[w]] for w in (*CLASSIFIERS, "cached")}
    note = "" if all(res["deterministic"].values()) else " (predictions differed between repeats: median shown)"
    return "\n".join([
        "## 2. Classification",
        "",
        f"{len(ctx.test_images)} Fashion-MNIST test images ({ctx.sizes.test_per_class} per class, official t10k "
        "split), "
        f"{len(ctx.names)} classes, batch size {ctx.sizes.classify_batch_size} for both, on one model trained by "
        f"the library for one epoch over {len(ctx.classify_train)} other training images "
        f"({ctx.sizes.classify_train_per_class} per class). Library: `model.predict(images, names)` (the encoder on "
        "the images, one "
        "forward pass over the prompt (its image-independent head once per call, not per batch), then the tokens "
        "of only the class names under the most likely first token, "
        "and a second round for any name whose first-token bound still beats the best full score: exactly the "
        "top label of scoring every name); 'cached' is the same on "
        "encoder features read from the feature cache (what `evaluate` does on a dataset encoded before). "
        "Reference: `classify_by_generate` (the encoder, then greedy `generate`, up to 8 new tokens, then "
        "the longest class name found in the text; an answer that names no class counts as wrong).",
        "",
        "| | library (label scoring) | reference (generate + match) | library / reference |",
        "|---|---|---|---|",
        f"| images/s, median (min-max) | {stat(ips['library'])} | {stat(ips['reference'])} | "
        f"{stat(res['ratio'], suffix='x')} |",
        f"| images/s from cached features | {stat(ips['cached'])} | | {stat(res['ratio_cached'], suffix='x')} |",
        f"| accuracy{note} | {stat(res['accuracy']['library'], 100, '%')} | "
        f"{stat(res['accuracy']['reference'], 100, '%')} | |",
        f"| answers naming a class | {stat(res['valid']['library'], 100, '%')} (by construction) | "
        f"{stat(res['valid']['reference'], 100, '%')} | |",
    ])


