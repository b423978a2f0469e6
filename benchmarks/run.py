"""Benchmarks of vlm_adapters against the standard transformers recipe (benchmarks/reference.py), on the
real demo parts: EfficientNet-Lite0 -> MLP projector -> SmolLM2-135M-Instruct in NF4 with LoRA r16,
trained and evaluated on Fashion-MNIST. Writes a markdown report (and a scaling plot beside it).

    .venv/bin/python benchmarks/run.py                       # full default run (~30-40 min on 2 CPU cores)
    .venv/bin/python benchmarks/run.py --quick --threads 1   # smoke configuration, ~6 min

`--threads` sets torch's thread count (default: torch's own choice, all cores); the memory subprocesses
use the same count. Everything runs on the CPU.
    .venv/bin/python benchmarks/run.py --only training,classify --repeats 5

Sections (`--only`, comma-separated):
  training  samples/s of `model.fit` (feature cache built inside the timing) vs the reference Trainer
  classify  images/s and accuracy of `model.classify` (label scoring) vs generate + string match
  memory    peak RSS of a ~1.1B-parameter Llama loaded in NF4 vs bf16 (separate subprocesses)
  scaling   time per training sample vs image tokens / number of classes; classify time vs classes
  peak      bf16 / fp32 matmul GFLOP/s of this machine and the share a library training step reaches
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import TrainerCallback, TrainingArguments

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.reference import classify_by_generate, reference_trainer  # noqa: E402
from vlm_adapters import VisionLanguageModel, VLMCollator, attach  # noqa: E402
from vlm_adapters.demo.assets import FASHION_MNIST_LABELS as FASHION_LABELS  # noqa: E402
from vlm_adapters.demo.assets import efficientnet_lite0, fashion_mnist, smollm2_instruct  # noqa: E402
from vlm_adapters.fast_lora import peft_lora_forward  # noqa: E402
from vlm_adapters.features import with_image_features  # noqa: E402
from vlm_adapters.packing import PackedBatch  # noqa: E402
from vlm_adapters.prompting import IGNORE_INDEX  # noqa: E402

SECTIONS = ("training", "classify", "memory", "scaling", "peak")
SEED = 0
SYSTEM_PROMPT = "You classify images."  # as in vlm_adapters.demo

# The 38 PlantVillage classes (folder names of the public data set), used as long label strings.
PLANTVILLAGE_LABELS = [
    "Apple___Apple_scab", "Apple___Black_rot", "Apple___Cedar_apple_rust", "Apple___healthy",
    "Blueberry___healthy", "Cherry_(including_sour)___Powdery_mildew", "Cherry_(including_sour)___healthy",
    "Corn_(maize)___Cercospora_leaf_spot Gray_leaf_spot", "Corn_(maize)___Common_rust_",
    "Corn_(maize)___Northern_Leaf_Blight", "Corn_(maize)___healthy", "Grape___Black_rot",
    "Grape___Esca_(Black_Measles)", "Grape___Leaf_blight_(Isariopsis_Leaf_Spot)", "Grape___healthy",
    "Orange___Haunglongbing_(Citrus_greening)", "Peach___Bacterial_spot", "Peach___healthy",
    "Pepper,_bell___Bacterial_spot", "Pepper,_bell___healthy", "Potato___Early_blight", "Potato___Late_blight",
    "Potato___healthy", "Raspberry___healthy", "Soybean___healthy", "Squash___Powdery_mildew",
    "Strawberry___Leaf_scorch", "Strawberry___healthy", "Tomato___Bacterial_spot", "Tomato___Early_blight",
    "Tomato___Late_blight", "Tomato___Leaf_Mold", "Tomato___Septoria_leaf_spot",
    "Tomato___Spider_mites Two-spotted_spider_mite", "Tomato___Target_Spot",
    "Tomato___Tomato_Yellow_Leaf_Curl_Virus", "Tomato___Tomato_mosaic_virus", "Tomato___healthy",
]
assert len(PLANTVILLAGE_LABELS) == 38

# ~1.1B parameters (TinyLlama-1.1B's shape); the quick run uses a small one of the same family.
MEMORY_LLM_FULL = dict(
    hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
    num_key_value_heads=4, vocab_size=32000,
)
MEMORY_LLM_QUICK = dict(
    hidden_size=512, intermediate_size=1408, num_hidden_layers=6, num_attention_heads=8,
    num_key_value_heads=2, vocab_size=8192,
)


@dataclass(frozen=True)
class Sizes:
    """Everything that sets how big the benchmark is; `--quick` swaps in QUICK."""

    train_per_class: int = 8  # 80 training images
    test_per_class: int = 5  # 50 test images
    batch_size: int = 8
    epochs: float = 2.0
    learning_rate: float = 5e-4  # projector and LoRA alike (the reference Trainer has a single lr)
    num_image_tokens: int = 16
    lora_r: int = 16
    classify_batch_size: int = 16
    classify_train_per_class: int = 40  # 400 images, 1 epoch: the model classified in sections 2 and 4
    scaling_tokens: tuple[int, ...] = (9, 16, 49)
    scaling_classes: tuple[int, ...] = (2, 10, 38)
    scaling_steps: int = 5  # timed training steps per setting, after 1 warm-up step
    scaling_classify_images: int = 16  # test images classified per number of classes (one batch)
    matmul_size: int = 4096
    matmul_reps: int = 5
    memory_llm: dict[str, int] = field(default_factory=lambda: dict(MEMORY_LLM_FULL))


QUICK = Sizes(
    train_per_class=2, test_per_class=1, classify_train_per_class=2,
    scaling_steps=2, scaling_classify_images=4, matmul_size=1024, matmul_reps=3,
    memory_llm=dict(MEMORY_LLM_QUICK),
)


# ------------------------------------------------------------------------------------------------
# timing helpers
# ------------------------------------------------------------------------------------------------


def summary(values: Sequence[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def num(x: float) -> str:
    """A number with about three significant digits, never in exponent form."""
    if not math.isfinite(x):
        return str(x)
    a = abs(x)
    if a >= 100:
        return f"{x:,.0f}"
    if a >= 10:
        return f"{x:.1f}"
    if a >= 1:
        return f"{x:.2f}"
    if a == 0:
        return "0"
    return f"{x:.{max(2, 2 - math.floor(math.log10(a)))}f}"


def stat(values: Sequence[float], scale: float = 1.0, suffix: str = "") -> str:
    """'median (min-max)' of a list of repeat values."""
    med, lo, hi = summary([v * scale for v in values])
    if len(values) == 1:
        return f"{num(med)}{suffix} (1 run)"
    return f"{num(med)}{suffix} ({num(lo)}-{num(hi)})"


def ratios(a: Sequence[float], b: Sequence[float]) -> list[float]:
    """Per-repeat ratios a[i] / b[i]: each pair was measured back to back in the same run."""
    return [x / y if y else math.nan for x, y in zip(a, b, strict=True)]


@contextlib.contextmanager
def stopwatch() -> Iterator[list[float]]:
    box: list[float] = []
    start = time.perf_counter()
    try:
        yield box
    finally:
        box.append(time.perf_counter() - start)


@contextlib.contextmanager
def environ(**values: str) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class StepTimes(TrainerCallback):
    """Wall-clock time at the end of every optimizer step (data loading, forward, backward, update)."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.ends.append(time.perf_counter())

    def seconds_per_step(self, warmup: int = 1) -> float:
        if len(self.ends) <= warmup:
            raise RuntimeError(f"only {len(self.ends)} steps ran; need more than {warmup} warm-up step(s).")
        return (self.ends[-1] - self.ends[warmup - 1]) / (len(self.ends) - warmup)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ------------------------------------------------------------------------------------------------
