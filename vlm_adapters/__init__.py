"""vlm_adapters: attach a frozen vision encoder to a 4-bit LLM with a PEFT adapter (LoRA, prefix, AdaLoRA ...).

The public names load on first use (as transformers' top-level names do), so `import vlm_adapters`
pulls in none of torch, transformers, PEFT, bitsandbytes, datasets or scikit-learn.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# On CPUs with AVX512-BF16, importing bitsandbytes (PEFT does) logs "Failed to load CPU gemm_4bit_forward
# from kernels-community" when the `kernels` package is absent. That kernel serves only the repacked 4-bit
# CPU path, which this library turns off (`llm.disable_cpu_4bit_repacking`), so the message is dropped.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward")
)

# public name -> the module that defines it (no module shares a public name: an imported submodule
# would shadow it as an attribute of the package)
_EXPORTS = {
    "AdapterConfig": "config",
    "AttachOptions": "config",
    "FitOptions": "config",
    "AdapterLoadError": "hub",
    "ImageLoadError": "images",
    "PromptTooLongError": "prompting",
    "VLMCollator": "collator",
    "VisionLanguageModel": "model",
    "attach": "builder",
    "load": "builder",
    "load_data": "sources",
    "load_image": "images",
    "merge_and_export": "export",
    "split_for_eval": "data",
}

__all__ = ["__version__", *sorted(_EXPORTS)]

if TYPE_CHECKING:
    from .builder import attach, load
    from .collator import VLMCollator
    from .config import AdapterConfig, AttachOptions, FitOptions
    from .data import split_for_eval
    from .export import merge_and_export
    from .hub import AdapterLoadError
    from .images import ImageLoadError, load_image
    from .model import VisionLanguageModel
    from .prompting import PromptTooLongError
    from .sources import load_data


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vlm_adapters' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return __all__
