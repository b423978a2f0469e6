"""Benchmarks of vlm_adapters against the standard transformers recipe (benchmarks/reference.py), on the
real demo parts: EfficientNet-Lite0 -> MLP projector -> SmolLM2-135M-Instruct in NF4 with LoRA r16,
trained and evaluated on Fashion-MNIST. Writes a markdown report (and a scaling plot beside it).

    .venv/bin/python benchmarks/run.py                       # full default run (~30-40 min on 2 CPU cores)
    .venv/bin/python benchmarks/run.py --quick --threads 1   # smoke configuration, ~6 min

`--threads` sets torch's thread count (default: torch's own choice, all cores); the memory subprocesses
use the same count. Everything runs on the CPU.
    .venv/bin/python benchmarks/run.py --only training,classify --repeats 5

Sections (`--only`, comma-separated):
  training  samples/s of `model.fit` (feature cache built inside the timing) vs the reference Trainer
  classify  images/s and accuracy of `model.classify` (label scoring) vs generate + string match
  memory    peak RSS of a ~1.1B-parameter Llama loaded in NF4 vs bf16 (separate subprocesses)
  scaling   time per training sample vs image tokens / number of classes; classify time vs classes
  peak      bf16 / fp32 matmul GFLOP/s of this machine and the share a library training step reaches
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import time
from dataclasses import asdict, replace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.classify import bench_classify, report_classify  # noqa: E402
from benchmarks.common import QUICK, SECTIONS, SEED, SYSTEM_PROMPT, Sizes, log, stopwatch  # noqa: E402
from benchmarks.context import Context  # noqa: E402
from benchmarks.memory import bench_memory, report_memory  # noqa: E402
from benchmarks.peak import bench_peak, report_peak  # noqa: E402
from benchmarks.scaling import bench_scaling, plot_scaling, report_scaling  # noqa: E402
from benchmarks.training import bench_training, report_training  # noqa: E402


def machine(threads: int) -> str:
    import bitsandbytes
    import peft
    import transformers

    with open("/proc/cpuinfo") as fh:
        cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), "?")
    return (
        f"{cpu}, {os.cpu_count()} cores, {threads} torch thread(s), Python {platform.python_version()}, "
        f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
        f"bitsandbytes {bitsandbytes.__version__}"
    )


def render(ctx: Context, command: str, ran: list[str], plot: str | None, seconds: float) -> str:
    s = ctx.sizes
    parts = ["# Benchmarks", ""]
    if ctx.quick:
        parts += [
            "> **Quick smoke configuration (`--quick`)**: tiny sizes that only check the script runs end to end. "
            "These numbers are not benchmark results; run the default configuration on a quiet machine for those.",
            "",
        ]
    parts += [
        "vlm_adapters against the standard transformers recipe (`benchmarks/reference.py`) on the demo parts: "
        f"EfficientNet-Lite0 (frozen) -> MLP projector -> SmolLM2-135M-Instruct in NF4 with LoRA r{s.lora_r}, "
        f"{s.num_image_tokens} image tokens, system prompt \"{SYSTEM_PROMPT}\", on Fashion-MNIST, all on the CPU. "
        f"Every timing is the median over {ctx.repeats} repeat(s) with min-max in brackets; every ratio is taken "
        "per repeat between runs made back to back in the same process, then summarised the same way.",
        "",
        f"- command: `{command}`",
        f"- date: {datetime.datetime.now().isoformat(timespec='minutes')}",
        f"- machine: {machine(ctx.threads)}",
        f"- sections: {', '.join(ran)}; total wall time {seconds / 60:.1f} min",
        "- load average (1 min, from `os.getloadavg`) at the start and end of each section, and its minutes: "
        + "; ".join(f"{name} {a:.1f} -> {b:.1f} ({t / 60:.1f} min)" for name, (a, b, t) in ctx.load.items()),
        f"- sizes: `{json.dumps(asdict(s))}`",
        "",
    ]
    reports = {
        "training": lambda r: report_training(ctx, r),
        "classify": lambda r: report_classify(ctx, r),
        "memory": lambda r: report_memory(ctx, r),
        "scaling": lambda r: report_scaling(ctx, r, plot),
        "peak": lambda r: report_peak(ctx, r),
    }
    for name in SECTIONS:
        if name in ctx.results:
            parts += [reports[name](ctx.results[name]), ""]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny smoke configuration (minutes)")
    parser.add_argument("--repeats", type=int, default=None, help="repeats per timing (default 3; 1 with --quick)")
    parser.add_argument("--output", default="docs/benchmarks.md", help="markdown report; the plot goes beside it")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--train-per-class", type=int, default=None)
    parser.add_argument("--test-per-class", type=int, default=None)
    args = parser.parse_args(argv)

    ran = [x.strip() for x in args.only.split(",") if x.strip()]
    unknown = sorted(set(ran) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    ran = [x for x in SECTIONS if x in ran]
    sizes = QUICK if args.quick else Sizes()
    given = {"train_per_class": args.train_per_class, "test_per_class": args.test_per_class}
    overrides = {k: v for k, v in given.items() if v}
    sizes = replace(sizes, **overrides)
    repeats = args.repeats or (1 if args.quick else 3)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    torch.manual_seed(SEED)
    import datasets

    datasets.disable_progress_bars()

    start = time.perf_counter()
    ctx = Context(sizes, repeats, threads, args.quick)
    try:
        benches = {
            "training": bench_training, "classify": bench_classify, "memory": bench_memory,
            "scaling": bench_scaling, "peak": bench_peak,
        }
        for name in ran:
            log(f"=== section {name} ===")
            before = os.getloadavg()[0]
            with stopwatch() as t:
                ctx.results[name] = benches[name](ctx)
            ctx.load[name] = (before, os.getloadavg()[0], t[0])
            log(f"=== section {name} done in {t[0]:.0f} s ===")
        output = args.output
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        plot = None
        if "scaling" in ctx.results:
            plot = plot_scaling(ctx.results["scaling"], os.path.splitext(output)[0] + "_scaling.png")
        command = shlex.join([".venv/bin/python", "benchmarks/run.py", *(sys.argv[1:] if argv is None else argv)])
        text = render(ctx, command, ran, plot, time.perf_counter() - start)
    finally:
        ctx.close()
    print("\n" + text)
    with open(output, "w", encoding="utf-8") as fh:
        fh.write(text)
    print(f"written to {output}" + (f" and {plot}" if plot else ""))


if __name__ == "__main__":
    main()
