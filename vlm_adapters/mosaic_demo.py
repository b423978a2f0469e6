"""`vlm-adapters demo mosaic`: train the demo's real weights to caption and answer questions about
Fashion-MNIST mosaics (`mosaic.py`), against a per-cell linear probe, the untrained model and a
classification-only model, all measured in the same run.

Every mosaic is encoded once: its rows (a caption and a few questions) share the features through
the cached-features column, instead of the feature cache encoding the same image once per row.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from .assets import FASHION_MNIST_LABELS, efficientnet_lite0, fashion_mnist, smollm2_instruct
from .attach import attach
from .data import FEATURES_COLUMN
from .mosaic import CAPTION_PROMPT, build_mosaics, caption_metrics, question_metrics, task_rows


@dataclass
class MosaicOptions:
    """Sizes of the mosaic run (see docs/results.md for what they reach and cost)."""

    output_dir: str = "runs/mosaic"
    train_mosaics: int = 1000
    test_mosaics: int = 250
    questions_per_mosaic: int = 4
    image_size: int = 448
    num_image_tokens: int = 16
    num_train_epochs: float = 1.0
    learning_rate: float = 5e-4
    projector_lr: float = 1e-3
    lora_r: int = 16
    per_device_train_batch_size: int = 8
    classifier_per_class: int = 40
    max_new_tokens: int = 40
    system_prompt: str = "You describe images."
    image_first: bool = False
    compute_dtype: str = "auto"
    seed: int = 0


@dataclass
class MosaicReport:
    options: dict[str, Any]
    phases_s: dict[str, float] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)


@contextmanager
def phase(report: MosaicReport, name: str) -> Iterator[None]:
    print(f"\n== {name} ==", flush=True)
    start = time.perf_counter()
    yield
    report.phases_s[name] = round(time.perf_counter() - start, 1)


def encode(model: Any, images: Sequence[Any], batch_size: int = 8) -> torch.Tensor:
    """Full encoder feature maps [N, H*W, C], each image encoded once."""
    return torch.cat([model.vision.encode_images(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])


def pool_tokens(features: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Average-pool square feature maps [N, H*W, C] to [N, num_tokens, C] (num_tokens square). The
    projector pools the same way after a per-channel affine standardisation, which commutes with
    averaging, so the model sees the same embeddings; rows then copy 16 tokens, not 196."""
    n, hw, c = features.shape
    side, out = round(hw**0.5), round(num_tokens**0.5)
    grid = features.transpose(1, 2).reshape(n, c, side, side)
    return F.adaptive_avg_pool2d(grid, out).flatten(2).transpose(1, 2).contiguous()


def feature_rows(rows: Sequence[dict[str, Any]], features: torch.Tensor) -> Any:
    """A `datasets.Dataset` of free-text rows, each holding its mosaic's features in the cached column."""
    import datasets

    table = {key: [row[key] for row in rows] for key in ("prompt", "answer", "question_type")}
    table[FEATURES_COLUMN] = features[[row["mosaic"] for row in rows]].numpy()
    shape = tuple(features.shape[1:])
    return datasets.Dataset.from_dict(
        table,
        features=datasets.Features(
            {
                "prompt": datasets.Value("string"),
                "answer": datasets.Value("string"),
                "question_type": datasets.Value("string"),
                FEATURES_COLUMN: datasets.Array2D(shape, "float32"),
            }
        ),
    )


