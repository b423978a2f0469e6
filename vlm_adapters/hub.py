"""Save, load and share adapters: only what was trained, in safetensors, plus a config and a card.

Folder layout (what `save_pretrained` writes and `load` reads):
    vlm_adapter_config.json    every attach option + the names and signatures of both bases
    projector.safetensors      the projector
    adapter_config.json        PEFT's own files (absent for adapter="none"),
    adapter_model.safetensors  so plain `PeftModel.from_pretrained` can read them too
    README.md                  model card
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

import torch
from huggingface_hub import ModelCard, ModelCardData, create_repo, snapshot_download, upload_folder
from peft import PeftModel
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .attach import assemble
from .config import CONFIG_NAME, AdapterConfig
from .language import load_adapter
from .model import VisionLanguageModel
from .vision import Preprocessor

PROJECTOR_FILE = "projector.safetensors"
PEFT_WEIGHTS = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
HUB_FILES = ["*.json", "*.safetensors", "README.md"]  # never code, never pickles


class AdapterLoadError(ValueError):
    """The adapter folder or its bases do not fit together; the message says how to fix it."""


def replace_directory(source: str, target: str) -> None:
    """Move a fully written folder into place so `target` is always either the old or the new one."""
    backup = None
    if os.path.exists(target):
        backup = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.old-", dir=os.path.dirname(target))
        os.rmdir(backup)
        os.rename(target, backup)
    os.rename(source, target)
    if backup:
        shutil.rmtree(backup, ignore_errors=True)


def write_adapter_files(model: VisionLanguageModel, directory: str) -> None:
    model.config.save(directory)
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in model.projector.state_dict().items()},
        os.path.join(directory, PROJECTOR_FILE),
        metadata={"format": "pt"},
    )
    if isinstance(model.llm, PeftModel):
        # Hand PEFT the LoRA tensors directly: a full state_dict() call makes bitsandbytes re-pack its
        # CPU 4-bit weights, which nudges later outputs of the model being saved.
        lora = {name: p.detach() for name, p in model.llm.named_parameters() if "lora_" in name}
        model.llm.save_pretrained(directory, safe_serialization=True, state_dict=lora or None)
    model_card(model).save(os.path.join(directory, "README.md"))


def write_atomically(directory: str | os.PathLike, write: Callable[[str], None]) -> str:
    """Run `write` into a temporary sibling folder, then rename it over `directory`: a crash or a
    full disk leaves the previous folder as it was. Returns the absolute path."""
    directory = os.path.abspath(os.fspath(directory))
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.tmp-", dir=parent)
    try:
        write(staging)
        replace_directory(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def save_pretrained(model: VisionLanguageModel, directory: str) -> str:
    """Write the adapter atomically (see `write_atomically`)."""
    return write_atomically(directory, lambda staging: write_adapter_files(model, staging))


def model_card(model: VisionLanguageModel) -> ModelCard:
    config = model.config
    metrics: dict[str, Any] = getattr(model, "metrics", {}) or {}
    bases = [name for name in (config.llm, config.vision) if name and not os.path.isabs(name)]
    data = ModelCardData(
        library_name="vlm_adapters",
        base_model=bases or None,
        tags=["vlm_adapters", "vision-language", config.adapter, "image-text-to-text"],
        datasets=[metrics["dataset"]] if isinstance(metrics.get("dataset"), str) else None,
    )
    options = "\n".join(
        f"| `{f.name}` | `{getattr(config, f.name)!r}` |"
        for f in dataclasses.fields(config)
        if f.name not in ("vision_signature", "llm_signature", "labels")
    )
    scores = "\n".join(f"| {k} | {v:.4f} |" for k, v in metrics.items() if isinstance(v, (int, float)))
    labels = ", ".join(config.labels) or "(free text)"
    content = f"""---
{data.to_yaml()}
---

# vlm_adapters adapter

A projector ({config.projector}) and a {config.adapter} adapter that connect the vision encoder
`{config.vision or "(in-memory module)"}` to the LLM `{config.llm or "(in-memory module)"}`
(loaded with quantization={config.quantization!r}). Only the trained weights are stored here.

Labels: {labels}

## Usage

```python
from vlm_adapters import load

model = load("<this repo or folder>")
model.classify("image.png", labels={config.labels or ["label a", "label b"]!r})
model.describe("image.png")
```

## Metrics

| metric | value |
|---|---|
{scores or "| (not evaluated) | |"}

## Attach options

