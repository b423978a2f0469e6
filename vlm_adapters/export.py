"""`merge_and_export`: a trained model as a plain transformers `LlavaForConditionalGeneration`.

The adapter is merged into a full-precision copy of the LLM (never into NF4 / int8 weights, which
cannot hold the sum exactly), an `<image>` token is added to the tokenizer, and encoder +
projector + merged LLM are written under transformers' Llava weight names beside a
`LlavaProcessor`. transformers then loads the folder by itself, with no vlm_adapters code, and
computes the same logits.

Only what Llava itself can express is exported: a CLIP or SigLIP vision model (`hidden_states` of
`vision_feature_layer`, CLS dropped for CLIP), no token pooling, an `mlp2x_gelu` projector without
the input LayerNorm (`projector_norm=False`) and an adapter PEFT merges into weights (LoRA, DoRA,
AdaLoRA, IA3: tested; not prefix tuning) or none. Anything else raises a
`ValueError` that says what to change.
"""

from __future__ import annotations

import copy
import os
import warnings

import torch
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.image_processing_base import ImageProcessingMixin

from .files import write_folder_atomically
from .llm import is_quantized
from .modeling import VisionLanguageCore

IMAGE_TOKEN = "<image>"
# vision config model_type -> (Llava's vision_feature_select_strategy, leading non-patch tokens)
ENCODERS = {"clip_vision_model": ("default", 1), "siglip_vision_model": ("full", 0)}


def check_exportable(model: VisionLanguageCore) -> tuple[str, int]:
    """Raise a `ValueError` naming what transformers' Llava cannot express, and how to avoid it.

    Returns the vision feature select strategy and the number of CLS tokens of the encoder.
    """
    config = model.config
    encoder = model.vision.encoder
    model_type = getattr(getattr(encoder, "config", None), "model_type", None)
    if model.vision.kind != "hf" or model_type not in ENCODERS:
        raise ValueError(
            f"merge_and_export needs a transformers CLIPVisionModel or SiglipVisionModel as the vision encoder "
            f"(the ViT families transformers' Llava runs); this model's encoder is {type(encoder).__name__}"
            f"{f' ({model_type})' if model_type else ''}. Attach a CLIP or SigLIP vision checkpoint to export, "
            "or keep using vlm_adapters' save_pretrained / load for other encoders."
        )
    if model.num_prefix_tokens:
        raise ValueError(
            "merge_and_export cannot merge a prefix-tuning adapter: its virtual tokens are extra key/values, "
            "not weights a plain LLM has. Train with adapter='lora' (or 'none') to export."
        )
    if not isinstance(model.llm, (PreTrainedModel, PeftModel)):
        raise ValueError(f"merge_and_export needs a transformers LLM; got {type(model.llm).__name__}.")
    if config.projector != "mlp2x_gelu":
        raise ValueError(
            f"merge_and_export needs projector='mlp2x_gelu' (Llava's Linear-GELU-Linear projector); this model "
            f"uses projector={config.projector!r}. Attach with projector='mlp2x_gelu' to export."
        )
    if not isinstance(model.projector.norm, nn.Identity):
        raise ValueError(
            "merge_and_export needs a projector without the input LayerNorm, which transformers' Llava projector "
            "does not have; this model was attached with projector_norm=True (the default). Attach (and train) "
            "with projector_norm=False to export."
        )
    if model.projector.pooling != "none":
        raise ValueError(
            f"merge_and_export needs one image token per encoder patch, but this model pools "
            f"{model.projector.num_vision_tokens} patch tokens to {model.projector.num_image_tokens} "
            f"({model.projector.pooling!r}), which transformers' Llava cannot do. Attach with "
            "num_image_tokens=None to export."
        )
    strategy, num_cls = ENCODERS[model_type]
    vision_config = encoder.config
    grid = (vision_config.image_size // vision_config.patch_size) ** 2
    if model.projector.num_vision_tokens != grid:
        raise ValueError(
            f"the encoder gave {model.projector.num_vision_tokens} patch tokens but its {vision_config.image_size}px "
            f"config has {grid} patches; the image processor resizes to another size than the encoder's image_size. "
            "Use an image processor that resizes to the encoder's image_size to export."
        )
    if not isinstance(model.vision.image_processor, ImageProcessingMixin):
        raise ValueError(
            f"merge_and_export writes the encoder's image processor for transformers to load, but this model's is "
            f"{type(model.vision.image_processor).__name__}. Attach with a transformers image processor "
            "(image_processor=AutoImageProcessor.from_pretrained(...)) to export."
        )
    return strategy, num_cls


def full_precision_llm(model: VisionLanguageCore) -> PreTrainedModel:
    """The LLM with the adapter merged into float32 weights, on the CPU.

    A base named by path / Hub id is reloaded in float32 (the in-memory one may be NF4, int8 or
    bfloat16) and the trained adapter weights are put on it and merged.
    An in-memory base is copied, which only works when it is not quantized.
    """
    config = model.config
    if config.llm is None:
        if is_quantized(model.base_llm):
            raise ValueError(
                "this model's LLM was passed as a quantized in-memory module, so there is no full-precision copy to "
                "merge the LoRA into. Attach (or load) with the LLM's path or Hub id, or with an unquantized module."
            )
        llm = copy.deepcopy(model.llm).to("cpu", torch.float32)
        return llm.merge_and_unload() if isinstance(llm, PeftModel) else llm
    base = AutoModelForCausalLM.from_pretrained(config.llm, revision=config.llm_revision, dtype=torch.float32)
    if not isinstance(model.llm, PeftModel):
        return base
    # The trained adapter, moved onto the float32 base in memory through PEFT's own state-dict functions.
    adapter = PeftModel(base, copy.deepcopy(model.llm.peft_config["default"]))
    set_peft_model_state_dict(adapter, get_peft_model_state_dict(model.llm))
    return adapter.merge_and_unload().float()


def tokenizer_with_image_token(tokenizer: PreTrainedTokenizerBase) -> tuple[PreTrainedTokenizerBase, int]:
    """A copy of the tokenizer with `<image>` as a special token (never split, never merged with text)."""
    tokenizer = copy.deepcopy(tokenizer)
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"extra_special_tokens": [IMAGE_TOKEN]}, replace_extra_special_tokens=False)
    ids = tokenizer.encode(IMAGE_TOKEN, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"the tokenizer splits {IMAGE_TOKEN!r} into {ids}; it cannot be used as the image token.")
    return tokenizer, ids[0]