def linear_probe(train: torch.Tensor, train_cells: list, test: torch.Tensor, test_cells: list, seed: int) -> dict:
    """The demo's probe (StandardScaler + LogisticRegression on mean-pooled features) per cell: the
    features of each cell's quarter of the mosaic's feature map, averaged."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def cell_vectors(features: torch.Tensor) -> np.ndarray:
        return pool_tokens(features, 4).reshape(-1, features.shape[-1]).numpy()

    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, C=0.5, random_state=seed))
    probe.fit(cell_vectors(train), np.concatenate(train_cells))
    hits = probe.predict(cell_vectors(test)) == np.concatenate(test_cells)
    p = float(hits.mean())
    return {"accuracy": p, "stderr": float(np.sqrt(p * (1 - p) / len(hits))), "n": len(hits)}


def generate(model: Any, features: torch.Tensor, prompts: Sequence[str], max_new_tokens: int, batch: int = 64) -> list:
    """Greedy answers for (features[i], prompts[i]), batched over rows that share a prompt."""
    out: list[str] = [""] * len(prompts)
    groups: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        groups.setdefault(prompt, []).append(i)
    with model.reuse_prompt_cache():
        for prompt, index in groups.items():
            for start in range(0, len(index), batch):
                part = index[start : start + batch]
                for i, text in zip(part, model.generate_from_features(features[part], prompt, max_new_tokens)):
                    out[i] = text
    return out


def score(
    model: Any, features: torch.Tensor, cells: list, questions: list[dict], max_new_tokens: int, answer_tokens: int
) -> dict:
    """Caption and per-question-type metrics of one model on the test mosaics, with the generated text."""
    captions = generate(model, features, [CAPTION_PROMPT] * len(features), max_new_tokens)
    picked = features[[q["mosaic"] for q in questions]]
    answers = generate(model, picked, [q["prompt"] for q in questions], answer_tokens)
    return {
        "caption": caption_metrics(cells, captions),
        "questions": question_metrics(questions, answers),
        "captions": captions,
        "answers": answers,
    }


def attach_demo_model(opts: MosaicOptions, encoder: Any, processor: Any, llm_path: str) -> Any:
    """The main demo's model (SmolLM2-135M in NF4 + LoRA on EfficientNet-Lite0 tokens)."""
    return attach(
        encoder, llm_path, image_processor=processor, adapter="lora", quantization="nf4",
        num_image_tokens=opts.num_image_tokens, lora_r=opts.lora_r, lora_alpha=2 * opts.lora_r,
        system_prompt=opts.system_prompt, image_first=opts.image_first, compute_dtype=opts.compute_dtype,
        seed=opts.seed,
    )


def train_args(opts: MosaicOptions, output_dir: str) -> dict[str, Any]:
    return dict(
        output_dir=output_dir, num_train_epochs=opts.num_train_epochs, learning_rate=opts.learning_rate,
        projector_lr=opts.projector_lr, per_device_train_batch_size=opts.per_device_train_batch_size,
        save_strategy="no", seed=opts.seed,
    )


def classification_only(opts: MosaicOptions, encoder: Any, processor: Any, llm_path: str) -> Any:
    """A model trained as the main demo trains (single Fashion-MNIST images, label rows, a quarter of
    them asked to describe), on single images at the mosaic's encoder size."""
    import datasets

    model = attach_demo_model(opts, encoder, processor, llm_path)
    singles = fashion_mnist("train", per_class=opts.classifier_per_class, seed=opts.seed + 1)
    table = {
        "label": singles["label"],
        FEATURES_COLUMN: pool_tokens(encode(model, singles["image"]), opts.num_image_tokens).numpy(),
    }
    shape = (opts.num_image_tokens, model.config.vision_signature["hidden_size"])
    features = datasets.Features(
        {"label": datasets.ClassLabel(names=FASHION_MNIST_LABELS), FEATURES_COLUMN: datasets.Array2D(shape, "float32")}
    )
    model.fit(datasets.Dataset.from_dict(table, features=features), **train_args(opts, opts.output_dir + "/classifier"))
    return model


def run_mosaic_demo(options: MosaicOptions | None = None) -> MosaicReport:
    opts = options or MosaicOptions()
    torch.manual_seed(opts.seed)
    report = MosaicReport(options=asdict(opts))
    res = report.results
    os.makedirs(opts.output_dir, exist_ok=True)
    with phase(report, "setup (assets, mosaics)"):
        llm_path = smollm2_instruct()
        encoder, processor = efficientnet_lite0(image_size=opts.image_size)
        train, test = (build_mosaics(s, n, opts.seed) for s, n in (("train", opts.train_mosaics), ("test", opts.test_mosaics)))
        model = attach_demo_model(opts, encoder, processor, llm_path)
    with phase(report, "encode mosaics (once each)"):
        train_maps, test_maps = encode(model, train["image"]), encode(model, test["image"])
    with phase(report, "per-cell linear probe"):
        res["probe"] = linear_probe(train_maps, train["cells"], test_maps, test["cells"], opts.seed)
    test_features = pool_tokens(test_maps, opts.num_image_tokens)
    questions = [r for r in task_rows(test, opts.questions_per_mosaic, opts.seed + 1) if r["question_type"] != "caption"]
    evaluate = lambda m: score(m, test_features, test["cells"], questions, opts.max_new_tokens)  # noqa: E731
    with phase(report, "zero-shot (before training)"):
        res["zero_shot"] = evaluate(model)
    with phase(report, "classification-only model (train + evaluate)"):
        res["classifier"] = evaluate(classification_only(opts, encoder, processor, llm_path))
    with phase(report, "fine-tune on captions + questions"):
        rows = task_rows(train, opts.questions_per_mosaic, opts.seed)
        fitted = model.fit(feature_rows(rows, pool_tokens(train_maps, opts.num_image_tokens)), **train_args(opts, opts.output_dir + "/run"))
        res["train"] = {"rows": len(rows), "train_loss": fitted["train_loss"], "runtime_s": fitted["train_runtime"]}
    with phase(report, "evaluate"):
        res["trained"] = evaluate(model)
    res["examples"] = examples(test["cells"], questions, res["trained"])
    with open(os.path.join(opts.output_dir, "report.json"), "w", encoding="utf-8") as fh:
        json.dump(asdict(report), fh, indent=2)
    plot_mosaics(test, res["trained"]["captions"], os.path.join(opts.output_dir, "mosaic_captions.png"))
    print(format_report(report))
    return report


