"""The main job, offline: fine-tune SmolLM2-135M (NF4 + LoRA) on EfficientNet-Lite0 patch tokens to
classify and describe Fashion-MNIST, and compare it with a linear probe on the same frozen features.

It uses only the public API (`attach`, `fit`, `evaluate`, `classify`, `describe`, `save_pretrained`,
`load`); the real assets enter through `vlm_adapters.demo.assets` exactly as Hub ids would.
"""

from __future__ import annotations

import json
import os
import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from ..builder import attach, load
from ..features import FEATURES_COLUMN, with_image_features
from ..label_prior import probe_pipeline
from ..metrics import paired_difference
from .assets import EFFICIENTNET_LITE0, fashion_mnist, smollm2_instruct
from .mosaic_data import build_mosaics, caption, parse_answer, parse_caption, task_rows


@dataclass
class DemoOptions:
    """Sizes and options of the demo run (docs/results.md records runs of these defaults and of others)."""

    output_dir: str = "runs/demo"
    # The VLM's gain over the probe grows with the training set (docs/results.md, learning curve), and four
    # image tokens train faster per row than sixteen with the LLM alone no worse, so the demo buys more rows
    # with the tokens it drops; 1,000 test images (the learning curve's) resolve a gain of under a point.
    train_per_class: int = 400
    test_per_class: int = 100
    zero_shot_per_class: int = 10
    describe_images: int = 30
    describe_max_new_tokens: int = 16
    num_train_epochs: float = 1.0
    num_image_tokens: int = 4
    learning_rate: float = 5e-4
    projector_lr: float = 1e-3
    describe_ratio: float = 0.25
    per_device_train_batch_size: int = 8
    system_prompt: str = "You classify images."
    compute_dtype: str = "auto"
    # attach's `dequantize`: "once" keeps a compute-dtype copy of the 4-bit weights (the demo's LLM is 135M
    # parameters, a few hundred MB) so no pass dequantizes again; docs/results.md has its fine-tune time.
    dequantize: str = "once"
    compile_layers: bool = False  # fit's torch.compile of the decoder layers (docs/benchmarks.md, section 1)
    # fit's label prior (label_prior.py); docs/results.md has the demo with it on and off.
    label_prior: bool = True
    mosaic_train: int = 200
    mosaic_questions: int = 2  # per training mosaic, worked answers (mosaic_data.worked_answer)
    mosaic_test: int = 20
    seed: int = 0


@dataclass
class DemoReport:
    options: dict[str, Any]
    phases_s: dict[str, float] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux reports KiB


@contextmanager
def phase(report: DemoReport, name: str) -> Iterator[None]:
    print(f"\n== {name} ==", flush=True)
    start = time.perf_counter()
    yield
    report.phases_s[name] = round(time.perf_counter() - start, 1)


def mean_pooled(features: Any, chunk: int = 512) -> np.ndarray:
    """[N, C] each row's cached features averaged over its tokens (float32): the probe's input. Chunk by
    chunk, so thousands of rows never sit in memory as tokens at once."""
    table = features.with_format("numpy", columns=[FEATURES_COLUMN])
    return np.concatenate([table[i : i + chunk][FEATURES_COLUMN].mean(axis=1) for i in range(0, len(table), chunk)])


def linear_probe(train: Any, test: Any, seed: int) -> np.ndarray:
    """Logistic regression on mean-pooled frozen features, the floor the VLM has to reach: its
    predicted label index for each test row."""
    probe = probe_pipeline(seed)
    probe.fit(mean_pooled(train), np.asarray(train["label"]))
    return probe.predict(mean_pooled(test))


