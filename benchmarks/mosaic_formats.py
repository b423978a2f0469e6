"""Runs 6-8 of benchmarks/mosaic_experiments.md: one format of the mosaic question targets, trained and scored.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/mosaic_formats.py worked [--questions 4] [--epochs 1]

Formats: the `answer_style`s of `task_rows` ("short", "listed", "worked") and "focus" (tried here only: what the
question points at, then the answer). 500 train mosaics (the first half of a seeded 1,000-mosaic draw), the
demo mosaic's model and options otherwise; test: 100 t10k mosaics x 4 questions, captions on the same 100.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vlm_adapters.demo import mosaic as M  # noqa: E402
from vlm_adapters.demo import mosaic_data as D  # noqa: E402
from vlm_adapters.demo.assets import efficientnet_lite0, smollm2_instruct  # noqa: E402


def focus(kind: str, question: str, short: str, cells: list[str]) -> str:
    """What the question points at (its cell, its class's positions, the shoes), then the answer."""
    if kind == "what":
        return D.worked_answer(kind, question, short, cells)
    if kind == "count":
        shoes = [f"{p} {c}" for p, c in zip(D.POSITIONS, cells) if c in D.SHOES]
        return f"shoes: {', '.join(shoes) or 'none'}. Answer: {short}"
    subject = D.match_class(question)
    at = [p for p, c in zip(D.POSITIONS, cells) if c == subject]
    return f"{subject.lower()}: {', '.join(at) or 'none'}. Answer: {short}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("format", choices=[*D.ANSWER_STYLES, "focus"])
    parser.add_argument("--questions", type=int, default=4)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--train_mosaics", type=int, default=500)
    parser.add_argument("--output", default="runs/mosaic_formats")
    args = parser.parse_args()
    opts = M.MosaicOptions(test_mosaics=100, num_train_epochs=args.epochs)
    encoder, processor = efficientnet_lite0(image_size=opts.image_size)
    model = M.attach_demo_model(opts, encoder, processor, smollm2_instruct())
    train = D.build_mosaics("train", 2 * args.train_mosaics, opts.seed).select(range(args.train_mosaics))
    test = D.build_mosaics("test", opts.test_mosaics, opts.seed)
    train_maps, test_maps = M.encode(model, train["image"]), M.encode(model, test["image"])
    style = "short" if args.format == "focus" else args.format
    rows = D.task_rows(train, args.questions, opts.seed, answer_style=style)
    if args.format == "focus":
        for row in (r for r in rows if r["question_type"] != "caption"):
            row["answer"] = focus(row["question_type"], row["prompt"], row["truth"], row["cells"])
    start = time.process_time()
    model.fit(M.feature_rows(rows, M.pool_tokens(train_maps, opts.num_image_tokens)),
              **M.train_args(opts, os.path.join(args.output, args.format)))
    fit_cpu_s = time.process_time() - start
    questions = [r for r in D.task_rows(test, 4, opts.seed + 1) if r["question_type"] != "caption"]
    scored = M.score(model, M.pool_tokens(test_maps, opts.num_image_tokens), test["cells"], questions, opts,
                     reasons=args.format != "short")
    result = {"format": args.format, "rows": len(rows), "fit_cpu_s": fit_cpu_s, "caption": scored["caption"],
              "questions": scored["questions"]}
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, f"{args.format}.json"), "w", encoding="utf-8") as fh:
        json.dump(result | {"answers": scored["answers"]}, fh, indent=1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
