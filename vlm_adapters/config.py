"""`AdapterConfig`: every `attach` option in one validated, JSON-serialisable dataclass.

It is written beside the trained weights as `vlm_adapter_config.json` and is the first thing
`load` reads, so it is validated *before* any weight file is opened.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any

CONFIG_NAME = "vlm_adapter_config.json"
PROJECTOR_KINDS = ("linear", "mlp2x_gelu")
ADAPTER_KINDS = ("lora", "prefix", "none")
QUANTIZATIONS = ("nf4", "int8", None)
COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16")
POOLING_KINDS = ("avg", "pixel_shuffle")


@dataclass
class AdapterConfig:
    """Everything needed to rebuild an attached model from its two bases."""

    vision: str | None = None
    llm: str | None = None
    vision_revision: str | None = None
    llm_revision: str | None = None
    adapter: str = "lora"
    quantization: str | None = "nf4"
    projector: str = "mlp2x_gelu"
    # LayerNorm on the encoder features before the projector: needed for CNN feature maps; turn it
    # off for a ViT (CLIP / SigLIP) to get LLaVA's exact projector, which `merge_and_export` requires.
    projector_norm: bool = True
    vision_feature_layer: int = -2
    num_image_tokens: int | None = None
    pooling: str = "avg"
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_target_modules: list[str] | str = "all-linear"
    num_prefix_tokens: int = 16
    compute_dtype: str = "auto"  # attach resolves it: bf16 on CUDA; on CPU the faster of bf16 / fp32, timed
    image_size: int = 224
    # Filled in by `attach`: what the bases looked like, so `load` can refuse a mismatching base.
    vision_signature: dict[str, Any] = field(default_factory=dict)
    llm_signature: dict[str, Any] = field(default_factory=dict)
    classify_prompt: str = "What is shown in this image?"
    describe_prompt: str = "Describe this image."
    system_prompt: str | None = None
    # The user turn: prompt then image (False), or LLaVA's image then prompt (True). Text first lets
    # the model run the image-independent head once per batch (once per call at inference); see prompting.py.
    image_first: bool = False
    labels: list[str] = field(default_factory=list)
    format_version: int = 1

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise `ValueError` naming the bad field and the accepted values."""

        def bad(name: str, allowed: Any) -> ValueError:
            return ValueError(f"AdapterConfig.{name}={getattr(self, name)!r} is not valid; expected {allowed}.")

        if self.adapter not in ADAPTER_KINDS:
            raise bad("adapter", " | ".join(ADAPTER_KINDS))
        if self.quantization not in QUANTIZATIONS:
            raise bad("quantization", '"nf4" | "int8" | None')
        if self.projector not in PROJECTOR_KINDS:
            raise bad("projector", " | ".join(PROJECTOR_KINDS))
        if self.pooling not in POOLING_KINDS:
            raise bad("pooling", " | ".join(POOLING_KINDS))
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise bad("compute_dtype", " | ".join(COMPUTE_DTYPES))
        for name in ("lora_r", "lora_alpha", "num_prefix_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise bad(name, "a positive integer")
        if self.num_image_tokens is not None and (
            not isinstance(self.num_image_tokens, int) or self.num_image_tokens < 1
        ):
            raise bad("num_image_tokens", "None or a positive integer")
        for name in ("projector_norm", "image_first"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "True or False")
        if not isinstance(self.vision_feature_layer, int) or isinstance(self.vision_feature_layer, bool):
            raise bad("vision_feature_layer", "an integer layer index such as -1 or -2")
        if not isinstance(self.lora_dropout, (int, float)) or not 0.0 <= self.lora_dropout < 1.0:
            raise bad("lora_dropout", "a float in [0, 1)")
        if not isinstance(self.lora_target_modules, (str, list)):
            raise bad("lora_target_modules", '"all-linear" or a list of module names')
        if not isinstance(self.labels, list) or not all(isinstance(x, str) for x in self.labels):
            raise bad("labels", "a list of strings")
        for name in ("vision_signature", "llm_signature"):
            if not isinstance(getattr(self, name), dict):
                raise bad(name, "a JSON object")
        for name in ("classify_prompt", "describe_prompt"):
            if not isinstance(getattr(self, name), str):
                raise bad(name, "a string")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json_string(self) -> str:
        """What the Trainer's loggers (TensorBoard, W&B) record as the model's config."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"Unknown keys {unknown} in {CONFIG_NAME}; it was written by a newer vlm_adapters "
                "or edited by hand. Upgrade vlm_adapters or remove those keys."
            )
        # Adapters saved before the field existed were trained with the image first.
        return cls(**{"image_first": True, **data})

    def save(self, directory: str | os.PathLike) -> None:
        with open(os.path.join(directory, CONFIG_NAME), "w", encoding="utf-8") as fh:
            fh.write(self.to_json_string())

    @classmethod
    def load(cls, directory: str | os.PathLike) -> AdapterConfig:
        path = os.path.join(directory, CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{path} not found: this folder is not a vlm_adapters adapter "
                "(save one with model.save_pretrained(dir))."
            )
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path} is not valid JSON ({err}); the adapter folder is damaged.") from err
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a JSON object, found {type(data).__name__}.")
        return cls.from_dict(data)
