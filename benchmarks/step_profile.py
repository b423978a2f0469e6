"""Where a library training step's CPU time goes, by kind of operator (torch.profiler's self CPU time),
on the demo's model: EfficientNet-Lite0 -> MLP projector -> SmolLM2-135M-Instruct in NF4 with LoRA r16,
16 image tokens, `fit` with default options on label rows of Fashion-MNIST (features from the cache), label_prior=False.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/step_profile.py [--steps 5] [--dequantize per_forward]
        [--output docs/benchmarks.md]

The first `--warmup` optimizer steps run unprofiled; the next `--steps` are profiled. The table replaces
the section between the step-profile markers of `--output` (appended when absent).
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import sys
import tempfile
from collections import defaultdict

import torch
from transformers import TrainerCallback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.record_demo import machine  # noqa: E402
from vlm_adapters import attach  # noqa: E402
from vlm_adapters.demo.assets import efficientnet_lite0, fashion_mnist, smollm2_instruct  # noqa: E402

START, END = "<!-- step-profile:start -->", "<!-- step-profile:end -->"
# (kind, pattern on the operator's name), first match wins; the rest is "elementwise and other".
KINDS = [
    ("4-bit dequantize (bitsandbytes)", r"bitsandbytes|dequantize"),
    ("attention (scaled_dot_product_attention)", r"scaled_dot_product|flash_attention|_efficient_attention"),
    ("matmul (mm, addmm, bmm)", r"^aten::(mm|addmm|bmm|matmul|linear|_addmm_activation|mkldnn_)"),
    ("optimizer (AdamW, foreach ops)", r"_foreach|adam"),
    ("fused LoRA functions' own time (fast_lora.py)", r"_LoRA4bit"),
    ("copies and casts (copy_, to, cat, clone)", r"^aten::(copy_|_to_copy|to|cat|clone|contiguous|index_select)$"),
]


class Profile(TrainerCallback):
    """Profiles optimizer steps warmup+1 .. warmup+steps."""

    def __init__(self, warmup: int, steps: int) -> None:
        self.warmup, self.steps = warmup, steps
        self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])

    def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201, ARG002
        if state.global_step == self.warmup:
            self.profiler.start()

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201, ARG002
        if state.global_step == self.warmup + self.steps:
            self.profiler.stop()


def by_kind(profiler: torch.profiler.profile) -> dict[str, float]:
    """Self CPU microseconds per kind of operator."""
    totals: dict[str, float] = defaultdict(float)
    for event in profiler.key_averages():
        kind = next((k for k, pattern in KINDS if re.search(pattern, event.key)), "elementwise and other")
        totals[kind] += event.self_cpu_time_total
    return totals


def render(totals: dict[str, float], steps: int, options: argparse.Namespace, dtype: str) -> str:
    total = sum(totals.values())
    rows = [f"| {kind} | {us / steps / 1e3:.0f} | {100 * us / total:.1f}% |"
            for kind, us in sorted(totals.items(), key=lambda item: -item[1])]
    return "\n".join([
        START,
        "## 7. Where a training step's time goes, by operator",
        "",
        f"`{' '.join(['python benchmarks/step_profile.py', *sys.argv[1:]])}` ({datetime.date.today().isoformat()}; "
        f"{machine()}): the demo's model, `fit` with default options but `label_prior=False` (the step, not the "
        f"prior's fit after it) and `dequantize={options.dequantize!r}`, "
        f"batch size {options.batch_size} of Fashion-MNIST label rows, compute dtype {dtype}; torch.profiler's "
        f"self CPU time of {steps} optimizer steps after {options.warmup} unprofiled ones, by kind of operator.",
        "",
        "| kind of operator | ms per step | share |",
        "|---|---|---|",
        *rows,
        f"| all | {total / steps / 1e3:.0f} | 100% |",
        END,
    ])


def write_section(path: str, section: str) -> None:
    text = open(path, encoding="utf-8").read() if os.path.exists(path) else ""
    if START in text and END in text:
        text = text[: text.index(START)] + section + text[text.index(END) + len(END):]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--dequantize", default="per_forward")
    parser.add_argument("--output", default="docs/benchmarks.md")
    options = parser.parse_args()
    encoder, processor = efficientnet_lite0()
    model = attach(encoder, smollm2_instruct(), image_processor=processor, num_image_tokens=16,
                   system_prompt="You classify images.", dequantize=options.dequantize, seed=0)
    rows = options.batch_size * (options.warmup + options.steps)
    train = fashion_mnist("train", per_class=-(-rows // 10), seed=0)
    profile = Profile(options.warmup, options.steps)
    with tempfile.TemporaryDirectory() as tmp:
        model.fit(train, output_dir=tmp, max_steps=options.warmup + options.steps, label_prior=False,
                  per_device_train_batch_size=options.batch_size, save_strategy="no", report_to="none",
                  disable_tqdm=True, callbacks=[profile])
    dtype = str(model.config.compute_dtype)
    section = render(by_kind(profile.profiler), options.steps, options, dtype)
    print(profile.profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))  # the top operators
    print(section)
    write_section(options.output, section)


if __name__ == "__main__":
    main()