def run_demo(options: DemoOptions | None = None) -> DemoReport:
    opts = options or DemoOptions()
    torch.manual_seed(opts.seed)
    report = DemoReport(options=asdict(opts))
    figures = report.figures
    os.makedirs(opts.output_dir, exist_ok=True)

    with phase(report, "setup (assets)"):
        train = fashion_mnist("train", per_class=opts.train_per_class, seed=opts.seed)
        test = fashion_mnist("test", per_class=opts.test_per_class, seed=opts.seed)
        model = attach(
            EFFICIENTNET_LITE0, smollm2_instruct(), adapter="lora", quantization="nf4",
            num_image_tokens=opts.num_image_tokens, system_prompt=opts.system_prompt, seed=opts.seed,
            compute_dtype=opts.compute_dtype, dequantize=opts.dequantize,
        )

    names = train.features["label"].names
    with phase(report, "encode images (cached)"):
        train_f = with_image_features(train, model.vision, token_shape=model.feature_shape)
        test_f = with_image_features(test, model.vision, token_shape=model.feature_shape)

    with phase(report, "linear probe"):
        probe_predictions = linear_probe(train_f, test_f, opts.seed)
        figures["linear_probe_accuracy"] = float(np.mean(probe_predictions == np.asarray(test["label"])))
        print(f"linear probe accuracy: {figures['linear_probe_accuracy']:.3f}")

    _zero_shot(report, model, test_f, opts)
    _fine_tune(report, model, train_f, opts)

    with phase(report, "evaluate (label scoring)"):
        metrics = model.evaluate(test_f, output_dir=opts.output_dir)
        figures.update({k: metrics[k] for k in ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc", "ece")})
        figures.update(per_class=metrics["per_class"], test_images=len(test_f))
        vlm_predictions = [names.index(name) for name in metrics["predicted_labels"]]
        figures["vlm_minus_probe"] = paired_difference(vlm_predictions, probe_predictions, test["label"])

    images = [test[i]["image"] for i in range(min(opts.describe_images, len(test)))]
    truth = [names[test[i]["label"]] for i in range(len(images))]
    _describe(report, model, images, truth, names, opts.describe_max_new_tokens)
    _save_and_reload(report, model, images[:8], names, opts)
    if opts.mosaic_train:
        _mosaics(report, model, opts)
    figures["peak_rss_gb"] = round(peak_rss_gb(), 2)
    with open(os.path.join(opts.output_dir, "report.json"), "w", encoding="utf-8") as fh:
        json.dump(asdict(report), fh, indent=2)
    print(format_report(report))
    return report


def _zero_shot(report: DemoReport, model: Any, test_f: Any, opts: DemoOptions) -> None:
    with phase(report, "zero-shot evaluation"):
        count = min(len(test_f), opts.zero_shot_per_class * len(test_f.features["label"].names))
        subset = test_f.shuffle(seed=opts.seed).select(range(count))
        report.figures["zero_shot_accuracy"] = model.evaluate(subset)["accuracy"]
        print(f"zero-shot accuracy ({len(subset)} images): {report.figures['zero_shot_accuracy']:.3f}")


def _fine_tune(report: DemoReport, model: Any, train_f: Any, opts: DemoOptions) -> None:
    with phase(report, "fine-tune (projector + LoRA, NF4)"):
        result = model.fit(
            train_f,
            output_dir=os.path.join(opts.output_dir, "run"),
            num_train_epochs=opts.num_train_epochs,
            learning_rate=opts.learning_rate,
            projector_lr=opts.projector_lr,
            describe_ratio=opts.describe_ratio,
            per_device_train_batch_size=opts.per_device_train_batch_size,
            label_prior=opts.label_prior,
            compile_layers=opts.compile_layers,
            save_strategy="no",
            seed=opts.seed,
        )
        report.figures["train_loss"] = result["train_loss"]
        report.figures["train_samples_per_second"] = result["train_samples_per_second"]


def _describe(
    report: DemoReport, model: Any, images: list[Any], truth: list[str], names: list[str], max_new_tokens: int
) -> None:
    with phase(report, "describe"):
        texts = model.describe(images, max_new_tokens=max_new_tokens)
        hits = [name.lower() in text.lower() for name, text in zip(truth, texts)]
        report.figures["describe_hit_rate"] = float(np.mean(hits))
        report.figures["describe_examples"] = [{"label": n, "text": t} for n, t in zip(truth[:5], texts[:5])]
        top3 = [dict(list(p.items())[:3]) for p in model.classify(images[:3], names)]
        report.figures["classify_examples"] = [{"label": n, "top3": t} for n, t in zip(truth[:3], top3)]


def _save_and_reload(report: DemoReport, model: Any, check: list[Any], names: list[str], opts: DemoOptions) -> None:
    """The adapter reloads from its folder alone (its config names both bases), as `vlm-adapters predict` loads it."""
    with phase(report, "save + reload"):
        adapter_dir = model.save_pretrained(os.path.join(opts.output_dir, "adapter"))
        reloaded = load(adapter_dir)
        before = [max(p, key=p.get) for p in model.classify(check, names)]
        after = [max(p, key=p.get) for p in reloaded.classify(check, names)]
        report.figures["reload_same_predictions"] = before == after
        report.figures["adapter_dir"] = adapter_dir
        report.figures["adapter_mb"] = round(
            sum(os.path.getsize(os.path.join(adapter_dir, f)) for f in os.listdir(adapter_dir)) / 1e6, 2
        )


def _mosaics(report: DemoReport, model: Any, opts: DemoOptions) -> None:
    """The language half, briefly: the classifier goes on to caption 2x2 Fashion-MNIST mosaics and to
    answer questions about them, reasoning cell by cell; `vlm-adapters demo mosaic` is the full task."""
    with phase(report, "mosaics: caption + worked answers"):
        train = build_mosaics("train", opts.mosaic_train, opts.seed)
        rows = task_rows(train, opts.mosaic_questions, opts.seed, answer_style="worked")
        data = train.select([r["mosaic"] for r in rows]).remove_columns("cells")
        for column in ("prompt", "answer"):
            data = data.add_column(column, [r[column] for r in rows])
        model.fit(
            data, output_dir=os.path.join(opts.output_dir, "mosaic_run"), num_train_epochs=opts.num_train_epochs,
            learning_rate=opts.learning_rate, projector_lr=opts.projector_lr,
            per_device_train_batch_size=opts.per_device_train_batch_size, save_strategy="no", seed=opts.seed,
        )
        test = build_mosaics("test", opts.mosaic_test, opts.seed)
        captions = model.describe(list(test["image"]), max_new_tokens=40)
        # answers only for the examples shown: each distinct question is a generation loop of its own
        shown = test.select(range(min(4, len(test))))
        asked = [r for r in task_rows(shown, 1, opts.seed + 1) if r["question_type"] != "caption"]
        answers = model.answer(list(shown["image"]), [q["prompt"] for q in asked], max_new_tokens=64)
    named = [t == g for row, text in zip(test["cells"], captions) for t, g in zip(row, parse_caption(text))]
    examples = [
        {"truth": caption(c), "caption": t, "question": q["prompt"], "answer_truth": q["truth"],
         "answer": a, "answer_right": parse_answer(q["question_type"], a) == q["truth"]}
        for c, t, q, a in zip(test["cells"], captions, asked, answers)
    ]
    report.figures.update(mosaic_cells_right=float(np.mean(named)), mosaic_examples=examples)


def paired_points(figures: dict[str, Any]) -> str:
    """'+0.6 (0.4) points: 7 images only the VLM gets right, 4 only the probe'."""
    p = figures.get("vlm_minus_probe")
    if not p:
        return "not measured"
    images = "image" if p["only_a"] == 1 else "images"
    return (f"{100 * p['diff']:+.1f} ({100 * p['se']:.1f}) points: {p['only_a']} {images} only the VLM gets right, "
            f"{p['only_b']} only the probe")


def format_report(report: DemoReport) -> str:
    f = report.figures
    lines = [
        "",
        "| figure | value |",
        "|---|---|",
        f"| VLM accuracy (label scoring, {f.get('test_images')} test images) | {f.get('accuracy', 0):.3f} |",
        f"| VLM macro-F1 | {f.get('macro_f1', 0):.3f} |",
        f"| linear probe accuracy (same frozen features) | {f.get('linear_probe_accuracy', 0):.3f} |",
        f"| VLM - probe, paired on the same images (one standard error) | {paired_points(f)} |",
        f"| zero-shot accuracy (before training) | {f.get('zero_shot_accuracy', 0):.3f} |",
        f"| describe names the right class | {f.get('describe_hit_rate', 0):.3f} |",
        f"| reload gives the same predictions | {f.get('reload_same_predictions')} |",
        f"| adapter size (MB) | {f.get('adapter_mb')} |",
        f"| peak RSS (GB) | {f.get('peak_rss_gb')} |",
        "",
        "| class | precision | recall |",
        "|---|---|---|",
        *(f"| {k} | {v['precision']:.2f} | {v['recall']:.2f} |" for k, v in f.get("per_class", {}).items()),
        "",
        "| phase | seconds |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in report.phases_s.items()),
        f"| total | {sum(report.phases_s.values()):.1f} |",
        "",
        "describe examples:",
        *(f"  [{e['label']}] {e['text']}" for e in f.get("describe_examples", [])),
    ]
    if "mosaic_examples" in f:
        lines += [
            "", f"mosaics: cells named right in {report.options['mosaic_test']} test captions: "
            f"{f['mosaic_cells_right']:.3f}",
            *(f"  truth: {e['truth']}\n  caption: {e['caption']}\n  Q: {e['question']} truth: {e['answer_truth']}"
              f" | answer: {e['answer']}" for e in f["mosaic_examples"]),
        ]
    return "\n".join(lines)
