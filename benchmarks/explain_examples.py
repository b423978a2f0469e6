"""Example explanations for the docs: `model.explain` on Fashion-MNIST test images with the demo's
adapter (run `vlm-adapters demo` first), saved as one PNG (each image beside its heatmap overlay,
captioned with the explained label, its probability and the true class).

    .venv/bin/python benchmarks/explain_examples.py --adapter runs/demo/adapter \
        --output docs/explain_fashion_mnist.png

`contact_sheet` also lays out benchmarks/explain_methods.py's examples of the square task.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from PIL import Image, ImageDraw

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CAPTION_PX = 28


def tile(explanation, box: Sequence[int] | None, scale: int, caption: str) -> Image.Image:
    """The image and its overlay side by side (enlarged `scale` times), the box outlined, a caption below."""
    width, height = explanation.image.size
    size = (width * scale, height * scale)
    pair = Image.new("RGB", (2 * size[0] + 4, size[1] + CAPTION_PX), "white")
    for i, picture in enumerate((explanation.image.convert("RGB"), explanation.overlay())):
        big = picture.resize(size, Image.Resampling.NEAREST)
        if box is not None:
            ImageDraw.Draw(big).rectangle([v * scale for v in box], outline="white", width=2)
        pair.paste(big, (i * (size[0] + 4), 0))
    ImageDraw.Draw(pair).text((4, size[1] + 4), caption, fill="black")
    return pair


def contact_sheet(
    explanations: Sequence,
    path: str,
    boxes: Sequence[Sequence[int]] | None = None,
    captions: Sequence[str] | None = None,
    scale: int = 1,
    columns: int = 3,
) -> str:
    """One PNG of `tile`s, `columns` to a row; default captions: the explained label and its probability."""
    captions = captions or [f"{e.label} ({e.score:.0%})" for e in explanations]
    tiles = [tile(e, boxes[i] if boxes else None, scale, captions[i]) for i, e in enumerate(explanations)]
    w, h = max(t.width for t in tiles), max(t.height for t in tiles)
    rows = (len(tiles) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * (w + 8), rows * (h + 8)), "white")
    for i, picture in enumerate(tiles):
        sheet.paste(picture, ((i % columns) * (w + 8), (i // columns) * (h + 8)))
    sheet.save(path, format="PNG")
    return path


def main() -> None:
    import torch

    from vlm_adapters import load
    from vlm_adapters.demo.assets import fashion_mnist

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", default="runs/demo/adapter")
    parser.add_argument("--output", default="docs/explain_fashion_mnist.png")
    parser.add_argument("--picks", default="0,1,3,5,7,9", help="test images to explain (one per class drawn)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = load(args.adapter)  # the demo's adapter names both its bases
    test = fashion_mnist("test", per_class=1, seed=0)
    rows = [test[int(i)] for i in args.picks.split(",")]
    explanations, captions = [], []
    for row in rows:
        explanation = model.explain(row["image"].convert("RGB").resize((112, 112)))
        truth = test.features["label"].int2str(row["label"])
        explanations.append(explanation)
        captions.append(f"{explanation.label} ({explanation.score:.0%}); true: {truth}")
        print(captions[-1], "| token map:", explanation.tokens.round(2).tolist())
    print(f"wrote {contact_sheet(explanations, args.output, captions=captions, scale=2)}")


if __name__ == "__main__":
    main()
