"""Encode time of the feature cache on free-text data: N Fashion-MNIST images x 3 rows each
(a caption and two questions), the shape of a user's caption + question set.

    OMP_NUM_THREADS=1 python benchmarks/feature_cache.py --images 200 --repeats 2

Each repeat fills an empty cache folder; prints the encode seconds and how many images went
through the encoder (a forward hook counts them).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import datasets
import torch

from vlm_adapters.demo.assets import FASHION_MNIST_LABELS, efficientnet_lite0, fashion_mnist
from vlm_adapters.features import with_image_features
from vlm_adapters.vision import VisionTower


def rows(images: int, seed: int) -> datasets.Dataset:
    base = fashion_mnist("train", per_class=images // 10, seed=seed)
    out: dict[str, list] = {"image": [], "prompt": [], "answer": []}
    for row in base:
        name = FASHION_MNIST_LABELS[row["label"]]
        for prompt, answer in (
            ("Describe this image.", f"A photo of a {name}."),
            ("What is it?", name),
            ("Is it a bag?", "yes" if name == "Bag" else "no"),
        ):
            out["image"].append(row["image"])
            out["prompt"].append(prompt)
            out["answer"].append(answer)
    return datasets.Dataset.from_dict(out, features=datasets.Features(
        {"image": datasets.Image(), "prompt": datasets.Value("string"), "answer": datasets.Value("string")}
    ))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    encoder, processor = efficientnet_lite0()
    vision = VisionTower(encoder, processor)
    data = rows(args.images, seed=0)
    shape = tuple(vision.encode_images([data[0]["image"]]).shape[1:])
    encoded = [0]
    vision.encoder.register_forward_hook(lambda _m, inputs, _o: encoded.__setitem__(0, encoded[0] + len(inputs[0])))
    seconds = []
    for _ in range(args.repeats):
        encoded[0] = 0
        with tempfile.TemporaryDirectory() as folder:
            start = time.perf_counter()
            out = with_image_features(data, vision, cache_dir=folder, token_shape=shape)
            seconds.append(time.perf_counter() - start)
        print(f"rows {len(out)}  images through the encoder {encoded[0]}  encode {seconds[-1]:.2f} s")
    print(f"median {statistics.median(seconds):.2f} s over {args.repeats} repeats ({len(data)} rows)")


if __name__ == "__main__":
    main()