def make_room_for(llm: PreTrainedModel, token_id: int) -> None:
    """Grow the embeddings when `token_id` is past them. The new rows are zero: the image token's
    input row is never looked up (Llava overwrites those positions) and its logit stays 0."""
    rows = llm.get_input_embeddings().weight.shape[0]
    if token_id < rows:
        return  # padded vocabularies (Qwen, Llama-3 ...) already have an unused row for it
    llm.resize_token_embeddings(token_id + 1, mean_resizing=False)
    with torch.no_grad():
        llm.get_input_embeddings().weight[rows:] = 0
        head = llm.get_output_embeddings()
        if head is not None:
            head.weight[rows:] = 0
            if getattr(head, "bias", None) is not None:
                head.bias[rows:] = 0


def build_llava(
    model: VisionLanguageCore, llm: PreTrainedModel, image_token_id: int, strategy: str
) -> LlavaForConditionalGeneration:
    """Llava built on the meta device (no random initialisation of a full model), then given the
    real encoder copy, projector and merged LLM as its sub-modules under transformers' names."""
    encoder = model.vision.encoder
    config = LlavaConfig(
        vision_config=copy.deepcopy(encoder.config),
        text_config=llm.config,
        image_token_id=image_token_id,
        image_seq_length=model.projector.num_image_tokens,
        vision_feature_layer=model.vision.feature_layer,
        vision_feature_select_strategy=strategy,
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
    )
    with torch.device("meta"):
        llava = LlavaForConditionalGeneration(config)
    vision = AutoModel.from_config(config.vision_config).float()
    wanted = vision.state_dict().keys()  # e.g. CLIPVisionModelWithProjection also has a projection head
    vision.load_state_dict({k: v.detach().cpu() for k, v in encoder.state_dict().items() if k in wanted})
    projector = type(llava.model.multi_modal_projector)(config)
    first, _, second = model.projector.proj
    # The per-channel standardisation (x - mean) * scale is affine: fold it into linear_1.
    mean, scale = model.projector.feature_mean, model.projector.feature_scale
    weight = first.weight * scale
    projector.load_state_dict(
        {
            "linear_1.weight": weight, "linear_1.bias": first.bias - weight @ mean,
            "linear_2.weight": second.weight, "linear_2.bias": second.bias,
        }
    )
    llava.model.vision_tower = vision.eval()
    llava.model.multi_modal_projector = projector.to("cpu", torch.float32)
    llava.model.language_model = llm.base_model
    llava.lm_head = llm.get_output_embeddings()
    left = [name for name, t in [*llava.named_parameters(), *llava.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"export left {left[:5]} without weights; this LLM's layout is not the one Llava expects.")
    if llm.generation_config is not None:
        llava.generation_config = copy.deepcopy(llm.generation_config)
    return llava.eval()


def write_export(model: VisionLanguageCore, directory: str) -> None:
    strategy, num_cls = check_exportable(model)
    tokenizer, image_token_id = tokenizer_with_image_token(model.tokenizer)
    llm = full_precision_llm(model)
    make_room_for(llm, image_token_id)
    llava = build_llava(model, llm, image_token_id, strategy)
    llava.save_pretrained(directory)
    processor = LlavaProcessor(
        image_processor=model.vision.image_processor,
        tokenizer=tokenizer,
        patch_size=model.vision.encoder.config.patch_size,
        vision_feature_select_strategy=strategy,
        chat_template=model.prompts.template,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=num_cls,
    )
    processor.save_pretrained(directory)


def merge_and_export(model: VisionLanguageCore, directory: str | os.PathLike[str]) -> str:
    """Merge the adapter into a float32 copy of the LLM and write a transformers Llava checkpoint.

    The folder holds a `LlavaForConditionalGeneration` and a `LlavaProcessor` (with an `<image>` token
    that the processor expands to one token per patch), loadable with
    `LlavaForConditionalGeneration.from_pretrained(directory)` and `AutoProcessor.from_pretrained(directory)`.
    Needs a CLIP / SigLIP encoder, `projector="mlp2x_gelu"`, `projector_norm=False`, no pooling and a
    LoRA-family / IA3 (or no) adapter; otherwise raises `ValueError` saying what to change. Written atomically:
    `directory` is either the old folder or the complete new one. Returns its absolute path.
    """
    check_exportable(model)  # before any loading or writing
    if getattr(model, "label_prior", None) is not None:
        warnings.warn("a Llava checkpoint has no place for the label prior (label_prior.py): the exported model "
                      "scores labels with the LLM alone, which can classify worse than this one.", stacklevel=2)
    return write_folder_atomically(directory, lambda staging: write_export(model, staging))
