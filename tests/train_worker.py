"""Run by test_reliability in a child process: train on the colour task, optionally SIGKILL itself
mid-epoch (a crash with no chance to clean up), or resume from the last checkpoint; writes the
steps it ran (steps-fresh.json / steps-resume.json), the final adapter and its test accuracy."""

from __future__ import annotations

import json
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(__file__))

from conftest import StepCounter, colour_dataset  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from vlm_adapters import attach  # noqa: E402


class KillAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    llm_dir, vit_dir, out_dir, kill_at, resume = sys.argv[1:6]
    train, test = colour_dataset(24, seed=0), colour_dataset(10, seed=1)
    # A resumed process starts from other weights: only the checkpoint can make it match a straight run.
    model = attach(vit_dir, llm_dir, seed=1 if resume == "resume" else 0)
    counter = StepCounter()
    callbacks = [counter] + ([KillAt(int(kill_at))] if int(kill_at) > 0 else [])
    model.fit(
        train, output_dir=out_dir, num_train_epochs=3, save_strategy="steps", save_steps=2, save_total_limit=2,
        learning_rate=5e-3, projector_lr=5e-3, disable_tqdm=True, seed=0, callbacks=callbacks,
        resume_from_checkpoint=resume == "resume" or None,
        label_prior=False,  # the gate rows it holds out would change the step arithmetic this test checks
    )
    with open(os.path.join(out_dir, f"steps-{resume}.json"), "w") as fh:
        json.dump(counter.steps, fh)
    model.save_pretrained(os.path.join(out_dir, "final"))
    with open(os.path.join(out_dir, "accuracy.json"), "w") as fh:
        json.dump(model.evaluate(test)["accuracy"], fh)


if __name__ == "__main__":
    main()
