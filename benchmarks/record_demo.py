"""Run the demo with its defaults and record its figures in docs/results.md, with the command that
produced them and the machine it ran on.

    .venv/bin/python benchmarks/record_demo.py [--output docs/results.md] [demo flags...]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys

import torch
from transformers import HfArgumentParser

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.learning_curve import END as CURVE_END  # noqa: E402
from benchmarks.learning_curve import START as CURVE_START  # noqa: E402
from vlm_adapters.demo import DemoOptions, format_report, run_demo  # noqa: E402
from vlm_adapters.demo.mosaic_report import SECTION_START  # noqa: E402


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    import bitsandbytes
    import peft
    import transformers

    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"transformers {transformers.__version__}, peft {peft.__version__}, bitsandbytes {bitsandbytes.__version__}, "
        f"Python {platform.python_version()}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output", default="docs/results.md")
    args, rest = parser.parse_known_args()
    (options,) = HfArgumentParser(DemoOptions).parse_args_into_dataclasses(rest)
    report = run_demo(options)
    command = " ".join(["python benchmarks/record_demo.py", *sys.argv[1:]])
    old = open(args.output, encoding="utf-8").read() if os.path.exists(args.output) else ""
    mosaic = SECTION_START + old.split(SECTION_START, 1)[1] if SECTION_START in old else ""  # `demo mosaic`'s part
    curve = old[old.index(CURVE_START) : old.index(CURVE_END) + len(CURVE_END)] + "\n" if CURVE_END in old else ""
    with open(args.output, "w", encoding="utf-8") as fh:
        fh.write(
            "# Demo results\n\n"
            "The main job (`vlm-adapters demo`): SmolLM2-135M-Instruct in NF4 with LoRA r16 and an MLP projector\n"
            "on EfficientNet-Lite0 patch tokens (7x7 map pooled to "
            f"{options.num_image_tokens} tokens), fine-tuned on a balanced Fashion-MNIST subset\n"
            "and evaluated on a balanced subset of the official t10k test split by label scoring.\n\n"
            f"- command: `{command}`\n- date: {datetime.date.today().isoformat()}\n- machine: {machine()}\n"
            f"- options: `{report.options}`\n"
            f"{format_report(report)}\n"
            + (f"\n{curve}" if curve else "")  # learning_curve.py's section
            + (f"\n{mosaic}" if mosaic else "")
        )
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()