| option | value |
|---|---|
{options}
"""
    return ModelCard(content)


def push_to_hub(
    model: VisionLanguageModel,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str = "Upload vlm_adapters adapter",
) -> str:
    """Create the repo if needed and upload the adapter folder through huggingface_hub."""
    create_repo(repo_id, private=private, token=token, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        write_adapter_files(model, tmp)
        info = upload_folder(
            repo_id=repo_id, folder_path=tmp, token=token, revision=revision, commit_message=commit_message
        )
    return str(getattr(info, "commit_url", info))


def _check_weight_files(directory: str, config: AdapterConfig, allow_pickle: bool) -> None:
    files = set(os.listdir(directory))
    pickles = sorted(f for f in files if f.endswith(PICKLE_SUFFIXES))
    needed = [PROJECTOR_FILE] + ([PEFT_WEIGHTS] if config.adapter != "none" else [])
    missing = [name for name in needed if name not in files]
    if missing and pickles and not allow_pickle:
        raise AdapterLoadError(
            f"{directory} holds pickle weights {pickles} instead of {missing}. Pickles can run code when "
            "loaded, so they are refused; convert them to safetensors, or pass allow_pickle=True if you trust "
            "the source."
        )
    if PROJECTOR_FILE not in files and not (allow_pickle and pickles):
        raise AdapterLoadError(
            f"{directory} has no {PROJECTOR_FILE}: the projector was not saved, so the adapter cannot be "
            "rebuilt (a fresh projector would silently give wrong answers). Save it with model.save_pretrained()."
        )
    if config.adapter != "none" and PEFT_WEIGHTS not in files and not (allow_pickle and pickles):
        raise AdapterLoadError(f"{directory} has no {PEFT_WEIGHTS} for its {config.adapter} adapter.")


def _read_projector(directory: str, allow_pickle: bool) -> dict[str, torch.Tensor]:
    path = os.path.join(directory, PROJECTOR_FILE)
    if os.path.exists(path):
        return load_file(path)
    if allow_pickle:
        pickled = next(os.path.join(directory, f) for f in os.listdir(directory) if f.startswith("projector"))
        return torch.load(pickled, map_location="cpu", weights_only=True)
    raise AdapterLoadError(f"{directory} has no {PROJECTOR_FILE}.")


def resolve_adapter_dir(source: str, *, revision: str | None, token: str | None, allow_pickle: bool) -> str:
    if os.path.isdir(source):
        return source
    if os.path.exists(source):
        raise AdapterLoadError(f"{source} is a file; pass the adapter folder that holds {CONFIG_NAME}.")
    patterns = HUB_FILES + (["*.bin", "*.pt"] if allow_pickle else [])
    return snapshot_download(source, revision=revision, token=token, allow_patterns=patterns)


def _check_signature(kind: str, saved: dict[str, Any], found: dict[str, Any], name: str | None) -> None:
    if saved and saved != found:
        raise AdapterLoadError(
            f"this adapter was trained on a {kind} base with {saved}, but the {kind} base given "
            f"({name or 'in-memory module'}) has {found}. Load it onto the same base model it was trained on."
        )


def load(
    source: str,
    *,
    vision: str | nn.Module | None = None,
    llm: str | PreTrainedModel | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    image_processor: Preprocessor | None = None,
    device: str | torch.device | None = None,
    revision: str | None = None,
    token: str | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    **overrides: Any,
) -> VisionLanguageModel:
    """Rebuild a saved adapter on its bases: a local folder or a Hub repo id (through the HF cache).

    `vision=` / `llm=` put it on a local copy (or an in-memory module) of the same bases; other
    overrides use attach's option names, e.g. `quantization=None`.
    """
    directory = resolve_adapter_dir(source, revision=revision, token=token, allow_pickle=allow_pickle)
    config = AdapterConfig.load(directory)  # validated before any weight is read
    if overrides:
        config = AdapterConfig.from_dict({**config.to_dict(), **overrides})
    _check_weight_files(directory, config, allow_pickle)
    vision_source = vision if vision is not None else config.vision
    llm_source = llm if llm is not None else config.llm
    for kind, value in (("vision", vision_source), ("llm", llm_source)):
        if value is None:
            raise AdapterLoadError(
                f"this adapter was attached to an in-memory {kind} module, so its config names no {kind} base to "
                f"rebuild from. Pass load({source!r}, {kind}=<the same {kind} model or its path>)."
            )
    saved_vision, saved_llm = dict(config.vision_signature), dict(config.llm_signature)
    tower, projector, base, tokenizer = assemble(
        config,
        vision_source,
        llm_source,
        tokenizer=tokenizer,
        image_processor=image_processor,
        device=device,
        trust_remote_code=trust_remote_code,
    )
    for kind, saved, found, source_name in (
        ("vision", saved_vision, config.vision_signature, vision_source),
        ("llm", saved_llm, config.llm_signature, llm_source),
    ):
        _check_signature(kind, saved, found, source_name if isinstance(source_name, str) else None)
    try:
        projector.load_state_dict(_read_projector(directory, allow_pickle), strict=True)
    except RuntimeError as err:
        raise AdapterLoadError(f"projector weights in {directory} do not fit this configuration: {err}") from err
    llm_with_adapter = load_adapter(base, directory, config)
    return VisionLanguageModel(config, tower, projector, llm_with_adapter, tokenizer)
