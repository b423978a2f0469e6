"""Which attribution method should `model.explain` use? The pointing game on a task whose evidence
sits at a known place: a coloured square (label = its colour) at a random position on grey noise,
trained by `fit` on the tiny models of tests/conftest.py. A method scores a hit when the peak of its
heatmap (stretched over the image) lies inside the square; chance is the square's share of the image.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/explain_methods.py --seeds 0,1,2 --test_per_class 50 \
        --docs docs/explain.md --examples docs/explain_squares.png

Candidates: occlusion of image tokens (single tokens or k x k blocks; mean-token or zero baseline;
target the label's log-odds against the other labels or its log-probability among them), gradient x
input on the projected tokens, attention rollout through the LLM, and a random map (the chance
check). `--docs` rewrites the measured section of that page (between its `explain_methods` markers);
`--examples` saves seed 0's explanations of a few held-out images (square outlined) as one PNG.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
sys.path.insert(0, os.path.dirname(__file__))
from conftest import object_dataset, save_llm, save_vision  # noqa: E402 - the tests' tiny models and task
from explain_examples import contact_sheet  # noqa: E402

from vlm_adapters import attach  # noqa: E402
from vlm_adapters.explain import _grid_shape, log_odds, occlusion, seen_box, upsample, windows  # noqa: E402

LABELS = ["red", "green", "blue"]
START, END = "<!-- explain_methods:start -->", "<!-- explain_methods:end -->"


def log_prob(scores: torch.Tensor, index: int) -> torch.Tensor:
    return scores.log_softmax(-1)[:, index]


def occlusion_method(target: Callable, baseline: str = "mean", window: int = 1) -> Callable:
    def run(model, embeds, index, prompt):
        fill = torch.zeros_like(embeds[:, :1]) if baseline == "zero" else None
        masks = windows(_grid_shape(embeds.shape[1], 1, 1), window)
        with model.reuse_prompt_cache():
            return occlusion(embeds, lambda b: target(model.label_log_likelihoods(b, LABELS, prompt), index),
                             masks, 64, fill)

    return run


def gradient_method(baseline: str) -> Callable:
    def run(model, embeds, index, prompt):
        embeds = embeds.detach().requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(log_odds(model.label_log_likelihoods(embeds, LABELS, prompt), index), embeds)
        reference = embeds.mean(1, keepdim=True) if baseline == "mean" else 0.0
        return (grad * (embeds - reference)).sum(-1)[0].detach()

    return run


@torch.no_grad()
def attention_rollout(model, embeds, index, prompt):
    """Abnar & Zuidema (2020): head-averaged attention + identity, multiplied over the LLM's layers,
    read at the position that predicts the label's first token, over the image tokens."""
    from vlm_adapters.prompting import IMAGE_TOKEN_ID

    ids = torch.tensor([model.prompts.encode(prompt).input_ids])
    model.base_llm.set_attn_implementation("eager")  # sdpa returns no attention weights
    try:
        out = model.base_llm(inputs_embeds=model.embed(ids, embeds), output_attentions=True)
    finally:
        model.base_llm.set_attn_implementation("sdpa")
    rollout = torch.eye(ids.shape[1])
    for layer in out.attentions:
        attention = 0.5 * layer[0].float().mean(0) + 0.5 * torch.eye(ids.shape[1])
        rollout = (attention / attention.sum(-1, keepdim=True)) @ rollout
    return rollout[-1, ids[0] == IMAGE_TOKEN_ID]


def random_map(model, embeds, index, prompt):
    return torch.rand(embeds.shape[1])


METHODS = {
    "occlusion, single tokens, mean token, log-odds": occlusion_method(log_odds),
    "occlusion, single tokens, mean token, log p(label \\| labels)": occlusion_method(log_prob),
    "occlusion, single tokens, zero token, log-odds": occlusion_method(log_odds, "zero"),
    "**occlusion, 2x2 blocks, mean token, log-odds** (`explain`)": occlusion_method(log_odds, window=2),
    "occlusion, 2x2 blocks, mean token, log p(label \\| labels)": occlusion_method(log_prob, window=2),
    "occlusion, 3x3 blocks, mean token, log-odds": occlusion_method(log_odds, window=3),
    "gradient x input, log-odds": gradient_method("zero"),
    "gradient x (input - mean token), log-odds": gradient_method("mean"),
    "attention rollout": attention_rollout,
    "random map (chance check)": random_map,
}


def train(seed: int, args, root: str):
    train_ds, _ = object_dataset(args.train_per_class, seed=100 + seed, size=args.size, side=args.side)
    model = attach(args.vit, args.llm, adapter=args.adapter, seed=seed, num_image_tokens=args.num_image_tokens,
                   vision_feature_layer=args.feature_layer)
    model.fit(train_ds, output_dir=os.path.join(root, f"run{seed}"), num_train_epochs=args.epochs,
              learning_rate=5e-3, projector_lr=5e-3, disable_tqdm=True, save_strategy="no", seed=seed,
              logging_steps=1000)
    return model


