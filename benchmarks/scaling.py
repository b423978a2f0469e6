"""Section 4: time per training sample against image tokens and number of classes; classify time against classes."""

from __future__ import annotations

import math
import os
import statistics
from typing import Any

from benchmarks.classify import live_classifiers, time_classifiers
from benchmarks.common import PLANTVILLAGE_LABELS, StepTimes, log, num, stat, summary
from benchmarks.context import Context
from vlm_adapters import VisionLanguageModel
from vlm_adapters.demo.assets import FASHION_MNIST_LABELS as FASHION_LABELS


def with_row_labels(data: Any, names: list[str]) -> Any:
    """Label row i with class i mod K (K = len(names)): every class has rows; images and names do not match."""
    import datasets

    data = data.remove_columns("label").add_column("label", [i % len(names) for i in range(len(data))])
    return data.cast_column("label", datasets.ClassLabel(names=names))


def class_names(k: int) -> list[str]:
    if k == 38:
        return list(PLANTVILLAGE_LABELS)
    return list(FASHION_LABELS[:k]) if k <= 10 else [f"class {i}" for i in range(k)]


def time_train_steps(ctx: Context, num_image_tokens: int, data: Any) -> list[float]:
    """Seconds per training sample per repeat: `scaling_steps` steps timed after one warm-up step."""
    s = ctx.sizes
    values = []
    for _ in range(ctx.repeats):
        model = ctx.model(num_image_tokens)
        cb = StepTimes()
        ctx.library_fit(model, data, callbacks=[cb], max_steps=1 + s.scaling_steps)
        values.append(cb.seconds_per_step(warmup=1) / s.batch_size)
    return values


def mean_sequence_length(model: VisionLanguageModel, names: list[str]) -> float:
    prompt = model.config.classify_prompt
    return statistics.mean(len(model.prompts.encode(prompt, n).input_ids) for n in names)


def bench_scaling(ctx: Context) -> dict[str, Any]:
    s = ctx.sizes
    scaling = ctx.features("scaling")
    train_f, test_f = ctx.features("classify_train"), ctx.features("test")
    steps_acc = math.ceil(len(ctx.classify_train) / s.batch_size)
    out: dict[str, Any] = {"tokens": {}, "classes": {}, "accuracy_steps": int(steps_acc), "rows": len(scaling)}
    for tokens in s.scaling_tokens:
        log(f"scaling: {tokens} image tokens")
        per_sample = time_train_steps(ctx, tokens, scaling)
        model = ctx.model(tokens)
        ctx.library_fit(model, train_f, num_train_epochs=1)  # the same training as section 2's model
        accuracy = model.evaluate(test_f, batch_size=s.classify_batch_size)["accuracy"]
        out["tokens"][tokens] = {
            "per_sample": per_sample, "accuracy": accuracy,
            "seq_len": mean_sequence_length(model, ctx.names),
        }
        log(f"scaling: {tokens} tokens: {statistics.median(per_sample):.3f} s/sample, accuracy {accuracy:.3f}")
    for k in s.scaling_classes:
        names = class_names(k)
        log(f"scaling: {k} classes")
        data = with_row_labels(scaling, names)
        per_sample = time_train_steps(ctx, s.num_image_tokens, data)
        model = ctx.model(s.num_image_tokens)  # initial weights: classification cost does not depend on them
        timing = time_classifiers(ctx, model, names, live_classifiers(ctx.test_images[: s.scaling_classify_images]))
        out["classes"][k] = {
            "per_sample": per_sample, "classify_library": timing["library"], "classify_reference": timing["reference"],
            "seq_len": mean_sequence_length(model, names),
            "answer_tokens": statistics.mean(len(model.prompts.answer_ids(n)) for n in names),
        }
        log(f"scaling: {k} classes: {statistics.median(per_sample):.3f} s/sample train, "
            f"{statistics.median(timing['library']):.3f} s/image classify")
    return out


def plot_scaling(res: dict[str, Any], path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(rows: dict[int, Any], key: str) -> tuple[list[int], list[float], list[list[float]]]:
        xs = sorted(rows)
        meds, errs = [], [[], []]
        for x in xs:
            med, lo, hi = summary(rows[x][key])
            meds.append(med)
            errs[0].append(med - lo)
            errs[1].append(hi - med)
        return xs, meds, errs

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    xs, ys, err = series(res["tokens"], "per_sample")
    left.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label="training (library)")
    left.set(xlabel="image tokens", ylabel="seconds per training sample", title="vs image tokens", xticks=xs)
    left.set_ylim(bottom=0)
    curves = (
        ("per_sample", "training s/sample (library)"),
        ("classify_library", "classify s/image (library)"),
        ("classify_reference", "classify s/image (reference generate)"),
    )
    for key, label in curves:
        xs, ys, err = series(res["classes"], key)
        right.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=label)
    right.set(xlabel="number of classes", ylabel="seconds", title="vs number of classes", xticks=xs)
    right.set_ylim(bottom=0)
    right.legend(fontsize=8)
    fig.suptitle("vlm_adapters: median over repeats, bars = min-max")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report_scaling(ctx: Context, res: dict[str, Any], plot: str | None) -> str:
    s = ctx.sizes
    lines = [
        "## 4. Scaling",
        "",
        f"Library training, {s.scaling_steps} optimizer steps timed after one warm-up step, batch size "
        f"{s.batch_size}, on cached encoder features of {res['rows']} Fashion-MNIST training images (so these are "
        "steady-state step times without encoding). Image tokens: the 7x7 EfficientNet-Lite0 map average-pooled to 9 "
        "or 16 tokens, or all 49 (no pooling). Accuracy: each token count trained for the same "
        f"{res['accuracy_steps']} steps (one epoch over the {len(ctx.classify_train)} images of section 2's model) "
        f"from the same initial weights, evaluated by label scoring on the {len(ctx.test)} test images; a short "
        "training, not a converged result.",
        "",
        "| image tokens | tokens per sequence (mean) | training s/sample, median (min-max) | "
        "accuracy (short training) |",
        "|---|---|---|---|",
    ]
    for tokens, row in sorted(res["tokens"].items()):
        lines.append(f"| {tokens} | {num(row['seq_len'])} | {stat(row['per_sample'])} | {row['accuracy']:.1%} |")
    lines += [
        "",
        f"Number of classes, {s.num_image_tokens} image tokens. K = 2 and 10 use the first K Fashion-MNIST class "
        "names, "
        "K = 38 the 38 PlantVillage class names (e.g. `Apple___Apple_scab`) as label strings. The training images are "
        "Fashion-MNIST, with row i labelled class i mod K so that every class has rows (images and names do not "
        "match: a timing run only). Classification: the untrained model, "
        f"{min(s.scaling_classify_images, len(ctx.test_images))} test images, batch size {s.classify_batch_size}; the "
        "library runs `predict`, which on an untrained model (rarely sure of the first token) needs its second "
        "round for most images, its slow case; the reference generates up to 8 tokens "
        "whatever K is (too few to spell the longer PlantVillage names, so its K = 38 time is a lower bound).",
        "",
        "| classes | answer tokens (mean) | training s/sample | classify s/image, library | "
        "classify s/image, reference |",
        "|---|---|---|---|---|",
    ]
    for k, row in sorted(res["classes"].items()):
        lines.append(
            f"| {k} | {num(row['answer_tokens'])} | {stat(row['per_sample'])} | {stat(row['classify_library'])} | "
            f"{stat(row['classify_reference'])} |"
        )
    if plot:
        lines += ["", f"![time per sample vs image tokens and classes]({os.path.basename(plot)})"]
    return "\n".join(lines)