def examples(cells: list, questions: list[dict], scored: dict, count: int = 4) -> dict[str, list]:
    """A few generated captions and answers beside the truth, for the docs."""
    captions = [{"truth": " / ".join(c), "generated": t} for c, t in zip(cells[:count], scored["captions"])]
    seen: dict[str, int] = {}
    answers = []
    for row, text in zip(questions, scored["answers"]):
        if seen.get(row["question_type"], 0) < 2:
            seen[row["question_type"]] = seen.get(row["question_type"], 0) + 1
            answers.append({"question": row["prompt"], "truth": row["answer"], "generated": text})
    return {"captions": captions, "answers": answers}


def plot_mosaics(mosaics: Any, captions: Sequence[str], path: str, count: int = 6) -> str:
    """Test mosaics with their generated captions, one per line of the caption's four parts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, count, figsize=(2.6 * count, 3.6))
    for ax, image, text in zip(axes, mosaics["image"][:count], captions):
        ax.imshow(np.asarray(image), cmap="gray")
        ax.set_axis_off()
        ax.set_title(text.replace("; ", "\n"), fontsize=7, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _cell(rate: dict | None) -> str:
    return "-" if rate is None else f"{100 * rate['accuracy']:.1f} ± {100 * rate['stderr']:.1f}"


def format_report(report: MosaicReport) -> str:
    """The markdown section: the table, sample sizes, examples beside the truth, phase times."""
    res = report.results
    kinds = ("what", "yes_no", "count", "where")
    lines = [
        "| model | caption: cells right | all 4 right | exact | BLEU | ROUGE-L | " + " | ".join(kinds) + " |",
        "|---|" + "---|" * (5 + len(kinds)),
    ]
    for name, key in (("fine-tuned on mosaics", "trained"), ("classification-only", "classifier"), ("zero-shot", "zero_shot")):
        s = res.get(key)
        if s:
            c, q = s["caption"], s["questions"]
            lines.append(
                f"| {name} | {_cell(c['per_cell'])} | {_cell(c['all_cells'])} | {100 * c['exact_match']:.1f} | "
                f"{c['bleu']:.1f} | {100 * c['rougeL']:.1f} | " + " | ".join(_cell(q.get(k)) for k in kinds) + " |"
            )
    lines.append(f"| per-cell linear probe | {_cell(res.get('probe'))} | | | | | | | | |")
    trained = res.get("trained")
    if trained:
        sizes = ", ".join(f"{k} {v['n']}" for k, v in trained["questions"].items())
        lines += ["", f"Test mosaics: {trained['caption']['all_cells']['n']} ({trained['caption']['per_cell']['n']} cells); "
                  f"questions: {sizes}. Figures are % ± one standard error."]
    ex = res.get("examples", {})
    lines += ["", "| truth | generated caption |", "|---|---|"]
    lines += [f"| {e['truth']} | {e['generated']} |" for e in ex.get("captions", [])]
    lines += ["", "| question | truth | generated |", "|---|---|---|"]
    lines += [f"| {e['question']} | {e['truth']} | {e['generated']} |" for e in ex.get("answers", [])]
    lines += ["", "| phase | seconds |", "|---|---|", *(f"| {k} | {v} |" for k, v in report.phases_s.items())]
    lines.append(f"| total | {sum(report.phases_s.values()):.1f} |")
    return "\n".join(lines)
