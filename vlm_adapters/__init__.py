"""vlm_adapters: attach a frozen vision encoder to a 4-bit LLM with LoRA or prefix adapters."""

from .attach import attach
from .config import AdapterConfig
from .data import VLMCollator, load_data, split_for_eval
from .export import merge_and_export
from .hub import AdapterLoadError, load
from .images import ImageLoadError, load_image
from .model import VisionLanguageModel
from .prompting import PromptTooLongError

__version__ = "0.1.0"

__all__ = [
    "AdapterConfig",
    "AdapterLoadError",
    "ImageLoadError",
    "PromptTooLongError",
    "VLMCollator",
    "VisionLanguageModel",
    "__version__",
    "attach",
    "load",
    "load_data",
    "load_image",
    "merge_and_export",
    "split_for_eval",
]
