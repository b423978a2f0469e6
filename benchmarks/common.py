"""What the benchmark sections share: sizes, label sets, timing and formatting helpers."""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
    test_per_class: int = 50  # 500 test images: accuracy differences within one standard error
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


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)

