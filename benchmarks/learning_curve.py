"""Learning curve on the demo's real weights: the VLM (`attach` then `fit` with default options) against a
linear probe on the same frozen features and the untrained model, at several training-set sizes and seeds.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/learning_curve.py [--sizes 10 50 200 1000] [--seeds 0 1 2]
        [--compute_dtype auto] [--output docs/results.md]

Every training set is `fashion_mnist("train", per_class=n, seed=s)`; the test set is the same for every run
(`--test_per_class` images per class of the t10k split, seed 0). Each distinct image is encoded once: the
union of all drawn images goes through the library's feature cache, and each run selects its rows (with
their images, which `fit` reads only to take the label prior's views of them). The
probe is the demo's (`StandardScaler` + `LogisticRegression(C=0.5)` on mean-pooled features). The table and
a PNG (accuracy vs training images per class, mean +- one standard error over seeds) replace the section
between the learning-curve markers of `--output` (appended when absent); `--json` keeps every run.
`--fit` / `--attach` take JSON options for experiments; the recorded curve uses neither.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from typing import Any

import datasets
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vlm_adapters import attach  # noqa: E402
from vlm_adapters.demo.assets import EFFICIENTNET_LITE0, fashion_mnist, smollm2_instruct  # noqa: E402
from vlm_adapters.demo.classification import DemoOptions, mean_pooled  # noqa: E402
from vlm_adapters.features import with_image_features  # noqa: E402

SYSTEM_PROMPT = "You classify images."  # as the demo attaches the model
IMAGE_TOKENS = 16  # fixed, so the recorded runs stay comparable whatever the demo uses
START, END = "<!-- learning-curve:start -->", "<!-- learning-curve:end -->"


def image_key(image: dict[str, Any]) -> str:
    return hashlib.sha1(image["bytes"]).hexdigest()


def union_of(sets: list[datasets.Dataset]) -> tuple[datasets.Dataset, list[list[int]]]:
    """One dataset holding every distinct image of `sets` (first-seen order), and each set's rows in it."""
    rows: dict[str, int] = {}
    images, labels, index = [], [], []
    for ds in sets:
        raw = ds.cast_column("image", datasets.Image(decode=False))
        picked = []
        for image, label in zip(raw["image"], raw["label"]):
            key = image_key(image)
            if key not in rows:
                rows[key] = len(images)
                images.append(image)
                labels.append(label)
            picked.append(rows[key])
        index.append(picked)
    union = datasets.Dataset.from_dict({"image": images, "label": labels}, features=sets[0].features)
    return union, index


def probe_accuracy(x: np.ndarray, y: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, seed: int) -> float:
    """The demo's `linear_probe` on pooled features."""
    from vlm_adapters.label_prior import probe_pipeline

    probe = probe_pipeline(seed)
    return float(probe.fit(x, y).score(x_test, y_test))


def attach_model(seed: int, compute_dtype: str, extra: dict[str, Any]) -> Any:
    options = dict(num_image_tokens=IMAGE_TOKENS, system_prompt=SYSTEM_PROMPT, compute_dtype=compute_dtype, **extra)
    return attach(EFFICIENTNET_LITE0, smollm2_instruct(), seed=seed, **options)


