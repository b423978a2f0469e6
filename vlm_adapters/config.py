"""Typed options: what `attach` builds (`AttachOptions`), what `fit` adds to the Trainer (`FitOptions`),
and what a saved adapter records (`AdapterConfig`).

One definition serves the Python API, the command line (transformers' `HfArgumentParser` turns each
field into a flag, `Literal` fields into choices, `metadata["help"]` into the help text) and the
validation of a config read back from disk, as PEFT's config dataclasses do.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import typing
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

CONFIG_NAME = "vlm_adapter_config.json"

AdapterKind = Literal["lora", "prefix", "none"]
# What a saved config records: "peft" for an adapter given as a PEFT config object (see `peft_type`).
SavedAdapterKind = Literal["lora", "prefix", "none", "peft"]
Quantization = Literal["nf4", "int8"]
ProjectorKind = Literal["linear", "mlp2x_gelu"]
PoolingKind = Literal["avg", "pixel_shuffle"]
ComputeDtype = Literal["auto", "float32", "bfloat16", "float16"]
Dequantize = Literal["per_forward", "per_call", "once"]


def option(default: Any, help: str, **kwargs: Any) -> Any:  # noqa: A002 - the metadata key HfArgumentParser reads
    """A dataclass field with `help` metadata: the flag help of the CLI (HfArgumentParser) and the docs."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


@dataclass
class AttachOptions:
    """How `attach` connects the encoder to the LLM; every field is also a `vlm-adapters train` flag."""

    adapter: AdapterKind = option("lora", "PEFT adapter on the LLM: LoRA, prefix tuning, or none (projector only)")
    quantization: Quantization | None = option("nf4", "LLM weights: 4-bit NF4 (double quant), int8, or None")
    projector: ProjectorKind = option("mlp2x_gelu", "linear (LLaVA) or Linear-GELU-Linear (LLaVA-1.5)")
    projector_norm: bool = option(
        True, "LayerNorm on the encoder features before the projector (needed for CNN feature maps; "
        "False gives LLaVA's exact projector, which merge_and_export needs)"
    )
    vision_feature_layer: int = option(-2, "hidden layer of a transformers encoder to take patch tokens from")
    num_image_tokens: int | None = option(None, "pool the patch tokens to this many image tokens (None: all)")
    pooling: PoolingKind = option("avg", "how to pool patch tokens: adaptive average or pixel shuffle")
    lora_r: int = option(16, "LoRA rank")
    lora_alpha: int = option(32, "LoRA alpha (scaling = alpha / r)")
    lora_dropout: float = option(0.0, "LoRA dropout")
    lora_target_modules: list[str] | str = option("all-linear", "LoRA target modules ('all-linear' or names)")
    num_prefix_tokens: int = option(16, "virtual tokens of prefix tuning")
    compute_dtype: ComputeDtype = option(
        "auto", "dtype the LLM computes in; auto: bf16 on CUDA, on a CPU the faster of bf16 and fp32"
    )
    dequantize: Dequantize = option(
        "per_forward", "when 4-bit weights are dequantized: in every pass (bitsandbytes' way, least memory); "
        "per_call: once per inference call (a compute-dtype copy while it runs); once: kept for training and "
        "inference (fastest on a CPU; costs 2 bytes per weight in bf16, 4 in fp32)"
    )
    image_size: int = option(224, "input size of the default image processor for a bare torch encoder")
    classify_prompt: str = option("What is shown in this image?", "the user prompt for classification")
    describe_prompt: str = option("Describe this image.", "the user prompt for describe")
    system_prompt: str | None = option(None, "system turn of the chat template (None: the template's default)")
    image_first: bool = option(
        False, "put the image before the prompt (LLaVA's order); after it, the image-independent head runs once"
    )

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise `ValueError` naming the bad field and the accepted values."""
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            allowed = _allowed(hints[f.name])
            if allowed is not None and not allowed[0](getattr(self, f.name)):
                raise self._bad(f.name, allowed[1])
        for name in ("lora_r", "lora_alpha", "num_prefix_tokens", "image_size"):
            if getattr(self, name) < 1:
                raise self._bad(name, "a positive integer")
        if self.num_image_tokens is not None and self.num_image_tokens < 1:
            raise self._bad("num_image_tokens", "None or a positive integer")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise self._bad("lora_dropout", "a float in [0, 1)")

    def _bad(self, name: str, allowed: str) -> ValueError:
        return ValueError(f"{type(self).__name__}.{name}={getattr(self, name)!r} is not valid; expected {allowed}.")


def _allowed(hint: Any) -> tuple[Any, str] | None:
    """(check, description) for a field's type hint; None where any value of the hint's type will do."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) is Literal:
        return (lambda v: v in args), " | ".join(repr(a) for a in args)
    if type(None) in args:  # Optional[X]
        inner = _allowed(next(a for a in args if a is not type(None)))
        if inner is None:
            return None
        return (lambda v: v is None or inner[0](v)), f"None or {inner[1]}"
    if hint is bool:
        return (lambda v: isinstance(v, bool)), "True or False"
    if hint is int:
        return (lambda v: isinstance(v, int) and not isinstance(v, bool)), "an integer"
    if hint is float:
        return (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)), "a number"
    if hint is str:
        return (lambda v: isinstance(v, str)), "a string"
    if args and set(args) == {list[str], str}:
        return (lambda v: isinstance(v, str) or _is_str_list(v)), "a string or a list of strings"
    if hint == list[str]:
        return _is_str_list, "a list of strings"
    if typing.get_origin(hint) is dict:
        return (lambda v: isinstance(v, dict)), "a JSON object"
    return None


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(x, str) for x in value)


