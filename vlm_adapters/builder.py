"""Build a `VisionLanguageModel` on its two bases: fresh (`attach`) or from a saved adapter (`load`).

`attach` puts a trainable projector and a PEFT adapter between a frozen encoder and an LLM; `load`
rebuilds the same model from an adapter folder or Hub repo, refusing bases that do not match the
recorded signatures, and reading weights from safetensors only.
"""

from __future__ import annotations

from typing import Any

import torch
from peft import PeftConfig, PeftType
from PIL import Image
from torch import nn
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .adapters import add_adapter, check_method, load_adapter
from .config import AdapterConfig
from .hub import (
    AdapterLoadError,
    check_peft_type,
    check_signature,
    check_weight_files,
    read_label_prior,
    read_projector,
    resolve_adapter_dir,
)
from .llm import is_quantized, load_llm, native_compute_dtype, resolve_device
from .model import VisionLanguageModel
from .projector import Projector
from .vision import Preprocessor, VisionTower


def build_vision(
    vision: str | nn.Module, config: AdapterConfig, image_processor: Preprocessor | None, trust_remote_code: bool
) -> VisionTower:
    if isinstance(vision, VisionTower):
        return vision
    if isinstance(vision, str):
        return VisionTower.from_pretrained(
            vision,
            revision=config.vision_revision,
            image_processor=image_processor,
            feature_layer=config.vision_feature_layer,
            trust_remote_code=trust_remote_code,
        )
    if isinstance(vision, nn.Module):
        return VisionTower(vision, image_processor, config.vision_feature_layer, config.image_size)
    raise TypeError(f"vision must be a Hub id, a local path or a torch module; got {type(vision).__name__}.")


def build_llm(
    llm: str | PreTrainedModel, config: AdapterConfig, device: torch.device, trust_remote_code: bool
) -> PreTrainedModel:
    if isinstance(llm, str):
        return load_llm(llm, config, device, trust_remote_code=trust_remote_code)
    if isinstance(llm, PreTrainedModel):
        return llm
    raise TypeError(f"llm must be a Hub id, a local path or a transformers PreTrainedModel; got {type(llm).__name__}.")


def vision_signature(vision: VisionTower) -> dict[str, Any]:
    """Token count and width from one dry run on a blank image (the processor resizes it): works
    for every encoder kind without knowing its architecture."""
    tokens = vision.encode_images([Image.new("RGB", (224, 224))])
    return {"num_tokens": int(tokens.shape[1]), "hidden_size": int(tokens.shape[2])}


def llm_signature(llm: PreTrainedModel) -> dict[str, Any]:
    config = llm.config.get_text_config()
    return {
        "model_type": config.model_type,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers,
        "vocab_size": config.vocab_size,
    }


def assemble(
    config: AdapterConfig,
    vision: str | nn.Module,
    llm: str | PreTrainedModel,
    *,
    tokenizer: PreTrainedTokenizerBase | None,
    image_processor: Preprocessor | None,
    device: str | torch.device | None,
    trust_remote_code: bool,
) -> tuple[VisionTower, Projector, PreTrainedModel, PreTrainedTokenizerBase]:
    """Load both bases and a fresh projector; shared by `attach` and `load`."""
    device = resolve_device(device)
    if config.compute_dtype == "auto":
        config.compute_dtype = native_compute_dtype(device)
    tower = build_vision(vision, config, image_processor, trust_remote_code).to(device)
    base = build_llm(llm, config, device, trust_remote_code)
    if tokenizer is None:
        source = config.llm or getattr(base, "name_or_path", None)
        if not source:
            raise ValueError("the llm was passed as a module without a name; pass tokenizer= as well.")
        tokenizer = AutoTokenizer.from_pretrained(
            source, revision=config.llm_revision, trust_remote_code=trust_remote_code
        )
    signature = vision_signature(tower)
    projector = Projector(
        signature["hidden_size"],
        llm_signature(base)["hidden_size"],
        config.projector,
        num_vision_tokens=signature["num_tokens"],
        num_image_tokens=config.num_image_tokens,
        pooling=config.pooling,
        norm=config.projector_norm,
    ).to(device)
    config.vision_signature, config.llm_signature = signature, llm_signature(base)
    if isinstance(llm, PreTrainedModel) and config.quantization is not None and not is_quantized(llm):
        config.quantization = None  # an in-memory model is used as given; record what it really is
    return tower, projector, base, tokenizer