def run_one(
    args: argparse.Namespace, train: datasets.Dataset, test: datasets.Dataset, size: int, seed: int, zero_shot: bool
) -> dict[str, Any]:
    model = attach_model(seed, args.compute_dtype, json.loads(args.attach))
    record: dict[str, Any] = {"size": size, "seed": seed, "compute_dtype": model.config.compute_dtype}
    if zero_shot:
        record["zero_shot"] = model.evaluate(test, progress=False)["accuracy"]
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        result = model.fit(train, output_dir=out, save_strategy="no", seed=seed, **json.loads(args.fit))
        record["fit_s"] = time.perf_counter() - start
    record["train_loss"] = result.get("train_loss")
    record["gate"] = result.get("label_prior_gate")
    start = time.perf_counter()
    record["vlm"] = model.evaluate(test, progress=False)["accuracy"]
    record["eval_s"] = time.perf_counter() - start
    return record


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error; the error is NaN for a single value (one seed has none)."""
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=1) / np.sqrt(len(arr))) if len(arr) > 1 else float("nan")


def plus_minus(value: tuple[float, float], decimals: int, sign: str = "") -> str:
    """'mean +- se' in points, or the mean alone where there is no standard error."""
    mean = f"{100 * value[0]:{sign}.{decimals}f}"
    return mean if np.isnan(value[1]) else f"{mean} +- {100 * value[1]:.{decimals}f}"


def summary(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (compute dtype, size): means +- standard errors over seeds, and the paired VLM - probe."""
    rows = []
    for dtype, size in sorted({(r["compute_dtype"], r["size"]) for r in records}):
        runs = [r for r in records if r["size"] == size and r["compute_dtype"] == dtype]
        row = {"size": size, "dtype": dtype, "runs": len(runs), "fit_s": float(np.mean([r["fit_s"] for r in runs]))}
        gates = [r["gate"] for r in runs if r.get("gate") is not None]
        row["gate"] = f"{np.mean(gates):.2f} ({min(gates):.2f}-{max(gates):.2f})" if gates else "-"
        row["paired"] = mean_se([r["vlm"] - r["probe"] for r in runs])
        for key in ("vlm", "probe"):
            row[key] = mean_se([r[key] for r in runs])
        row["options"] = sorted({f"--{kind} {r[f'{kind}_options']}" for r in runs for kind in ("attach", "fit")
                                 if json.loads(r.get(f"{kind}_options", "{}"))})
        zero_shot = [r["zero_shot"] for r in records if "zero_shot" in r and r["compute_dtype"] == dtype]
        row["zero_shot"] = mean_se(zero_shot) if zero_shot else None
        rows.append(row)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    def cell(value: tuple[float, float] | None) -> str:
        return "-" if value is None else plus_minus(value, 1)

    lines = [
        "| compute dtype | train images per class | seeds | VLM | linear probe | VLM - probe, paired by seed "
        "| untrained VLM | gate, mean (range) | fit wall s (1 thread) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        paired = plus_minus(r["paired"], 2, "+")  # differences of a few tenths
        lines.append(
            f"| {r['dtype']} | {r['size']} | {r['runs']} | {cell(r['vlm'])} | {cell(r['probe'])} | {paired} "
            f"| {cell(r['zero_shot'])} | {r['gate']} | {r['fit_s']:.0f} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    dtypes = sorted({r["dtype"] for r in rows})
    curves = [(d, "vlm", f"VLM (attach + fit defaults), {d}") for d in dtypes]
    curves += [(dtypes[0], "probe", "linear probe"), (dtypes[0], "zero_shot", "untrained VLM")]
    for dtype, key, name in curves:
        points = [r for r in rows if r["dtype"] == dtype]
        if any(r[key] is None for r in points):
            continue
        ax.errorbar([r["size"] for r in points], [100 * r[key][0] for r in points],
                    yerr=[100 * np.nan_to_num(r[key][1]) for r in points], marker="o", capsize=3, label=name)
    ax.set_xscale("log")
    ax.set_xlabel("training images per class")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_section(args: argparse.Namespace, rows: list[dict[str, Any]], test_size: int, total_s: float) -> None:
    png = os.path.splitext(args.output)[0] + "_learning_curve.png"
    plot(rows, png)
    command = "python benchmarks/learning_curve.py " + " ".join(sys.argv[1:])
    took = f" ({total_s / 60:.0f} min)" if total_s == total_s else " (the runs of that file)"
    options = [f"{r['dtype']} at {r['size']} per class: `{'`, `'.join(r['options'])}`" for r in rows if r["options"]]
    ran_with = f" Runs with options other than the defaults: {'; '.join(options)}." if options else ""
    section = "\n".join([
        START,
        "## Learning curve",
        "",
        f"`attach(...)` with the demo's parts and {IMAGE_TOKENS} image tokens (the curve's, fixed; the demo now "
        f"uses {DemoOptions().num_image_tokens}), then "
        f"`fit(train)` with default options, on `fashion_mnist('train', "
        f"per_class=n, seed=s)` for seeds {args.seeds}; the same {test_size} t10k test images for every run. Mean "
        "+- one standard error over the seeds (a row of one seed shows its value alone); the probe is the demo's "
        "(standardised mean-pooled features, logistic regression). Compute dtype: the table's column. Command: "
        f"`{command}`{took}.{ran_with}",
        "",
        table(rows),
        "",
        f"![learning curve]({os.path.basename(png)})",
        END,
    ])
    text = open(args.output, encoding="utf-8").read() if os.path.exists(args.output) else ""
    if START in text and END in text:
        text = text[: text.index(START)] + section + text[text.index(END) + len(END) :]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    with open(args.output, "w", encoding="utf-8") as fh:
        fh.write(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 50, 200, 1000])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--compute_dtype", default="auto")
    parser.add_argument("--test_per_class", type=int, default=100)
    parser.add_argument("--output", default="docs/results.md", help="markdown file to write the section into")
    parser.add_argument("--json", default=None, help="append one JSON line per run to this file")
    parser.add_argument("--fit", default="{}", help="JSON fit options (experiments only)")
    parser.add_argument("--attach", default="{}", help="JSON attach options (experiments only)")
    parser.add_argument("--no_zero_shot", action="store_true")
    parser.add_argument("--report", default=None, help="only rebuild the section from the runs of this --json file")
    args = parser.parse_args()
    if args.report:
        with open(args.report, encoding="utf-8") as fh:
            records = [json.loads(line) for line in fh if line.strip()]
        rows, args.seeds = summary(records), sorted({r["seed"] for r in records})
        print(table(rows))
        return write_section(args, rows, 10 * args.test_per_class, float("nan"))  # Fashion-MNIST: 10 classes
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    begin = time.perf_counter()
    plan = [(n, s) for n in args.sizes for s in args.seeds]
    test = fashion_mnist("test", per_class=args.test_per_class, seed=0)
    union, index = union_of([test] + [fashion_mnist("train", per_class=n, seed=s) for n, s in plan])
    vision = attach_model(0, args.compute_dtype, json.loads(args.attach))
    features = with_image_features(union, vision.vision, token_shape=vision.feature_shape)
    del vision
    x, y = mean_pooled(features), np.asarray(features["label"])
    test_f = features.select(index[0])
    records, seen = [], set()
    for (size, seed), rows in zip(plan, index[1:]):
        # the cached features beside the images: fit reads the features and takes views of the images for
        # its label prior's probe (prior_views.py), as it would from the images alone
        train = datasets.concatenate_datasets([union.select(rows).select_columns(["image"]), features.select(rows)],
                                              axis=1)
        record = run_one(args, train, test_f, size, seed, zero_shot=seed not in seen and not args.no_zero_shot)
        seen.add(seed)
        record["probe"] = probe_accuracy(x[rows], y[rows], x[index[0]], y[index[0]], seed)
        record.update(fit_options=args.fit, attach_options=args.attach)
        records.append(record)
        print(json.dumps(record), flush=True)
        if args.json:
            with open(args.json, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")
    rows = summary(records)
    print(table(rows))
    write_section(args, rows, len(index[0]), time.perf_counter() - begin)


if __name__ == "__main__":
    main()
