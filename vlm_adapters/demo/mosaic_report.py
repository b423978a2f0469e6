"""The mosaic task's report: the markdown table, examples beside the truth, a PNG of captioned mosaics,
and the section of docs/results.md they go to."""

from __future__ import annotations

import os
import platform
import shutil
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..files import write_file_atomically
from .mosaic_data import QUESTION_TYPES

SECTION_START = "<!-- mosaic: written by `vlm-adapters demo mosaic` -->"
SECTION_END = "<!-- /mosaic -->"
PNG_NAME = "mosaic_captions.png"


def examples(cells: list, questions: list[dict], scored: dict, count: int = 4) -> dict[str, list]:
    """A few generated captions and two answers per question type, beside the truth."""
    captions = [{"truth": " / ".join(c), "generated": t} for c, t in zip(cells[:count], scored["captions"])]
    seen: dict[str, int] = {}
    answers = []
    for row, text in zip((q for q in questions if q["mosaic"] < len(cells)), scored["answers"]):
        if seen.get(row["question_type"], 0) < 2:
            seen[row["question_type"]] = seen.get(row["question_type"], 0) + 1
            answers.append(dict(mosaic=row["mosaic"], question=row["prompt"], truth=row["truth"], generated=text))
    return {"captions": captions, "answers": answers}


def plot_mosaics(mosaics: Any, captions: Sequence[str], path: str, count: int = 6) -> str:
    """Test mosaics with their generated captions, one line per part of the caption."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = min(count, len(captions))
    fig, axes = plt.subplots(1, count, figsize=(2.6 * count, 3.6), squeeze=False)
    for ax, image, text in zip(axes[0], mosaics["image"][:count], captions):
        ax.imshow(np.asarray(image), cmap="gray")
        ax.set_axis_off()
        ax.set_title(text.replace("; ", "\n"), fontsize=7, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _rate(rate: dict | None) -> str:
    return "-" if rate is None else f"{100 * rate['accuracy']:.1f} ± {100 * rate['stderr']:.1f} (n {rate['n']})"


def _model_rows(figures: dict) -> list[str]:
    rows = []
    named = (("fine-tuned on mosaics", "trained"), ("classification-only demo model", "classifier"),
             ("zero-shot (before training)", "zero_shot"))
    for name, key in named:
        scored = figures.get(key)
        if scored:
            c, q = scored["caption"], scored["questions"]
            rows.append(
                f"| {name} | {_rate(c['per_cell'])} | {_rate(c['all_cells'])} | {100 * c['exact_match']:.1f} | "
                f"{c['bleu']:.1f} | {100 * c['rougeL']:.1f} | "
                + " | ".join(_rate(q.get(k)) for k in QUESTION_TYPES) + " |"
            )
    rows.append(f"| per-cell linear probe (same features) | {_rate(figures.get('probe'))} |" + " |" * 8)
    return rows


def format_report(report: Any) -> str:
    """The markdown section: the table (% ± one standard error, with n), examples, phase times."""
    f = report.figures
    lines = [
        "| model | caption: cells right | all 4 cells right | exact caption | BLEU | ROUGE-L | "
        + " | ".join(QUESTION_TYPES) + " |",
        "|---|" + "---|" * (5 + len(QUESTION_TYPES)),
        *_model_rows(f),
    ]
    ex = f.get("examples", {})
    lines += ["", "| truth | generated caption |", "|---|---|"]
    lines += [f"| {e['truth']} | {e['generated']} |" for e in ex.get("captions", [])]
    lines += ["", "| test mosaic | question | truth | generated answer |", "|---|---|---|---|"]
    lines += [f"| {e['mosaic']} | {e['question']} | {e['truth']} | {e['generated']} |" for e in ex.get("answers", [])]
    lines += ["", "| phase | seconds |", "|---|---|", *(f"| {k} | {v} |" for k, v in report.phases_s.items())]
    lines.append(f"| total | {sum(report.phases_s.values()):.1f} |")
    if "process_cpu_s" in f:
        lines.append(f"| CPU seconds of the process ({f['torch_threads']} torch threads) | {f['process_cpu_s']} |")
    return "\n".join(lines)


def write_results_section(path: str, table: str, png: str) -> None:
    """Put the table (and the PNG beside the markdown file) into the mosaic section of `path`,
    replacing an earlier one and keeping the rest of the file."""
    target = os.path.join(os.path.dirname(os.path.abspath(path)), PNG_NAME)
    if os.path.abspath(png) != target:
        shutil.copyfile(png, target)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch with {torch.get_num_threads()} threads"
    section = "\n".join([
        SECTION_START, "## Mosaic task (`vlm-adapters demo mosaic`)", "",
        "2x2 mosaics of Fashion-MNIST items (train items for training, t10k items for testing), captioned",
        "and questioned; the captions are parsed back into four classes. Baselines are measured in the same",
        f"run on the first test mosaics. Machine: {machine}.", "", table, "", f"![mosaics and captions]({PNG_NAME})",
        SECTION_END,
    ])
    text = open(path, encoding="utf-8").read() if os.path.exists(path) else ""
    if SECTION_START in text and SECTION_END in text:
        before, rest = text.split(SECTION_START, 1)
        text = before + section + rest.split(SECTION_END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"

    def write(staging: str) -> None:
        with open(staging, "w", encoding="utf-8") as fh:
            fh.write(text)

    write_file_atomically(path, write)  # the rest of results.md is kept, so never leave it half-written
