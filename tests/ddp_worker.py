"""Launched by test_distributed through torchrun (or alone): train the colour task, save the adapter."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

from conftest import colour_dataset  # noqa: E402

from vlm_adapters import attach  # noqa: E402


def main() -> None:
    llm_dir, vit_dir, out_dir, per_device = sys.argv[1:5]
    model = attach(vit_dir, llm_dir, seed=0)
    if int(os.environ.get("RANK", "0")) == 0:
        model.save_pretrained(os.path.join(out_dir, "init"))
    model.fit(
        colour_dataset(16, seed=0), output_dir=out_dir, max_steps=4, per_device_train_batch_size=int(per_device),
        learning_rate=5e-3, projector_lr=5e-3, save_strategy="no", disable_tqdm=True, seed=0, describe_ratio=0.0,
        logging_steps=1, train_sampling_strategy="random",
        ddp_backend="gloo" if os.environ.get("WORLD_SIZE") else None,
    )
    if int(os.environ.get("RANK", "0")) == 0:
        model.save_pretrained(os.path.join(out_dir, "adapter"))


if __name__ == "__main__":
    main()