# shared setup
# ------------------------------------------------------------------------------------------------


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


class Context:
    """Assets, data subsets and attached models, created once and shared by the sections."""

    def __init__(self, sizes: Sizes, repeats: int, threads: int, quick: bool) -> None:
        self.sizes, self.repeats, self.threads, self.quick = sizes, repeats, threads, quick
        self.tmp = tempfile.mkdtemp(prefix="vlm-bench-")
        # Resolve the converted assets before any section points VLM_ADAPTERS_CACHE elsewhere.
        self.llm_path = smollm2_instruct()
        self.encoder, self.processor = efficientnet_lite0()
        self.train = fashion_mnist("train", per_class=sizes.train_per_class, seed=SEED)
        self.test = fashion_mnist("test", per_class=sizes.test_per_class, seed=SEED)
        self.classify_train = fashion_mnist("train", per_class=sizes.classify_train_per_class, seed=SEED + 1)
        self.names: list[str] = list(self.train.features["label"].names)
        self.test_images = [row["image"] for row in self.test]  # decoded once, outside every timing
        self.test_truth: list[int] = list(self.test["label"])
        self._models: dict[int, tuple[VisionLanguageModel, dict[str, torch.Tensor]]] = {}
        self._features: dict[str, Any] = {}
        self.trained_state: dict[str, torch.Tensor] | None = None  # trained on classify_train, for section 2
        self.results: dict[str, Any] = {}

    def dir(self, name: str) -> str:
        path = tempfile.mkdtemp(prefix=f"{name}-", dir=self.tmp)
        return path

    def model(self, num_image_tokens: int) -> VisionLanguageModel:
        """The attached demo model with `num_image_tokens`, reset to its initial trainable weights."""
        if num_image_tokens not in self._models:
            log(f"attach: EfficientNet-Lite0 + SmolLM2-135M NF4, LoRA r{self.sizes.lora_r}, {num_image_tokens} tokens")
            model = attach(
                self.encoder, self.llm_path, image_processor=self.processor, adapter="lora", quantization="nf4",
                num_image_tokens=num_image_tokens, system_prompt=SYSTEM_PROMPT, lora_r=self.sizes.lora_r,
                seed=SEED, device="cpu",
            )
            self._models[num_image_tokens] = (model, trainable_state(model))
        model, init = self._models[num_image_tokens]
        load_trainable_state(model, init)
        return model

    def features(self, name: str) -> Any:
        """Encoder features (all 49 tokens) of a data subset, cached once per run for the scaling runs."""
        if name not in self._features:
            data = {
                "train": self.train, "test": self.test, "classify_train": self.classify_train,
                "scaling": self.scaling_train(),
            }[name]
            tokens = self.sizes.num_image_tokens
            model = self._models[tokens][0] if tokens in self._models else self.model(tokens)
            shape = (model.projector.num_vision_tokens, model.config.vision_signature["hidden_size"])
            self._features[name] = with_image_features(
                data, model.vision, token_shape=shape, cache_dir=os.path.join(self.tmp, "features")
            )
        return self._features[name]

    def scaling_train(self) -> Any:
        """The training subset, grown if needed so every one of the most classes gets a row."""
        per_class = max(self.sizes.train_per_class, math.ceil(max(self.sizes.scaling_classes) / len(self.names)))
        if per_class == self.sizes.train_per_class:
            return self.train
        return fashion_mnist("train", per_class=per_class, seed=SEED)

    def train_args(self, output_dir: str, **overrides: Any) -> dict[str, Any]:
        """TrainingArguments values given identically to the library and to the reference."""
        s = self.sizes
        args = dict(
            output_dir=output_dir, num_train_epochs=s.epochs, learning_rate=s.learning_rate,
            per_device_train_batch_size=s.batch_size, lr_scheduler_type="cosine", warmup_steps=0.05,
            weight_decay=0.0, logging_steps=10, save_strategy="no", report_to="none", seed=SEED,
            dataloader_num_workers=0, use_cpu=True, disable_tqdm=True,
        )
        args.update(overrides)
        return args

    def library_fit(
        self, model: VisionLanguageModel, data: Any, callbacks: list[Any] | None = None, **overrides: Any
    ) -> dict[str, Any]:
        """`model.fit` with the shared arguments; projector at the same lr, no describe examples (the
        reference trains only the classify prompt, so both see the same sequences)."""
        return model.fit(
            data, projector_lr=self.sizes.learning_rate, describe_ratio=0.0, callbacks=callbacks,
            **self.train_args(self.dir("fit"), **overrides),
        )

    def library_trained_model(self) -> VisionLanguageModel:
        """The 16-token model trained by the library for one epoch on `classify_train` (once per run):
        the 20 steps of section 1 leave a model that mostly answers one class."""
        model = self.model(self.sizes.num_image_tokens)
        if self.trained_state is None:
            log(f"training the classification model: {len(self.classify_train)} images, 1 epoch")
            self.library_fit(model, self.features("classify_train"), num_train_epochs=1)
            self.trained_state = trainable_state(model)
        load_trainable_state(model, self.trained_state)
        return model

    def close(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------------------
# 1. training throughput
# ------------------------------------------------------------------------------------------------


def bench_training(ctx: Context) -> dict[str, Any]:
    s = ctx.sizes
    model = ctx.model(s.num_image_tokens)
    samples = len(ctx.train) * s.epochs

    def run_library(max_steps: int = -1) -> tuple[float, int, dict[str, float]]:
        cb = StepTimes()
        with environ(VLM_ADAPTERS_CACHE=ctx.dir("cache")), stopwatch() as t:  # fresh cache: encoding is paid
            metrics = ctx.library_fit(model, ctx.train, callbacks=[cb], max_steps=max_steps)
        return t[0], len(cb.ends), metrics

    def run_reference(max_steps: int = -1) -> tuple[float, int, dict[str, float]]:
        cb = StepTimes()
        with stopwatch() as t:
            args = ctx.train_args(
                ctx.dir("ref"), max_steps=max_steps, remove_unused_columns=False,
                gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
            )
            trainer = reference_trainer(model, ctx.train, ctx.names, TrainingArguments(**args))
            trainer.add_callback(cb)
            try:
                with peft_lora_forward(model):  # the standard recipe runs PEFT's own LoRA forward
                    metrics = trainer.train().metrics
            finally:
                model.base_llm.gradient_checkpointing_disable()  # the library run shares this LLM
        return t[0], len(cb.ends), metrics

    log("training: warm-up (1 untimed step each)")
    for run in (run_library, run_reference):
        ctx.model(s.num_image_tokens)
        run(max_steps=1)

    out: dict[str, Any] = {"library": [], "reference": [], "steps": {}, "loss": {}, "trainer": {}, "samples": samples}
    for r in range(ctx.repeats):
        order = ("library", "reference") if r % 2 == 0 else ("reference", "library")
        for which in order:
            ctx.model(s.num_image_tokens)  # back to the same initial weights
            seconds, steps, metrics = (run_library if which == "library" else run_reference)()
            loss = metrics["train_loss"]
            out[which].append(samples / seconds)
            out["steps"].setdefault(which, set()).add(steps)
            out["loss"].setdefault(which, []).append(loss)
            out["trainer"].setdefault(which, []).append(metrics["train_samples_per_second"])
            log(f"training repeat {r + 1}/{ctx.repeats} {which}: {seconds:.1f} s, {steps} steps, "
                f"{samples / seconds:.2f} samples/s, train loss {loss:.3f}")
    if out["steps"]["library"] != out["steps"]["reference"]:
        raise RuntimeError(f"optimizer steps differ: {out['steps']}")
    out["ratio"] = ratios(out["library"], out["reference"])
    out["trainer_ratio"] = ratios(out["trainer"]["library"], out["trainer"]["reference"])
    return out


def report_training(ctx: Context, res: dict[str, Any]) -> str:
    s = ctx.sizes
    steps = next(iter(res["steps"]["library"]))
    gap = max(abs(a - b) for a, b in zip(res["loss"]["library"], res["loss"]["reference"], strict=True))
    same = (
        f"The train losses of the two recipes agree within {gap:.1e}: they compute the same training."
        if gap < 1e-2 else f"The train losses of the two recipes differ by up to {gap:.3f}: the library's packed "
        "batches run other matmul shapes in bfloat16 than the padded reference (on one real batch at the same "
        "weights the two losses were 7.982 and 7.987), and 20 optimizer steps carry that rounding along."
    )
    return "\n".join([
        "## 1. Training throughput",
        "",
        f"{len(ctx.train)} Fashion-MNIST training images ({s.train_per_class} per class), batch size {s.batch_size}, "
        f"{s.epochs:g} epochs = {steps} optimizer steps for both, seed {SEED}, AdamW at lr {s.learning_rate:g} for "
        f"projector and LoRA alike, cosine schedule, no checkpoints; `describe_ratio=0` so the library trains only the "
        "classify prompt, like the reference (the demo itself uses projector_lr 1e-3 and 25% describe examples). "
        "Library: `model.fit(...)` timed end to end, including building "
        "the feature cache (a fresh, empty cache folder every repeat, so each repeat encodes the images once); "
        "its batches run packed (no padding, the system turn + prompt once per batch, logits at answer tokens only). "
        "Reference: `reference_trainer(...)` + `train()` (the encoder runs on every batch's pixels, full-vocabulary "
        "logits, the LLM's own loss, PEFT's own LoRA forward, gradient checkpointing on as in the HF cookbook's "
        "QLoRA recipe). "
        "The two runs of a repeat start from the same initial weights and alternate "
        "in order; one untimed 1-step run of each comes first.",
        "",
        "| | library | reference | library / reference |",
        "|---|---|---|---|",
        f"| training samples/s, median (min-max) | {stat(res['library'])} | {stat(res['reference'])} | "
        f"{stat(res['ratio'], suffix='x')} |",
        f"| the Trainer's own `train_samples_per_second` (its loop only: no encoding, no setup) | "
        f"{stat(res['trainer']['library'])} | {stat(res['trainer']['reference'])} | "
        f"{stat(res['trainer_ratio'], suffix='x')} |",
        f"| optimizer steps | {steps} | {next(iter(res['steps']['reference']))} | |",
        f"| train loss (mean over the run) | {stat(res['loss']['library'])} | {stat(res['loss']['reference'])} | |",
        "",
        same,
    ])


# ------------------------------------------------------------------------------------------------
# 2. classification throughput and accuracy
# ------------------------------------------------------------------------------------------------


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


# ------------------------------------------------------------------------------------------------
# 3. memory: NF4 vs bf16
# ------------------------------------------------------------------------------------------------

MEMORY_CHILD = r"""
import json, resource, sys, time
mode, path, threads, root = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
sys.path.insert(0, root)
import torch, transformers
torch.set_num_threads(threads)
out = {"mode": mode}
if mode.startswith("baseline_"):  # also the code a load imports before any weight: Llama modeling (+ bitsandbytes)
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaForCausalLM
    if mode == "baseline_bnb":
        import bitsandbytes
    if mode == "baseline_library":
        import vlm_adapters.llm
elif mode != "baseline":
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    start = time.perf_counter()
    if mode == "nf4":  # the library's loader, as attach(quantization="nf4") calls it
        from vlm_adapters.config import AdapterConfig
        from vlm_adapters.llm import load_llm
        model = load_llm(path, AdapterConfig(quantization="nf4", compute_dtype="bfloat16"), torch.device("cpu"))
    elif mode == "nf4_transformers":
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, device_map={"": "cpu"})
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map={"": "cpu"})
    ids = torch.randint(0, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    out.update(seconds=time.perf_counter() - start, finite=bool(torch.isfinite(logits).all()),
               footprint_mib=model.get_memory_footprint() / 2**20,
               embedding_dtype=str(model.get_input_embeddings().weight.dtype))
with open("/proc/self/status") as fh:
    status = {k: int(v.split()[0]) / 1024 for k, v in (line.split(":", 1) for line in fh)
              if k in ("VmHWM", "VmRSS", "RssAnon", "RssFile")}
out.update(maxrss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, status_mib=status)
print("RESULT " + json.dumps(out))
"""


def save_random_llm(config_kwargs: dict[str, int], folder: str, shard_bytes: int = 1 << 30) -> int:
    """A Llama with random bf16 weights, written shard by shard (never the whole model in memory)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**config_kwargs)
    config.dtype = torch.bfloat16  # so the NF4 load keeps embeddings / head in bf16 ("auto" dtype)
    with torch.device("meta"):
        shapes = {name: t.shape for name, t in LlamaForCausalLM(config).state_dict().items()}
    gen = torch.Generator().manual_seed(SEED)
    pending: list[tuple[str, torch.Tensor]] = []
    written: list[list[str]] = []
    weight_map: dict[str, str] = {}
    total = params = 0

    def flush() -> None:
        fname = f"shard-{len(written):05d}.safetensors"  # renamed below once the count is known
        save_file(dict(pending), os.path.join(folder, fname), metadata={"format": "pt"})
        written.append([name for name, _ in pending])
        pending.clear()

    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            tensor = torch.ones(shape, dtype=torch.bfloat16)
        else:
            tensor = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
        if pending and sum(t.nbytes for _, t in pending) + tensor.nbytes > shard_bytes:
            flush()
        pending.append((name, tensor))
        total += tensor.nbytes
        params += tensor.numel()
    flush()
    for i, names in enumerate(written):
        fname = f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
        os.replace(os.path.join(folder, f"shard-{i:05d}.safetensors"), os.path.join(folder, fname))
        weight_map.update({name: fname for name in names})
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh)
    config.save_pretrained(folder)
    return params


LOADS = ("bf16", "nf4", "nf4_transformers")  # nf4: vlm_adapters' loader; nf4_transformers: from_pretrained


def bench_memory(ctx: Context) -> dict[str, Any]:
    folder = ctx.dir("random-llm")
    log(f"memory: writing a random bf16 Llama {ctx.sizes.memory_llm}")
    params = save_random_llm(ctx.sizes.memory_llm, folder)
    log(f"memory: {params / 1e9:.3f}B parameters saved")
    out: dict[str, Any] = {"params": params, "config": ctx.sizes.memory_llm, "runs": {}}
    for r in range(ctx.repeats):
        loads = LOADS[r % len(LOADS):] + LOADS[: r % len(LOADS)]  # rotate the order over the repeats
        for mode in ("baseline", "baseline_llama", "baseline_bnb", "baseline_library", *loads):
            # Through a forking shell: Linux keeps ru_maxrss across execve, so a child exec'd straight from
            # this (large) process would report this process's peak; a child forked by a small shell does not.
            proc = subprocess.run(
                ["/bin/sh", "-c", '"$@"; exit $?', "sh", sys.executable, "-c", MEMORY_CHILD, mode, folder,
                 str(ctx.threads), ROOT],
                capture_output=True, text=True, check=False,
            )
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                raise RuntimeError(f"memory child {mode} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
            result = json.loads(line[len("RESULT "):])
            if not mode.startswith("baseline") and not result["finite"]:
                raise RuntimeError(f"{mode}: the forward pass gave NaN/inf logits")
            out["runs"].setdefault(mode, []).append(result)
            status = ", ".join(f"{k} {v:.0f}" for k, v in result["status_mib"].items())
            log(f"memory repeat {r + 1} {mode}: ru_maxrss {result['maxrss_mib']:.0f} MiB ({status} MiB)")
    shutil.rmtree(folder, ignore_errors=True)
    peak = {m: [x["maxrss_mib"] for x in runs] for m, runs in out["runs"].items()}
    base = peak["baseline"]
    out["peak"] = peak
    # ru_maxrss and the kernel's high-water mark of this process image must agree (see the shell above).
    out["maxrss_vs_hwm_mib"] = max(
        abs(x["maxrss_mib"] - x["status_mib"]["VmHWM"]) for runs in out["runs"].values() for x in runs
    )
    libs = {"bf16": peak["baseline_llama"], "nf4": peak["baseline_library"], "nf4_transformers": peak["baseline_bnb"]}
    out["libs"] = libs
    out["net"] = {m: [p - b for p, b in zip(peak[m], base, strict=True)] for m in LOADS}
    out["net_libs"] = {m: [p - b for p, b in zip(peak[m], libs[m], strict=True)] for m in LOADS}
    for m in ("nf4", "nf4_transformers"):
        out.setdefault("ratio_raw", {})[m] = ratios(peak[m], peak["bf16"])
        out.setdefault("ratio_net", {})[m] = ratios(out["net"][m], out["net"]["bf16"])
        out.setdefault("ratio_net_libs", {})[m] = ratios(out["net_libs"][m], out["net_libs"]["bf16"])
    return out


def report_memory(ctx: Context, res: dict[str, Any]) -> str:
    peak, net, net_libs, runs = res["peak"], res["net"], res["net_libs"], res["runs"]
    fp = {m: runs[m][0]["footprint_mib"] for m in LOADS}
    secs = {m: [x["seconds"] for x in runs[m]] for m in LOADS}
    rss = {(m, k): [x["status_mib"][k] for x in runs[m]] for m in LOADS for k in ("RssAnon", "RssFile")}
    cfg = ", ".join(f"{k}={v}" for k, v in res["config"].items())

    def verdict(values: list[float]) -> str:
        med = statistics.median(values)
        return f"{med:.2f}x, {'meets' if med <= 0.45 else 'misses'} it"

    def row(label: str, values: dict[str, list[float]], ratio: dict[str, list[float]] | None = None) -> str:
        cells = [stat(values[m]) for m in LOADS]
        cells += [stat(ratio[m], suffix="x") for m in ("nf4", "nf4_transformers")] if ratio else ["", ""]
        return f"| {label} | " + " | ".join(cells) + " |"

    floor = 0.45 * statistics.median(peak["bf16"])
    return "\n".join([
        "## 3. Peak memory: NF4 vs bf16",
        "",
        f"A Llama with random weights, {res['params'] / 1e9:.2f}B parameters (`LlamaConfig({cfg})`), saved once as "
        "bf16 safetensors shards, then loaded in a fresh subprocess, followed by one forward pass on 8 tokens. "
        "**NF4 (library)**: `vlm_adapters.llm.load_llm`, what `attach(quantization=\"nf4\")` runs (NF4, double "
        "quantization, bf16 compute). **NF4 (transformers)**: `AutoModelForCausalLM.from_pretrained(dir, "
        "quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=\"nf4\", "
        "bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16), device_map={\"\": \"cpu\"})`. "
        "**bf16**: the same call with `dtype=torch.bfloat16`. Peak = `ru_maxrss` of that process. "
        "Baseline = a subprocess that only imports torch and transformers; the baselines with libraries also import "
        "what each load imports before reading a weight (Llama modeling; + bitsandbytes; + vlm_adapters, with PEFT). "
        "Embeddings and the LM head stay bf16 in every load (bitsandbytes quantizes only the linear layers of the "
        "blocks).",
        "",
        "| | bf16 | NF4 (library) | NF4 (transformers) | library / bf16 | transformers / bf16 |",
        "|---|---|---|---|---|---|",
        row("peak RSS MiB, median (min-max)", peak, res["ratio_raw"]),
        row("peak RSS minus the import baseline "
            f"({stat(peak['baseline'])} MiB)", net, res["ratio_net"]),
        row("baseline with the libraries each load imports, MiB", res["libs"]),
        row("peak RSS minus that baseline (the weights and the load itself), MiB", net_libs, res["ratio_net_libs"]),
        "| `get_memory_footprint()` MiB | " + " | ".join(num(fp[m]) for m in LOADS)
        + f" | {fp['nf4'] / fp['bf16']:.2f}x | {fp['nf4_transformers'] / fp['bf16']:.2f}x |",
        row("load + forward, s", secs),
        row("at the end: anonymous memory (`RssAnon`), MiB", {m: rss[m, "RssAnon"] for m in LOADS}),
        row("at the end: file-backed pages (`RssFile`: libraries and any mapped checkpoint), MiB",
            {m: rss[m, "RssFile"] for m in LOADS}),
        "",
        "transformers maps the safetensors checkpoint into memory. A bf16 model's weights are those mapped pages. "
        "Quantizing on load reads every page of the same bf16 file, and mapped pages count in the process's RSS "
        "until the load ends, so transformers' NF4 load holds the whole bf16 file and the quantized copy at once. "
        "The library hands transformers the same tensors, each mapped on its own and unmapped once quantized "
        "(`_load_quantized_unmapped` in `vlm_adapters/llm.py`): one full-precision tensor is resident at a "
        "time, and the weights it loads are identical (tested). Before each tensor it hands the heap's free pages "
        "back to the OS (glibc `malloc_trim`): the quantization temporaries of one tensor were otherwise left "
        "resident between the small quantized blocks. And it turns off bitsandbytes' CPU repacking of 4-bit "
        "weights (which the library never uses: it has no autograd), so the forward pass does not allocate a "
        "second, repacked copy of every weight.",
        "",
        f"Target NF4 <= 0.45x bf16 (library): raw peaks {verdict(res['ratio_raw']['nf4'])}; peaks minus the import "
        f"baseline {verdict(res['ratio_net']['nf4'])}; minus the baselines with libraries "
        f"{verdict(res['ratio_net_libs']['nf4'])}. "
        + (f"A raw 0.45x would be {floor:,.0f} MiB, less than the library's import baseline "
           f"({num(statistics.median(peak['baseline_library']))} MiB) plus the quantized model's own footprint "
           f"({num(fp['nf4'])} MiB). " if floor < statistics.median(peak["baseline_library"]) + fp["nf4"] else "")
        + "`ru_maxrss` agreed with the "
        f"kernel's `VmHWM` of the same process within {num(res['maxrss_vs_hwm_mib'])} MiB in every run (each child "
        "is forked by a small shell: Linux carries `ru_maxrss` across `execve`, so a child exec'd directly from the "
        "benchmark process would report the benchmark's own, larger peak).",
    ])


# ------------------------------------------------------------------------------------------------
# 4. scaling with image tokens and classes
# ------------------------------------------------------------------------------------------------


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
        timing = time_classifiers(ctx, model, ctx.test_images[: s.scaling_classify_images], names)
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


# ------------------------------------------------------------------------------------------------
# 5. share of the machine's matmul peak
# ------------------------------------------------------------------------------------------------


def matmul_gflops(n: int, dtype: torch.dtype, reps: int) -> list[float]:
    gen = torch.Generator().manual_seed(SEED)
    a = torch.randn(n, n, generator=gen).to(dtype)
    b = torch.randn(n, n, generator=gen).to(dtype)
    torch.mm(a, b)  # warm-up
    values = []
    for _ in range(reps):
        with stopwatch() as t:
            torch.mm(a, b)
        values.append(2 * n**3 / t[0] / 1e9)
    return values


def linear_params(llm: nn.Module) -> tuple[int, int, int]:
    """(non-embedding linear weights incl. LoRA, hidden size, vocabulary size) of the LLM."""
    total = 0
    for name, module in llm.named_modules():
        if isinstance(module, nn.Linear) and "lm_head" not in name:
            total += module.in_features * module.out_features  # Linear4bit packs weights; count logical size
    head = llm.get_output_embeddings()
    return total, head.in_features, head.out_features


def step_flops(ctx: Context, model: VisionLanguageModel, data: Any) -> dict[str, float]:
    """FLOPs of one training sample: 6 * N * tokens (as trained: each batch packed, its shared head
    once, no padding) plus the LM head at the supervised positions only (2*d*V forward + 2*d*V for
    the input gradient)."""
    n_linear, d, vocab = linear_params(model.base_llm)
    collator = VLMCollator(model, ctx.names)
    tokens = kept = 0
    bs = ctx.sizes.batch_size
    for start in range(0, len(data), bs):  # dataset order; training shuffles, so this is an estimate
        batch = collator([data[i] for i in range(start, min(start + bs, len(data)))])
        tokens += len(PackedBatch.build(batch["input_ids"], batch["attention_mask"], batch["labels"]).input_ids)
        kept += int((batch["labels"] != IGNORE_INDEX).sum())
    per_sample_tokens, per_sample_kept = tokens / len(data), kept / len(data)
    body = 6 * n_linear * per_sample_tokens
    head = 4 * d * vocab * per_sample_kept
    # Frozen NF4 weights get no weight gradient: forward (2N) + input gradient (2N) only, plus LoRA's own.
    n_lora = sum(p.numel() for p in model.llm.parameters() if p.requires_grad)
    frozen_body = 4 * n_linear * per_sample_tokens + 2 * n_lora * per_sample_tokens
    return {"n_linear": n_linear, "tokens": per_sample_tokens, "kept": per_sample_kept, "body": body, "head": head,
            "total": body + head, "computed": frozen_body + head}


def bench_peak(ctx: Context) -> dict[str, Any]:
    s = ctx.sizes
    log(f"peak: {s.matmul_size}x{s.matmul_size} matmuls")
    out: dict[str, Any] = {
        "bf16": matmul_gflops(s.matmul_size, torch.bfloat16, s.matmul_reps),
        "fp32": matmul_gflops(s.matmul_size, torch.float32, s.matmul_reps),
    }
    log(f"peak: bf16 {statistics.median(out['bf16']):.1f} GFLOP/s, fp32 {statistics.median(out['fp32']):.1f} GFLOP/s")
    train_f = ctx.features("train")
    scaling = ctx.results.get("scaling", {}).get("tokens", {}).get(s.num_image_tokens)
    if scaling is not None:
        per_sample, source = scaling["per_sample"], "the section-4 timing"
    else:
        per_sample = time_train_steps(ctx, s.num_image_tokens, ctx.features("scaling"))
        source = "a timing made here the way section 4 makes it"
    out.update(per_sample=per_sample, source=source)
    model = ctx.model(s.num_image_tokens)
    flops = step_flops(ctx, model, train_f)
    out["flops"] = flops
    out["compute_dtype"] = model.config.compute_dtype
    out["achieved"] = [flops["total"] / t / 1e9 for t in per_sample]
    # Matmul peaks and step times come from different repeats; the share uses the medians.
    out["share_bf16"] = [a / statistics.median(out["bf16"]) for a in out["achieved"]]
    out["share_fp32"] = [a / statistics.median(out["fp32"]) for a in out["achieved"]]
    out["achieved_4n"] = [flops["computed"] / t / 1e9 for t in per_sample]
    out["share_bf16_4n"] = [a / statistics.median(out["bf16"]) for a in out["achieved_4n"]]
    out["share_fp32_4n"] = [a / statistics.median(out["fp32"]) for a in out["achieved_4n"]]
    return out


def report_peak(ctx: Context, res: dict[str, Any]) -> str:
    s, f = ctx.sizes, res["flops"]
    return "\n".join([
        "## 5. Share of the machine's matmul peak",
        "",
        f"Peak: `torch.mm` of two {s.matmul_size}x{s.matmul_size} matrices, {s.matmul_reps} timed repetitions after a "
        f"warm-up, {ctx.threads} thread(s). Library training step: {s.batch_size} samples, time per sample from "
        f"{res['source']} ({s.num_image_tokens} image tokens). FLOPs per sample = 6 x {f['n_linear'] / 1e6:.1f}M "
        f"non-embedding linear weights (blocks + LoRA) x {f['tokens']:.1f} tokens (each batch packed: its shared "
        "head once, no padding) "
        f"+ the LM head at the {f['kept']:.2f} supervised positions only (4 x d x V: forward and input gradient) = "
        f"{f['total'] / 1e9:.1f} GFLOP, {f['total'] * s.batch_size / 1e12:.2f} TFLOP per step of {s.batch_size} "
        f"({f['head'] / f['total']:.1%} in the head). The 6N rule counts weight "
        "gradients the frozen NF4 weights never get, so it overstates the work; the second row counts what is "
        f"computed (4N x tokens + LoRA's weight gradients + the head = {f['computed'] / 1e9:.1f} GFLOP per sample, "
        "NF4 dequantization and attention not counted). The LLM computed in "
        f"{res['compute_dtype']} (`compute_dtype=\"auto\"` times a bf16 and an fp32 matmul at attach and takes bf16 "
        "only when it is clearly faster; NF4 weights are dequantized to it), so the "
        f"{'bf16' if res['compute_dtype'] == 'bfloat16' else 'fp32'} peak is the relevant ceiling; LoRA, norms and "
        "the head stay float32.",
        "",
        "| | GFLOP/s, median (min-max) | share of bf16 peak | share of fp32 peak |",
        "|---|---|---|---|",
        f"| bf16 matmul | {stat(res['bf16'])} | | |",
        f"| fp32 matmul | {stat(res['fp32'])} | | |",
        f"| library training step, 6N count (as specified) | {stat(res['achieved'])} | "
        f"{stat(res['share_bf16'], 100, '%')} | "
        f"{stat(res['share_fp32'], 100, '%')} |",
        f"| library training step, frozen-weight count | {stat(res['achieved_4n'])} | "
        f"{stat(res['share_bf16_4n'], 100, '%')} | {stat(res['share_fp32_4n'], 100, '%')} |",
        *(
            ["", "A share above 100% means the matmul peak was measured low (other load on the machine during those "
             "few seconds) or the FLOP count overstates the work; compare the rows rather than trust it."]
            if max(res["share_fp32"]) > 1 else []
        ),
    ])


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------

def machine(threads: int) -> str:
    import bitsandbytes
    import peft
    import transformers

    with open("/proc/cpuinfo") as fh:
        cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), "?")
    return (
        f"{cpu}, {os.cpu_count()} cores, {threads} torch thread(s), Python {platform.python_version()}, "
        f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
        f"bitsandbytes {bitsandbytes.__version__}"
    )


def render(ctx: Context, command: str, ran: list[str], plot: str | None, seconds: float) -> str:
    s = ctx.sizes
    parts = ["# Benchmarks", ""]
    if ctx.quick:
        parts += [
            "> **Quick smoke configuration (`--quick`)**: tiny sizes that only check the script runs end to end. "
            "These numbers are not benchmark results; run the default configuration on a quiet machine for those.",
            "",
        ]
    parts += [
        "vlm_adapters against the standard transformers recipe (`benchmarks/reference.py`) on the demo parts: "
        f"EfficientNet-Lite0 (frozen) -> MLP projector -> SmolLM2-135M-Instruct in NF4 with LoRA r{s.lora_r}, "
        f"{s.num_image_tokens} image tokens, system prompt \"{SYSTEM_PROMPT}\", on Fashion-MNIST, all on the CPU. "
        f"Every timing is the median over {ctx.repeats} repeat(s) with min-max in brackets; every ratio is taken "
        "per repeat between runs made back to back in the same process, then summarised the same way.",
        "",
        f"- command: `{command}`",
        f"- date: {datetime.datetime.now().isoformat(timespec='minutes')}",
        f"- machine: {machine(ctx.threads)}",
        f"- sections: {', '.join(ran)}; total wall time {seconds / 60:.1f} min",
        f"- sizes: `{json.dumps(asdict(s))}`",
        "",
    ]
    reports = {
        "training": lambda r: report_training(ctx, r),
        "classify": lambda r: report_classify(ctx, r),
        "memory": lambda r: report_memory(ctx, r),
        "scaling": lambda r: report_scaling(ctx, r, plot),
        "peak": lambda r: report_peak(ctx, r),
    }
    for name in SECTIONS:
        if name in ctx.results:
            parts += [reports[name](ctx.results[name]), ""]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny smoke configuration (minutes)")
    parser.add_argument("--repeats", type=int, default=None, help="repeats per timing (default 3; 1 with --quick)")
    parser.add_argument("--output", default="docs/benchmarks.md", help="markdown report; the plot goes beside it")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--train-per-class", type=int, default=None)
    parser.add_argument("--test-per-class", type=int, default=None)
    args = parser.parse_args(argv)

    ran = [x.strip() for x in args.only.split(",") if x.strip()]
    unknown = sorted(set(ran) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    ran = [x for x in SECTIONS if x in ran]
    sizes = QUICK if args.quick else Sizes()
    given = {"train_per_class": args.train_per_class, "test_per_class": args.test_per_class}
    overrides = {k: v for k, v in given.items() if v}
    sizes = replace(sizes, **overrides)
    repeats = args.repeats or (1 if args.quick else 3)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    torch.manual_seed(SEED)
    import datasets

    datasets.disable_progress_bars()

    start = time.perf_counter()
    ctx = Context(sizes, repeats, threads, args.quick)
    try:
        benches = {
            "training": bench_training, "classify": bench_classify, "memory": bench_memory,
            "scaling": bench_scaling, "peak": bench_peak,
        }
        for name in ran:
            log(f"=== section {name} ===")
            with stopwatch() as t:
                ctx.results[name] = benches[name](ctx)
            log(f"=== section {name} done in {t[0]:.0f} s ===")
        output = args.output
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        plot = None
        if "scaling" in ctx.results:
            plot = plot_scaling(ctx.results["scaling"], os.path.splitext(output)[0] + "_scaling.png")
        command = shlex.join([".venv/bin/python", "benchmarks/run.py", *(sys.argv[1:] if argv is None else argv)])
        text = render(ctx, command, ran, plot, time.perf_counter() - start)
    finally:
        ctx.close()
    print("\n" + text)
    with open(output, "w", encoding="utf-8") as fh:
        fh.write(text)
    print(f"written to {output}" + (f" and {plot}" if plot else ""))


if __name__ == "__main__":
    main()