def score_seed(model, args, seed: int, hits: dict, costs: dict) -> float:
    test_ds, boxes = object_dataset(args.test_per_class, seed=200 + seed, size=args.size, side=args.side)
    prompt = model.config.classify_prompt
    correct = 0
    model.eval()  # dropout off; explain's own calls do the same
    for row, box in zip(test_ds, boxes):
        image = row["image"].convert("RGB")
        with torch.no_grad():
            pixels = model.vision.preprocess([image])
            embeds = model.image_embeddings(image_features=model.vision(pixels))
            correct += int(model.label_log_likelihoods(embeds, LABELS, prompt)[0].argmax()) == row["label"]
        index = row["label"]  # the pointing game explains the true label
        for name, method in METHODS.items():
            start = time.perf_counter()
            per_token = method(model, embeds, index, prompt)
            costs.setdefault(name, []).append(time.perf_counter() - start)
            grid = per_token.reshape(_grid_shape(per_token.numel(), *pixels.shape[-2:])).cpu().numpy()
            heat = upsample(grid, seen_box(model.vision.image_processor, *image.size), *image.size)
            y, x = np.unravel_index(int(np.argmax(heat)), heat.shape)
            hits.setdefault(name, []).append(box[0] <= x < box[2] and box[1] <= y < box[3])
    return correct / len(test_ds)


def save_examples(model, args, path: str, count: int = 6) -> None:
    """`model.explain` (the library's method, top label) on the first held-out images of each colour."""
    test_ds, boxes = object_dataset(count // len(LABELS), seed=200, size=args.size, side=args.side)
    explanations = [model.explain(row["image"]) for row in test_ds]
    contact_sheet(explanations, path, boxes=boxes, scale=3)
    print(f"wrote {path}")


def table(args, hits: dict, costs: dict, accuracies: list[float]) -> str:
    """The measured section: settings, sample sizes, the table."""
    n = len(next(iter(hits.values())))
    share = args.side**2 / args.size**2
    lines = [
        f"Measured by `benchmarks/explain_methods.py --seeds {args.seeds} --test_per_class {args.test_per_class}"
        f" --feature_layer {args.feature_layer}` ({time.strftime('%Y-%m-%d')}, {platform.machine()} CPU, "
        f"{torch.get_num_threads()} thread): {len(accuracies)} model(s) trained by `fit` ({args.adapter}, "
        f"{args.train_per_class} images per colour, {args.epochs:g} epoch(s); held-out accuracy "
        f"{', '.join(f'{a:.3f}' for a in accuracies)}), each explaining the true label of {n // len(accuracies)} "
        f"held-out {args.size}x{args.size} images: **{n} explanations per method**. A hit: the heatmap's peak "
        f"lies inside the {args.side}x{args.side} square; chance = the square's share of the image = {share:.3f}.",
        "",
        "| method | pointing game | ms / image (median) |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {np.mean(hits[name]):.3f} | {1000 * np.median(costs[name]):.0f} |" for name in METHODS]
    return "\n".join(lines)


def write_docs(path: str, section: str) -> None:
    """Replace the text between the markers of `path` with `section` (the prose around it stays)."""
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    if START not in text or END not in text:
        raise ValueError(f"{path} has no {START} ... {END} markers to write between.")
    head, rest = text.split(START, 1)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(f"{head}{START}\n{section}\n{END}{rest.split(END, 1)[1]}")
    print(f"wrote the measured section of {path}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--train_per_class", type=int, default=40)
    parser.add_argument("--test_per_class", type=int, default=50)
    parser.add_argument("--epochs", type=float, default=6)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--side", type=int, default=16)
    parser.add_argument("--num_image_tokens", type=int, default=None)
    parser.add_argument("--adapter", default="lora")
    parser.add_argument("--feature_layer", type=int, default=-2, help="0: the ViT's patch embeddings (local)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--docs", default=None, help="a page with explain_methods markers to write the table into")
    parser.add_argument("--examples", default=None, help="a PNG for seed 0's example explanations")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    root = tempfile.mkdtemp(prefix="explain-methods-")
    args.llm = save_llm(os.path.join(root, "llm"))
    args.vit = save_vision(os.path.join(root, "vit"), image_size=args.size)
    hits: dict[str, list[bool]] = {}
    costs: dict[str, list[float]] = {}
    accuracies = []
    for seed in (int(s) for s in args.seeds.split(",")):
        start = time.perf_counter()
        model = train(seed, args, root)
        accuracies.append(score_seed(model, args, seed, hits, costs))
        print(f"seed {seed}: accuracy {accuracies[-1]:.3f}, fit + scoring {time.perf_counter() - start:.0f} s",
              flush=True)
        if args.examples and seed == 0:
            save_examples(model, args, args.examples)
    section = table(args, hits, costs, accuracies)
    print("\n" + section)
    if args.docs:
        write_docs(args.docs, section)


if __name__ == "__main__":
    main()
