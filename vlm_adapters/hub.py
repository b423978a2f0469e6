"""Adapter folders: write them (atomically), push them to the Hub with a model card, and find and
check them before loading.

Folder layout (what `save_pretrained` writes and `attach.load` reads):
    vlm_adapter_config.json    every attach option + the names and signatures of both bases
    projector.safetensors      the projector
    label_prior.safetensors    label data: the probe + gate that label scores add (label_prior.py)
    adapter_config.json        PEFT's own files (absent for adapter="none"),
    adapter_model.safetensors  so plain `PeftModel.from_pretrained` can read them too
    README.md                  model card
    app.py, requirements.txt   with `with_app=True`: a Gradio app, so the folder runs as a Space
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import torch
from huggingface_hub import ModelCard, ModelCardData, create_repo, snapshot_download, upload_folder
from safetensors.torch import load_file, save_file

from .config import CONFIG_NAME, AdapterConfig
from .files import write_folder_atomically
from .label_prior import PRIOR_FILE, load_prior, save_prior
from .modeling import VisionLanguageCore
from .vision import PACKAGED_PREFIX

PROJECTOR_FILE = "projector.safetensors"
PEFT_WEIGHTS = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
HUB_FILES = ["*.json", "*.safetensors", "README.md"]  # what `load` downloads: never code, never pickles
APP_FILES = ["app.py", "requirements.txt"]  # uploaded beside the adapter when it was saved with its app

SPACE_APP = '''"""The Gradio app of the adapter in this folder, written by vlm_adapters (with_app=True).

`python app.py` serves it on http://127.0.0.1:7860; uploaded to a Hugging Face Space (SDK gradio) it
runs there as is. The adapter loads from this folder, its bases from {bases}.
"""

import os

from vlm_adapters import load
from vlm_adapters.app import serve

if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    # Spaces set GRADIO_SERVER_NAME=0.0.0.0; anywhere else the app listens on localhost only.
    serve(load(here), host=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"), title={title!r})
'''

CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

A projector ({{ config.projector }}) and a {{ method }} adapter that connect the vision encoder
`{{ config.vision or "(in-memory module)" }}` to the LLM `{{ config.llm or "(in-memory module)" }}`
(loaded with quantization={{ config.quantization }}), trained with
[vlm_adapters](https://github.com/vlm-adapters/vlm-adapters). Only the trained weights are stored here.

Labels: {{ labels }}

## Usage

```python
from vlm_adapters import load

model = load("{{ repo_id }}")
model.classify("image.png", labels={{ usage_labels }})
model.describe("image.png")
```

## Metrics

| metric | value |
|---|---|
{{ metrics }}

## Attach options

| option | value |
|---|---|
{{ options }}
"""


class AdapterLoadError(ValueError):
    """The adapter folder or its bases do not fit together; the message says how to fix it."""


def write_adapter_files(
    model: VisionLanguageCore, directory: str, repo_id: str | None = None, with_app: bool = False
) -> None:
    """The config, the projector, PEFT's own adapter files and a model card (+ the app), into `directory`."""
    model.config.save(directory)
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in model.projector.state_dict().items()},
        os.path.join(directory, PROJECTOR_FILE),
        metadata={"format": "pt"},
    )
    if model.label_prior is not None:
        save_prior(model.label_prior, os.path.join(directory, PRIOR_FILE))
    if hasattr(model.llm, "peft_config"):
        model.llm.save_pretrained(directory, safe_serialization=True)
    model_card(model, repo_id or directory, with_app).save(os.path.join(directory, "README.md"))
    if with_app:
        write_app_files(model, directory, repo_id or directory)


def write_app_files(model: VisionLanguageCore, directory: str, repo_id: str) -> None:
    from . import __version__

    bases = " and ".join(f"`{name}`" for name in (model.config.vision, model.config.llm) if name) or "memory"
    title = f"{os.path.basename(repo_id.rstrip('/'))} (vlm_adapters)"
    with open(os.path.join(directory, "app.py"), "w", encoding="utf-8") as fh:
        fh.write(SPACE_APP.format(bases=bases, title=title))
    with open(os.path.join(directory, "requirements.txt"), "w", encoding="utf-8") as fh:
        fh.write(f"vlm-adapters[app]>={__version__}\n")


def save_pretrained(model: VisionLanguageCore, directory: str | os.PathLike, with_app: bool = False) -> str:
    """Write the adapter atomically: `directory` is either the old folder or the complete new one."""
    return write_folder_atomically(
        directory, lambda staging: write_adapter_files(model, staging, os.fspath(directory), with_app)
    )


