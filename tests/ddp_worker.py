"""Launched by test_distributed through torchrun (or alone): train the colour task, save the adapter.
A fifth argument `prior` trains with the label prior and its shifted views (the prior's own test)."""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

from conftest import colour_dataset  # noqa: E402
from datasets import ClassLabel  # noqa: E402

from vlm_adapters import attach  # noqa: E402


def main() -> None:
    llm_dir, vit_dir, out_dir, per_device = sys.argv[1:5]
    with_prior = sys.argv[5:] == ["prior"]
    # float32: bf16 rounds differently when a batch is packed with other rows (2% of the update after 4 steps)
    model = attach(vit_dir, llm_dir, seed=0, compute_dtype="float32")
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        model.save_pretrained(os.path.join(out_dir, "init"))
    encoded = []  # images this process ran through the encoder (the feature cache should spare rank 1)

    def count(module, args, kwargs, out):
        encoded.append(len(kwargs["pixel_values"]))

    model.vision.encoder.register_forward_hook(count, with_kwargs=True)
    # Class names of 3, 3 and 10 answer tokens: the processes hold unequal token counts, and the loss must
    # still be the mean over the step's tokens of both (the Trainer's num_items_in_batch, modeling.forward).
    data = colour_dataset(16, seed=0).cast_column("label", ClassLabel(names=["cat", "dog", "small brown bird"]))
    model.fit(
        data, output_dir=out_dir, max_steps=4, per_device_train_batch_size=int(per_device),
        learning_rate=5e-3, projector_lr=5e-3, save_strategy="no", disable_tqdm=True, seed=0, describe_ratio=0.0,
        logging_steps=1, train_sampling_strategy="random",
        # its held-out gate rows leave batches uneven across the processes: off where the weights are compared
        label_prior=with_prior, prior_views=["shift"] if with_prior else None,
        ddp_backend="gloo" if os.environ.get("WORLD_SIZE") else None,
    )
    with open(os.path.join(out_dir, f"encoded-rank{rank}.json"), "w") as fh:
        json.dump(sum(encoded), fh)
    if with_prior:
        with open(os.path.join(out_dir, f"gate-rank{rank}.json"), "w") as fh:
            json.dump(float(model.label_prior.gate), fh)
    if rank == 0:
        model.save_pretrained(os.path.join(out_dir, "adapter"))


if __name__ == "__main__":
    main()