def attach(
    vision: str | nn.Module,
    llm: str | PreTrainedModel,
    *,
    adapter: str | PeftConfig = "lora",
    quantization: str | None = "nf4",
    projector: str = "mlp2x_gelu",
    tokenizer: PreTrainedTokenizerBase | None = None,
    image_processor: Preprocessor | None = None,
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
    seed: int | None = 0,
    **options: Any,
) -> VisionLanguageModel:
    """Freeze `vision`, load `llm` (NF4 by default), add a projector and a PEFT adapter.

    `vision` and `llm` are Hub ids, local folders or already-loaded modules (`vision` also a packaged encoder's
    name, "vlm_adapters:efficientnet-lite0"); an adapter on named bases reloads from its folder alone. `adapter`
    is "lora", "prefix", "none" (projector only) or a PEFT config object: `LoraConfig` (also with `use_dora` /
    `use_rslora`), `AdaLoraConfig` (with `total_step`), `IA3Config`, `PrefixTuningConfig`, ...; a method PEFT
    cannot run on the quantized LLM is refused with the fix (`adapters.QUANTIZED_METHODS`). Further options are
    the fields of `AdapterConfig` (e.g. `vision_feature_layer=-2`, `num_image_tokens=16`, `lora_r=16`,
    `num_prefix_tokens=16`, `compute_dtype="bfloat16"`, `system_prompt=...`, `projector_norm=False` for LLaVA's
    exact projector, which `merge_and_export` needs).
    """
    if seed is not None:
        torch.manual_seed(seed)  # the projector and adapter initialisations are then reproducible
    given = adapter if isinstance(adapter, PeftConfig) else None
    if given is not None and isinstance(llm, str):
        check_method(given, quantization)  # before the LLM is loaded
    config = AdapterConfig(
        vision=vision if isinstance(vision, str) else None,
        llm=llm if isinstance(llm, str) else None,
        adapter="peft" if given is not None else adapter,
        peft_type=None if given is None else PeftType(given.peft_type).value,
        quantization=quantization,
        projector=projector,
        **options,
    )
    tower, proj, base, tokenizer = assemble(
        config,
        vision,
        llm,
        tokenizer=tokenizer,
        image_processor=image_processor,
        device=device,
        trust_remote_code=trust_remote_code,
    )
    return VisionLanguageModel(config, tower, proj, add_adapter(base, config, given), tokenizer)


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
    check_weight_files(directory, config, allow_pickle)
    check_peft_type(directory, config)
    vision_source = vision if vision is not None else config.vision
    llm_source = llm if llm is not None else config.llm
    for kind, value in (("vision", vision_source), ("llm", llm_source)):
        if value is None:
            raise AdapterLoadError(
                f"this adapter was attached to an in-memory {kind} module, so its config names no {kind} base to "
                f"rebuild from. Pass load({source!r}, {kind}=<the same {kind} model or its path>)."
            )
    saved = {"vision": dict(config.vision_signature), "llm": dict(config.llm_signature)}
    tower, projector, base, tokenizer = assemble(
        config, vision_source, llm_source, tokenizer=tokenizer, image_processor=image_processor, device=device,
        trust_remote_code=trust_remote_code,
    )
    check_signature("vision", saved["vision"], config.vision_signature, _name(vision_source))
    check_signature("llm", saved["llm"], config.llm_signature, _name(llm_source))
    try:
        projector.load_state_dict(read_projector(directory, allow_pickle), strict=True)
    except RuntimeError as err:
        raise AdapterLoadError(f"projector weights in {directory} do not fit this configuration: {err}") from err
    model = VisionLanguageModel(config, tower, projector, load_adapter(base, directory, config), tokenizer)
    prior = read_label_prior(directory, config)
    model.label_prior = prior.to(model.device) if prior is not None else None
    return model


def _name(source: Any) -> str | None:
    return source if isinstance(source, str) else None
