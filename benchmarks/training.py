"""Section 1: training samples/s of `model.fit` against the reference Trainer."""

from __future__ import annotations

from typing import Any

from transformers import TrainingArguments

from benchmarks.common import SEED, StepTimes, environ, log, ratios, stat, stopwatch
from benchmarks.context import Context
from benchmarks.reference import reference_trainer
from vlm_adapters.fast_lora import peft_lora_forward


def bench_training(ctx: Context) -> dict[str, Any]:
    s = ctx.sizes
    model = ctx.model(s.num_image_tokens)
    samples = len(ctx.train) * s.epochs

    def run_library(max_steps: int = -1) -> tuple[float, int, dict[str, float]]:
        cb = StepTimes()
        with environ(VLM_ADAPTERS_CACHE=ctx.dir("cache")), stopwatch() as t:  # fresh cache: encoding is paid
            metrics = ctx.library_fit(model, ctx.train, callbacks=[cb], max_steps=max_steps)
        return t[0], len(cb.ends), metrics

    def run_reference(max_steps: int = -1) -> tuple[float, int, dict[str, float]]:
        cb = StepTimes()
        with stopwatch() as t:
            args = ctx.train_args(
                ctx.dir("ref"), max_steps=max_steps, remove_unused_columns=False,
                gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
            )
            trainer = reference_trainer(model, ctx.train, ctx.names, TrainingArguments(**args))
            trainer.add_callback(cb)
            try:
                with peft_lora_forward(model):  # the standard recipe runs PEFT's own LoRA forward
                    metrics = trainer.train().metrics
            finally:
                model.base_llm.gradient_checkpointing_disable()  # the library run shares this LLM
        return t[0], len(cb.ends), metrics

    log("training: warm-up (1 untimed step each)")
    for run in (run_library, run_reference):
        ctx.model(s.num_image_tokens)
        run(max_steps=1)

    out: dict[str, Any] = {"library": [], "reference": [], "steps": {}, "loss": {}, "trainer": {}, "samples": samples}
    for r in range(ctx.repeats):
        order = ("library", "reference") if r % 2 == 0 else ("reference", "library")
        for which in order:
            ctx.model(s.num_image_tokens)  # back to the same initial weights
            seconds, steps, metrics = (run_library if which == "library" else run_reference)()
            loss = metrics["train_loss"]
            out[which].append(samples / seconds)
            out["steps"].setdefault(which, set()).add(steps)
            out["loss"].setdefault(which, []).append(loss)
            out["trainer"].setdefault(which, []).append(metrics["train_samples_per_second"])
            log(f"training repeat {r + 1}/{ctx.repeats} {which}: {seconds:.1f} s, {steps} steps, "
                f"{samples / seconds:.2f} samples/s, train loss {loss:.3f}")
    if out["steps"]["library"] != out["steps"]["reference"]:
        raise RuntimeError(f"optimizer steps differ: {out['steps']}")
    out["ratio"] = ratios(out["library"], out["reference"])
    out["trainer_ratio"] = ratios(out["trainer"]["library"], out["trainer"]["reference"])
    return out


def report_training(ctx: Context, res: dict[str, Any]) -> str:
    s = ctx.sizes
    steps = next(iter(res["steps"]["library"]))
    gap = max(abs(a - b) for a, b in zip(res["loss"]["library"], res["loss"]["reference"], strict=True))
    same = (
        f"The train losses of the two recipes agree within {gap:.1e}: they compute the same training."
        if gap < 1e-2 else f"The train losses of the two recipes differ by up to {gap:.3f}: the library's packed "
        "batches run other matmul shapes in bfloat16 than the padded reference (on one real batch at the same "
        "weights the two losses were 7.982 and 7.987), and 20 optimizer steps carry that rounding along."
    )
    return "\n".join([
        "## 1. Training throughput",
        "",
        f"{len(ctx.train)} Fashion-MNIST training images ({s.train_per_class} per class), batch size {s.batch_size}, "
        f"{s.epochs:g} epochs = {steps} optimizer steps for both, seed {SEED}, AdamW at lr {s.learning_rate:g} for "
        f"projector and LoRA alike, cosine schedule, no checkpoints; `describe_ratio=0` so the library trains only the "
        "classify prompt, like the reference (the demo itself uses projector_lr 1e-3 and 25% describe examples). "
        "Library: `model.fit(...)` timed end to end, including building "
        "the feature cache (a fresh, empty cache folder every repeat, so each repeat encodes the images once); "
        "its batches run packed (no padding, the system turn + prompt once per batch, logits at answer tokens only). "
        "Reference: `reference_trainer(...)` + `train()` (the encoder runs on every batch's pixels, full-vocabulary "
        "logits, the LLM's own loss, PEFT's own LoRA forward, gradient checkpointing on as in the HF cookbook's "
        "QLoRA recipe). "
        "The two runs of a repeat start from the same initial weights and alternate "
        "in order; one untimed 1-step run of each comes first.",
        "",
        "| | library | reference | library / reference |",
        "|---|---|---|---|",
        f"| training samples/s, median (min-max) | {stat(res['library'])} | {stat(res['reference'])} | "
        f"{stat(res['ratio'], suffix='x')} |",
        f"| the Trainer's own `train_samples_per_second` (its loop only: no encoding, no setup) | "
        f"{stat(res['trainer']['library'])} | {stat(res['trainer']['reference'])} | "
        f"{stat(res['trainer_ratio'], suffix='x')} |",
        f"| optimizer steps | {steps} | {next(iter(res['steps']['reference']))} | |",
        f"| train loss (mean over the run) | {stat(res['loss']['library'])} | {stat(res['loss']['reference'])} | |",
        "",
        same,
    ])