@dataclass
class AdapterConfig(AttachOptions):
    """Everything needed to rebuild an attached model from its two bases: the attach options plus the
    names of the bases and what they looked like (so `load` can refuse a mismatching base).

    Written beside the trained weights as `vlm_adapter_config.json` and validated before any weight
    file is opened.
    """

    vision: str | None = option(None, "Hub id or local path of the vision encoder (None: an in-memory module)")
    llm: str | None = option(None, "Hub id or local path of the LLM (None: an in-memory module)")
    vision_revision: str | None = option(None, "revision of the vision encoder on the Hub")
    llm_revision: str | None = option(None, "revision of the LLM on the Hub")
    dataset: str | None = option(None, "Hub id of the training dataset, named in the model card")
    adapter: SavedAdapterKind = option(
        "lora", "lora / prefix / none, or 'peft' for an adapter given as a PEFT config object"
    )
    peft_type: str | None = option(
        None, "PEFT method of an adapter='peft' (e.g. 'ADALORA'); PEFT's adapter_config.json holds its options, "
        "and lora_* / num_prefix_tokens are unused"
    )
    vision_signature: dict[str, Any] = field(default_factory=dict)
    llm_signature: dict[str, Any] = field(default_factory=dict)
    labels: list[str] = field(default_factory=list)
    temperature: float = option(
        1.0, "divides the label scores before the softmax of classify / evaluate; set by model.calibrate"
    )
    format_version: int = 1

    def validate(self) -> None:
        super().validate()
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise self._bad("temperature", "a positive finite number")
        if (self.adapter == "peft") != (self.peft_type is not None):
            raise ValueError(
                f"AdapterConfig(adapter={self.adapter!r}, peft_type={self.peft_type!r}): adapter='peft' records an "
                "adapter given as a PEFT config object, with its peft_type. To attach one, pass the object itself: "
                "attach(..., adapter=LoraConfig(...))."
            )

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


@dataclass
class FitOptions:
    """What `fit` adds to transformers' `TrainingArguments` (whose fields it also takes by name)."""

    projector_lr: float = option(1e-3, "learning rate of the projector (the adapter uses learning_rate)")
    align_epochs: float = option(0.0, "epochs of projector-only training first (LLaVA's stage 1)")
    describe_ratio: float | None = option(
        None, "share of label rows taught as describe examples (None: 0.25 for label-only data, 0 when the data "
        "has answer rows)"
    )
    describe_template: str = option("This image shows {label}.", "the describe answer for a label row")
    cache_features: bool = option(True, "encode each image once and cache the encoder features on disk")
    feature_batch_size: int = option(32, "batch size of the encoder when filling the feature cache")
    skip_bad_images: bool = option(False, "drop unreadable images (counted and reported) instead of stopping")
    early_stopping_patience: int | None = option(None, "stop after this many evaluations without improvement")
    # `str` comes second so that HfArgumentParser reads the flag as text; __post_init__ parses it (as
    # TrainingArguments does for its dict-or-str fields).
    class_weight: dict[str, float] | str | None = option(
        None, "weight each row's answer loss by its class: 'balanced' (n_samples / (n_classes * count), "
        "scikit-learn's convention) or a JSON object {label: weight} (unnamed labels weigh 1)"
    )
    balanced_sampling: bool = option(
        False, "draw training rows with replacement so that every class is drawn equally often on average"
    )
    calibrate: bool = option(False, "fit a temperature on the eval split after training (see model.calibrate)")
    label_prior: bool = option(
        True, "label data: fit a linear probe on the cached pooled features and score labels as probe log-prob + "
        "gate * centred LLM log-likelihood, the gate (>= 0) fit after training on held-out rows (label_prior.py)"
    )
    prior_views: list[str] | None = option(
        None, "with label_prior: views of each label row's image that the probe also trains on ('shift': moved "
        "left and right by 1/14 of the width; 'flip': mirrored); None: shifts below 50 label rows per class, "
        "[] for none (prior_views.py)"
    )
    compile_layers: bool = option(
        False, "compile each decoder layer of the LLM with torch.compile (inductor) for the training steps: a "
        "one-time compile first, then faster steps, so it pays on long runs; inference stays eager (compiled.py)"
    )
    gate_holdout: float = option(
        0.2, "with label_prior and no eval split: the share of label rows (at most 500) kept out of the LLM's "
        "training to fit the gate on (0: fit it on the training rows, which the LLM has seen)"
    )

    def __post_init__(self) -> None:
        from .prior_views import check_view_kinds

        self.class_weight = parse_class_weight(self.class_weight)
        check_view_kinds(self.prior_views or [])


def parse_class_weight(value: Any) -> dict[str, float] | str | None:
    """None, 'balanced', or {label: positive weight}; a JSON string of that object is parsed (the CLI)."""
    if value is None or value == "balanced":
        return value
    parsed = value
    if isinstance(value, str):
        with contextlib.suppress(json.JSONDecodeError):
            parsed = json.loads(value)
    if not isinstance(parsed, dict) or not all(isinstance(k, str) and _positive(w) for k, w in parsed.items()):
        raise ValueError(
            f"class_weight={value!r} is not valid; expected None, 'balanced' or {{label: positive weight}} "
            """(on the command line a JSON object: --class_weight '{"pneumonia": 4.0}')."""
        )
    return {k: float(w) for k, w in parsed.items()}


def _positive(weight: Any) -> bool:
    return isinstance(weight, (int, float)) and not isinstance(weight, bool) and math.isfinite(weight) and weight > 0
