"""`vlm-adapters demo mosaic`: train the demo's real weights to caption and answer questions about
Fashion-MNIST mosaics (`mosaic_data.py`), against a per-cell linear probe, the untrained model and a
classification-only model, all measured in the same run.

Every mosaic is encoded once: its rows (a caption and a few questions) share the features through
the cached-features column, instead of the feature cache encoding the same image once per row.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch.nn import functional as F

from ..builder import attach
from ..config import option
from ..features import FEATURES_COLUMN
from ..label_prior import probe_pipeline
from .assets import FASHION_MNIST_LABELS, efficientnet_lite0, fashion_mnist, smollm2_instruct
from .classification import DemoReport, phase
from .mosaic_data import CAPTION_PROMPT, build_mosaics, caption_metrics, question_metrics, task_rows
from .mosaic_report import examples, format_report, plot_mosaics, write_results_section


@dataclass
class MosaicOptions:
    """Sizes and options of the mosaic run (docs/results.md records what they reach and cost)."""

    output_dir: str = option("runs/mosaic", "where the report, the PNG and the training runs go")
    results_md: str | None = option("docs/results.md", "markdown file whose mosaic section is rewritten; none: skip")
    train_mosaics: int = option(500, "training mosaics (four Fashion-MNIST train items each)")
    test_mosaics: int = option(100, "test mosaics (t10k items) for the fine-tuned model")
    baseline_mosaics: int = option(10, "test mosaics the zero-shot and classification-only baselines answer")
    questions_per_mosaic: int = option(3, "training questions per mosaic, besides its caption")
    test_questions_per_mosaic: int = option(4, "test questions per mosaic (types cycle: what, yes/no, count, where)")
    answer_style: Literal["short", "listed", "worked"] = option(
        "worked", "question targets: short, listed (caption first) or worked (cell by cell)"
    )
    image_size: int = option(320, "encoder input size in pixels (320: a 10x10 map, 5x5 per cell)")
    num_image_tokens: int = option(16, "image tokens per mosaic")
    num_train_epochs: float = option(1.0, "epochs over the caption + question rows")
    learning_rate: float = option(5e-4, "adapter learning rate")
    projector_lr: float = option(1e-3, "projector learning rate")
    lora_r: int = option(16, "LoRA rank (alpha = 2 x rank)")
    per_device_train_batch_size: int = option(8, "rows per optimizer step")
    classifier_per_class: int = option(20, "single images per class for the classification-only baseline")
    max_new_tokens: int = option(40, "caption length limit in tokens")
    answer_max_new_tokens: int = option(8, "short answer length limit in tokens")
    worked_max_new_tokens: int = option(64, "worked or listed answer length limit in tokens")
    system_prompt: str = option("You describe images.", "system prompt of the attached model")
    image_first: bool = option(True, "images before the prompt (LLaVA's order)")
    compute_dtype: str = option("auto", "auto, bfloat16 or float32")
    seed: int = option(0, "seed of the mosaics, the questions and training")


def encode(model: Any, images: Sequence[Any], batch_size: int = 8) -> torch.Tensor:
    """Full encoder feature maps [N, H*W, C], each image encoded once."""
    batches = range(0, len(images), batch_size)
    return torch.cat([model.vision.encode_images(images[i : i + batch_size]) for i in batches])


def pool_tokens(features: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Average-pool square feature maps [N, H*W, C] to [N, num_tokens, C] (num_tokens square). The
    projector pools the same way after a per-channel affine standardisation, which commutes with
    averaging, so the model sees the same embeddings; rows then copy 16 tokens, not the whole map."""
    n, hw, c = features.shape
    side, out = round(hw**0.5), round(num_tokens**0.5)
    grid = features.transpose(1, 2).reshape(n, c, side, side)
    return F.adaptive_avg_pool2d(grid, out).flatten(2).transpose(1, 2).contiguous()


def feature_rows(rows: Sequence[dict[str, Any]], features: torch.Tensor) -> Any:
    """A `datasets.Dataset` of free-text rows, each holding its mosaic's features in the cached column."""
    import datasets

    table: dict[str, Any] = {key: [row[key] for row in rows] for key in ("prompt", "answer")}
    table[FEATURES_COLUMN] = features[[row["mosaic"] for row in rows]].numpy()
    text = datasets.Value("string")
    array = datasets.Array2D(tuple(features.shape[1:]), "float32")
    return datasets.Dataset.from_dict(
        table, features=datasets.Features({"prompt": text, "answer": text, FEATURES_COLUMN: array})
    )


def linear_probe(train: torch.Tensor, train_cells: list, test: torch.Tensor, test_cells: list, seed: int) -> dict:
    """The demo's probe (StandardScaler + LogisticRegression on mean-pooled features) per cell: the
    features of each cell's quarter of the mosaic's feature map, averaged."""
    def cell_vectors(features: torch.Tensor) -> np.ndarray:
        return pool_tokens(features, 4).reshape(-1, features.shape[-1]).numpy()

    probe = probe_pipeline(seed)
    probe.fit(cell_vectors(train), np.concatenate(train_cells))
    hits = probe.predict(cell_vectors(test)) == np.concatenate(test_cells)
    p = float(hits.mean())
    return {"accuracy": p, "stderr": float(np.sqrt(p * (1 - p) / len(hits))), "n": len(hits)}


