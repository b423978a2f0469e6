"""Fashion-MNIST mosaics: a compositional captioning and question-answering task from real images.

Each image is a 2x2 grid of four real Fashion-MNIST items (train items for training, t10k items for
testing), built reproducibly from a seed, so nothing is downloaded. The targets are a caption naming
every cell ("top left: Sneaker; top right: Bag; bottom left: Shirt; bottom right: Trouser") and
questions with short answers (what is in a cell, is there a class, how many shoes, where is a class).
Generated text is parsed back into classes, so a caption is scored per cell, not only as a string.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .assets import FASHION_MNIST_LABELS, fashion_mnist

if TYPE_CHECKING:
    import datasets

POSITIONS = ("top left", "top right", "bottom left", "bottom right")
SHOES = ("Sandal", "Sneaker", "Ankle boot")
QUESTION_TYPES = ("what", "yes_no", "count", "where")
CAPTION_PROMPT = "Describe this image."
_POSITION_RE = re.compile(r"\b(top|upper|bottom|lower)[\s_-]*(left|right)\b")
_NUMBERS = {"zero": 0, "no": 0, "none": 0, "one": 1, "two": 2, "three": 3, "four": 4}
# Normalised spellings (lower case, letters only) -> class; searched longest first.
_ALIASES = {re.sub(r"[^a-z]", "", name.lower()): name for name in FASHION_MNIST_LABELS} | {
    "tshirt": "T-shirt/top", "boot": "Ankle boot", "trousers": "Trouser", "sneakers": "Sneaker",
}


def caption(cells: Sequence[str]) -> str:
    """The caption of a mosaic: every cell named, in reading order."""
    return "; ".join(f"{position}: {name}" for position, name in zip(POSITIONS, cells, strict=True))


def build_mosaics(split: str, count: int, seed: int = 0) -> datasets.Dataset:
    """`count` mosaics (56x56 grayscale `image`, `cells` = four class names in reading order) from a
    balanced draw of Fashion-MNIST `split` items; each item is used once. Same seed, same mosaics."""
    import datasets

    source = fashion_mnist(split, per_class=math.ceil(4 * count / len(FASHION_MNIST_LABELS)), seed=seed)
    order = np.random.default_rng(seed).permutation(len(source))[: 4 * count].reshape(count, 4)
    pixels = np.stack([np.asarray(image) for image in source["image"]])
    labels = np.asarray(source["label"])
    grids = pixels[order].reshape(count, 2, 2, 28, 28).transpose(0, 1, 3, 2, 4).reshape(count, 56, 56)
    features = datasets.Features({"image": datasets.Image(), "cells": datasets.Sequence(datasets.Value("string"))})
    return datasets.Dataset.from_dict(
        {"image": list(grids), "cells": [[FASHION_MNIST_LABELS[i] for i in row] for row in labels[order]]},
        features=features,
    )


def _lower(name: str) -> str:
    return name.lower()


def ask(kind: str, cells: Sequence[str], rng: np.random.Generator) -> tuple[str, str, str]:
    """(type, question, short answer) about a mosaic. Yes/no questions ask about a present class half
    of the time; "where" asks about a class present exactly once (a "what" question when none is)."""
    if kind == "what":
        cell = int(rng.integers(4))
        return kind, f"What is in the {POSITIONS[cell]}?", cells[cell]
    if kind == "yes_no":
        present = rng.random() < 0.5
        pool = sorted(set(cells)) if present else [c for c in FASHION_MNIST_LABELS if c not in cells]
        name = pool[int(rng.integers(len(pool)))]
        article = "an" if name[0].lower() in "aeiou" else "a"
        return kind, f"Is there {article} {_lower(name)}?", "yes" if present else "no"
    if kind == "count":
        return kind, "How many shoes are there?", str(sum(c in SHOES for c in cells))
    if kind == "where":
        once = [c for c in cells if list(cells).count(c) == 1]
        if not once:
            return ask("what", cells, rng)
        name = once[int(rng.integers(len(once)))]
        return kind, f"Where is the {_lower(name)}?", POSITIONS[list(cells).index(name)]
    raise ValueError(f"unknown question type {kind!r}; use one of {QUESTION_TYPES}.")


def worked_answer(kind: str, question: str, short: str, cells: Sequence[str]) -> str:
    """The answer with its reasoning, cell by cell, before "Answer:". A 135M LLM fine-tuned on short
    answers learns their prior, not the lookup (benchmarks/mosaic_experiments.md); here every step is
    local: name the cell the question points at, or walk the cells in reading order carrying a running
    value (found yet / shoes so far / where found), so the answer copies the last value."""
    if kind == "what":
        position = _POSITION_RE.search(question.lower())[0]
        return f"{position}: {cells[POSITIONS.index(position)]}. Answer: {short}"
    subject = match_class(question) if kind != "count" else None
    value: str | int = {"yes_no": "no", "count": 0, "where": "none"}[kind]
    steps = []
    for position, name in zip(POSITIONS, cells, strict=True):
        if kind == "count":
            value = int(value) + (name in SHOES)
        elif name == subject:
            value = "yes" if kind == "yes_no" else position
        steps.append(f"{position}: {name}, {value}")
    return f"{'; '.join(steps)}. Answer: {short}"


ANSWER_STYLES = {
    "short": lambda kind, question, short, cells: short,
    "listed": lambda kind, question, short, cells: f"{caption(cells)}. Answer: {short}",
    "worked": worked_answer,
}


def task_rows(
    mosaics: datasets.Dataset,
    questions: int,
    seed: int = 0,
    caption_prompt: str = CAPTION_PROMPT,
    answer_style: str = "short",
) -> list[dict[str, Any]]:
    """Free-text rows (`mosaic` index, `prompt`, `answer` to train on, short `truth`, `question_type`,
    `cells`): per mosaic one caption and `questions` questions, their types cycling through
    QUESTION_TYPES from a seeded start. `answer_style`: "short" (the answer alone), "listed" (every
    cell named, then "Answer: ..."), "worked" (`worked_answer`)."""
    if answer_style not in ANSWER_STYLES:
        raise ValueError(f"unknown answer_style {answer_style!r}; use one of {sorted(ANSWER_STYLES)}.")
    rng = np.random.default_rng(seed)
    rows = []
    for index, cells in enumerate(mosaics["cells"]):
        text = caption(cells)
        rows.append(
            dict(mosaic=index, prompt=caption_prompt, answer=text, truth=text, question_type="caption", cells=cells)
        )
        start = int(rng.integers(len(QUESTION_TYPES)))
        for k in range(questions):
            kind, prompt, short = ask(QUESTION_TYPES[(start + k) % len(QUESTION_TYPES)], cells, rng)
            answer = ANSWER_STYLES[answer_style](kind, prompt, short, cells)
            rows.append(dict(mosaic=index, prompt=prompt, answer=answer, truth=short, question_type=kind, cells=cells))
    return rows


def match_class(text: str) -> str | None:
    """The class a piece of generated text names (case, spacing, plurals forgiven); the earliest wins."""
    norm = re.sub(r"[^a-z]", "", text.lower())
    hits = [(norm.find(alias), -len(alias), name) for alias, name in _ALIASES.items() if alias in norm]
    return min(hits)[2] if hits else None


def parse_caption(text: str) -> list[str | None]:
    """Four classes in reading order from a generated caption, whatever the order, case or separators of
    its parts; a position named twice keeps its first mention; a missing one is None."""
    found: dict[str, str | None] = {}
    marks = list(_POSITION_RE.finditer(text.lower()))
    for mark, following in zip(marks, [*marks[1:], None]):
        position = f"{'top' if mark[1] in ('top', 'upper') else 'bottom'} {mark[2]}"
        segment = text[mark.end() : following.start() if following else len(text)]
        found.setdefault(position, match_class(segment))
    return [found.get(position) for position in POSITIONS]


def parse_answer(kind: str, text: str) -> str | None:
    """A generated answer in the form of the truth for its question type (None when unreadable); only
    the text after the last "Answer:" counts when there is one."""
    text = re.split(r"answer\s*:", text, flags=re.IGNORECASE)[-1]
    lower = text.lower()
    if kind in ("what", "caption"):
        return match_class(text)
    if kind == "yes_no":
        word = re.match(r"\W*(yes|no)\b", lower)
        return word[1] if word else None
    if kind == "count":
        number = re.search(r"\d+|\b(zero|none|no|one|two|three|four)\b", lower)
        return None if number is None else str(_NUMBERS.get(number[0], number[0]))
    if kind == "where":
        mark = _POSITION_RE.search(lower)
        return None if mark is None else f"{'top' if mark[1] in ('top', 'upper') else 'bottom'} {mark[2]}"
    raise ValueError(f"unknown question type {kind!r}.")


def _rate(hits: Sequence[bool]) -> dict[str, float]:
    """Share of hits with its standard error (binomial) and the sample size."""
    n = len(hits)
    p = float(np.mean(hits)) if n else float("nan")
    return {"accuracy": p, "stderr": math.sqrt(p * (1 - p) / n) if n else float("nan"), "n": n}


def caption_metrics(cells: Sequence[Sequence[str]], texts: Sequence[str]) -> dict[str, Any]:
    """Per-cell accuracy of the parsed captions, all four cells right, exact string match, BLEU, ROUGE-L."""
    from ..metrics import text_metrics

    parsed = [parse_caption(text) for text in texts]
    per_cell = [p == t for truth, guess in zip(cells, parsed, strict=True) for t, p in zip(truth, guess)]
    whole = [list(guess) == list(truth) for truth, guess in zip(cells, parsed)]
    text = text_metrics([caption(c) for c in cells], list(texts))
    return {"per_cell": _rate(per_cell), "all_cells": _rate(whole), **text}


def question_metrics(rows: Sequence[dict[str, Any]], texts: Sequence[str]) -> dict[str, dict[str, float]]:
    """Accuracy per question type: a generated answer counts when it parses to the truth."""
    hits: dict[str, list[bool]] = {}
    for row, text in zip(rows, texts, strict=True):
        hits.setdefault(row["question_type"], []).append(parse_answer(row["question_type"], text) == row["truth"])
    return {kind: _rate(values) for kind, values in hits.items()}