def model_card(model: VisionLanguageCore, repo_id: str, with_app: bool = False) -> ModelCard:
    """huggingface_hub's ModelCard: Hub metadata (bases, dataset, task, metrics) + usage with `repo_id`."""
    config = model.config
    metrics: dict[str, Any] = getattr(model, "metrics", {}) or {}
    # base_model names Hub models only (the Hub checks card metadata on push): no local path, no packaged name
    bases = [n for n in (config.llm, config.vision) if n and not os.path.isabs(n) and not n.startswith(PACKAGED_PREFIX)]
    method = (config.peft_type or config.adapter).lower()  # e.g. "lora", "prefix", "adalora"
    data = ModelCardData(
        library_name="vlm_adapters",
        base_model=bases or None,
        pipeline_tag="image-text-to-text",
        tags=["vlm_adapters", "vision-language", method],
        datasets=[config.dataset] if config.dataset else None,
        **({"sdk": "gradio", "app_file": "app.py"} if with_app else {}),  # what a Space reads from its card
    )
    return ModelCard.from_template(
        data,
        template_str=CARD_TEMPLATE,
        title=f"{os.path.basename(repo_id.rstrip('/'))} (vlm_adapters adapter)",
        config=config,
        method=method,
        repo_id=repo_id,
        labels=", ".join(config.labels) or "(free text)",
        usage_labels=repr(config.labels or ["label a", "label b"]),
        metrics="\n".join(f"| {k} | {v:.4f} |" for k, v in metrics.items() if isinstance(v, (int, float)))
        or "| (not evaluated) | |",
        options="\n".join(
            f"| `{name}` | `{value!r}` |"
            for name, value in config.to_dict().items()
            if name not in ("vision_signature", "llm_signature", "labels")
        ),
    )


def push_to_hub(
    model: VisionLanguageCore,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str = "Upload vlm_adapters adapter",
    with_app: bool = False,
) -> str:
    """Create the repo if needed and upload the adapter folder (+ its app) through huggingface_hub."""
    create_repo(repo_id, private=private, token=token, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        write_adapter_files(model, tmp, repo_id, with_app)
        info = upload_folder(
            repo_id=repo_id, folder_path=tmp, token=token, revision=revision, commit_message=commit_message
        )
    return str(getattr(info, "commit_url", info))


def resolve_adapter_dir(source: str, *, revision: str | None, token: str | None, allow_pickle: bool) -> str:
    """A local adapter folder, or the Hub snapshot of a repo id (only json, safetensors and the card)."""
    if os.path.isdir(source):
        return source
    if os.path.exists(source):
        raise AdapterLoadError(f"{source} is a file; pass the adapter folder that holds {CONFIG_NAME}.")
    if os.path.isabs(source) or source.startswith((".", "~")) or source.count("/") > 1:  # not "owner/name"
        raise AdapterLoadError(f"{source}: no such adapter folder (nor a Hub repo id such as 'me/xray-adapter').")
    patterns = HUB_FILES + (["*.bin", "*.pt"] if allow_pickle else [])
    return snapshot_download(source, revision=revision, token=token, allow_patterns=patterns)


def check_weight_files(directory: str, config: AdapterConfig, allow_pickle: bool) -> None:
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


def check_peft_type(directory: str, config: AdapterConfig) -> None:
    """The method in PEFT's adapter_config.json must be the one vlm_adapter_config.json records."""
    if config.adapter == "none":
        return
    from peft import PeftConfig, PeftType

    found = PeftType(PeftConfig.from_pretrained(directory).peft_type).value
    expected = {"lora": "LORA", "prefix": "PREFIX_TUNING"}.get(config.adapter, config.peft_type)
    if found != expected:
        raise AdapterLoadError(
            f"{directory}/adapter_config.json holds a {found} adapter, but its {CONFIG_NAME} records {expected}; "
            "the folder mixes the files of two adapters. Save the adapter again."
        )


def read_projector(directory: str, allow_pickle: bool) -> dict[str, torch.Tensor]:
    path = os.path.join(directory, PROJECTOR_FILE)
    if os.path.exists(path):
        return load_file(path)
    if allow_pickle:
        pickled = next(os.path.join(directory, f) for f in os.listdir(directory) if f.startswith("projector"))
        return torch.load(pickled, map_location="cpu", weights_only=True)
    raise AdapterLoadError(f"{directory} has no {PROJECTOR_FILE}.")


def read_label_prior(directory: str, config: AdapterConfig) -> torch.nn.Module | None:
    """The saved label prior (`label_prior.py`), or None for a folder without one (LLM scores alone)."""
    path = os.path.join(directory, PRIOR_FILE)
    if not os.path.exists(path):
        return None
    try:
        return load_prior(path, config.labels)
    except ValueError as err:
        raise AdapterLoadError(str(err)) from err


def check_signature(kind: str, saved: dict[str, Any], found: dict[str, Any], name: str | None) -> None:
    if saved and saved != found:
        raise AdapterLoadError(
            f"this adapter was trained on a {kind} base with {saved}, but the {kind} base given "
            f"({name or 'in-memory module'}) has {found}. Load it onto the same base model it was trained on."
        )
