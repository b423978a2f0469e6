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

from vlm_adapters.demo import DemoOptions, format_report, run_demo  # noqa: E402

# The record ends here; what follows in the file (notes on earlier runs, the learning curve's and the
# mosaic demo's sections) is kept as it is.
RECORD_END = "<!-- demo-record:end -->"


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
    kept = old.split(RECORD_END, 1)[1] if RECORD_END in old else "\n"
    with open(args.output, "w", encoding="utf-8") as fh:
        fh.write(
            "# Demo results\n\n"
            "The main job (`vlm-adapters demo`): SmolLM2-135M-Instruct in NF4 with LoRA r16 and an MLP projector\n"
            "on EfficientNet-Lite0 patch tokens (7x7 map pooled to "
            f"{options.num_image_tokens} tokens), fine-tuned on a balanced Fashion-MNIST subset\n"
            "and evaluated on a balanced subset of the official t10k test split by label scoring.\n\n"
            f"- command: `{command}`\n- date: {datetime.date.today().isoformat()}\n- machine: {machine()}\n"
            f"- options: `{report.options}`\n"
            f"{format_report(report)}\n{RECORD_END}{kept}"
        )
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()