def generate(model: Any, features: torch.Tensor, prompts: Sequence[str], max_new_tokens: int, batch: int = 64) -> list:
    """Greedy text for (features[i], prompts[i]), batched over rows that share a prompt."""
    out: list[str] = [""] * len(prompts)
    groups: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        groups.setdefault(prompt, []).append(i)
    with model.reuse_prompt_cache():
        for prompt, index in groups.items():
            for start in range(0, len(index), batch):
                part = index[start : start + batch]
                texts = model.generate_from_features(features[part], prompt, max_new_tokens=max_new_tokens)
                for i, text in zip(part, texts):
                    out[i] = text
    return out


def score(
    model: Any, features: torch.Tensor, cells: list, questions: list[dict], opts: MosaicOptions, reasons: bool = False
) -> dict:
    """Caption and per-question-type metrics of one model on the first len(cells) test mosaics. A model
    trained to reason before its answer (`reasons`) gets `worked_max_new_tokens` for it."""
    captions = generate(model, features[: len(cells)], [CAPTION_PROMPT] * len(cells), opts.max_new_tokens)
    questions = [q for q in questions if q["mosaic"] < len(cells)]
    answer_tokens = opts.worked_max_new_tokens if reasons else opts.answer_max_new_tokens
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
    shape = (opts.num_image_tokens, model.config.vision_signature["hidden_size"])
    table = {"label": singles["label"], FEATURES_COLUMN: pool_tokens(encode(model, singles["image"]), shape[0]).numpy()}
    features = datasets.Features(
        {"label": datasets.ClassLabel(names=FASHION_MNIST_LABELS), FEATURES_COLUMN: datasets.Array2D(shape, "float32")}
    )
    model.fit(datasets.Dataset.from_dict(table, features=features), **train_args(opts, opts.output_dir + "/classifier"))
    return model


def run_mosaic_demo(options: MosaicOptions | None = None) -> DemoReport:
    opts = options or MosaicOptions()
    torch.manual_seed(opts.seed)
    report = DemoReport(options=asdict(opts))
    res = report.figures
    cpu_start = time.process_time()  # with the wall times: the cost on a machine shared with other jobs
    os.makedirs(opts.output_dir, exist_ok=True)
    with phase(report, "setup (assets, mosaics)"):
        llm_path = smollm2_instruct()
        encoder, processor = efficientnet_lite0(image_size=opts.image_size)
        train = build_mosaics("train", opts.train_mosaics, opts.seed)
        test = build_mosaics("test", opts.test_mosaics, opts.seed)
        model = attach_demo_model(opts, encoder, processor, llm_path)
    with phase(report, "encode mosaics (once each)"):
        train_maps, test_maps = encode(model, train["image"]), encode(model, test["image"])
    with phase(report, "per-cell linear probe"):
        res["probe"] = linear_probe(train_maps, train["cells"], test_maps, test["cells"], opts.seed)
    test_features = pool_tokens(test_maps, opts.num_image_tokens)
    asked = task_rows(test, opts.test_questions_per_mosaic, opts.seed + 1)
    questions = [row for row in asked if row["question_type"] != "caption"]
    few = test["cells"][: opts.baseline_mosaics]
    with phase(report, "zero-shot (before training)"):
        res["zero_shot"] = score(model, test_features, few, questions, opts)
    with phase(report, "classification-only model (train + evaluate)"):
        classifier = classification_only(opts, encoder, processor, llm_path)
        res["classifier"] = score(classifier, test_features, few, questions, opts)
    with phase(report, "fine-tune on captions + questions"):
        rows = task_rows(train, opts.questions_per_mosaic, opts.seed, answer_style=opts.answer_style)
        dataset = feature_rows(rows, pool_tokens(train_maps, opts.num_image_tokens))
        fitted = model.fit(dataset, **train_args(opts, opts.output_dir + "/run"))
        res["train"] = {"rows": len(rows), "train_loss": fitted["train_loss"]}
    with phase(report, "evaluate"):
        reasons = opts.answer_style != "short"
        res["trained"] = score(model, test_features, test["cells"], questions, opts, reasons=reasons)
    res["process_cpu_s"] = round(time.process_time() - cpu_start, 1)
    res["torch_threads"] = torch.get_num_threads()
    res["examples"] = examples(test["cells"], questions, res["trained"])
    res["png"] = plot_mosaics(test, res["trained"]["captions"], os.path.join(opts.output_dir, "mosaic_captions.png"))
    with open(os.path.join(opts.output_dir, "report.json"), "w", encoding="utf-8") as fh:
        json.dump(asdict(report), fh, indent=2)
    text = format_report(report)
    if opts.results_md:
        write_results_section(opts.results_md, text, res["png"])
    print(text)
    return report
