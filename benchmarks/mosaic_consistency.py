"""Where the mosaic questions fail: from a `vlm-adapters demo mosaic` report (trained with the cells named
before the answer: `answer_style` "listed" or "worked"), compare each generated answer with the answer its
own named cells imply.

    python benchmarks/mosaic_consistency.py [runs/mosaic/report.json]

Per question type: the answer is right; the answer the listed cells imply is right; the answer agrees
with the listed cells. High second and low third column: the model sees the cells but does not read
its answer off its own list.
"""

from __future__ import annotations

import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vlm_adapters.demo.mosaic_data import (  # noqa: E402
    POSITIONS,
    SHOES,
    build_mosaics,
    match_class,
    parse_answer,
    parse_caption,
    task_rows,
)


def implied(row: dict, cells: list) -> str | None:
    """The answer to a question row that the listed `cells` imply."""
    kind, prompt = row["question_type"], row["prompt"]
    if kind == "what":
        return cells[next(i for i, p in enumerate(POSITIONS) if p in prompt.lower())]
    if kind == "count":
        return str(sum(c in SHOES for c in cells))
    name = match_class(prompt.split(" the " if kind == "where" else " there ", 1)[1])
    if kind == "yes_no":
        return "yes" if name in cells else "no"
    return POSITIONS[cells.index(name)] if name in cells else None


def main(path: str = "runs/mosaic/report.json") -> None:
    report = json.load(open(path, encoding="utf-8"))
    opts, answers = report["options"], report["figures"]["trained"]["answers"]
    test = build_mosaics("test", opts["test_mosaics"], opts["seed"])
    rows = [r for r in task_rows(test, opts["test_questions_per_mosaic"], opts["seed"] + 1)
            if r["question_type"] != "caption"]
    counts: dict[str, list[int]] = {}
    for row, text in zip(rows, answers, strict=True):
        cells = parse_caption(text.split("Answer:")[0])
        given, derived = parse_answer(row["question_type"], text), implied(row, cells)
        c = counts.setdefault(row["question_type"], [0, 0, 0, 0])
        c[0] += 1
        c[1] += given == row["truth"]
        c[2] += derived == row["truth"]
        c[3] += given == derived
    print("| type | n | answer right | implied by its listed cells, right | answer agrees with its cells |")
    print("|---|---|---|---|---|")
    for kind, (n, *hits) in counts.items():
        rates = [f"{100 * h / n:.1f} ± {100 * math.sqrt(h / n * (1 - h / n) / n):.1f}" for h in hits]
        print(f"| {kind} | {n} | " + " | ".join(rates) + " |")


if __name__ == "__main__":
    main(*sys.argv[1:])
