"""The language side: a causal LLM loaded in NF4 / int8 / full precision, with a PEFT adapter."""

from __future__ import annotations

import torch
from peft import LoraConfig, PeftModel, PrefixTuningConfig, TaskType, get_peft_model, prepare_model_for_kbit_training
from torch import nn
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, PreTrainedModel

from .config import AdapterConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device={str(device)!r} was asked for, but this machine has no CUDA GPU visible to torch. "
            "Pass device='cpu' (NF4 runs on CPU through bitsandbytes) or run on a GPU machine."
        )
    return device


def native_compute_dtype(device: torch.device) -> str:
    """bfloat16 where the hardware computes it natively (CUDA with bf16; CPUs with AVX512-BF16, where
    a bf16 matmul runs ~2.5x faster than fp32), else float32. NF4 weights are dequantized to it."""
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    avx512_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    return "bfloat16" if device.type == "cpu" and avx512_bf16() else "float32"


def quantization_config(config: AdapterConfig) -> BitsAndBytesConfig | None:
    if config.quantization == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=DTYPES[config.compute_dtype],
        )
    if config.quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def load_llm(
    name: str, config: AdapterConfig, device: torch.device, *, trust_remote_code: bool = False
) -> PreTrainedModel:
    """`AutoModelForCausalLM` in the configured precision, placed on `device`."""
    quant = quantization_config(config)
    return AutoModelForCausalLM.from_pretrained(
        name,
        revision=config.llm_revision,
        quantization_config=quant,
        dtype=DTYPES[config.compute_dtype] if quant is None else None,
        device_map={"": str(device)},
        trust_remote_code=trust_remote_code,
    )


def disable_cpu_4bit_repacking(model: nn.Module) -> None:
    """Keep bitsandbytes from repacking 4-bit weights for its CPU inference kernel.

    On CPUs with AVX512-BF16 a `Linear4bit` that runs in eval mode without grad repacks its weight
    in place and keeps it that way. Back in train mode `matmul_4bit` still takes that kernel, which
    has no autograd, so no gradient reaches the layers below or the projector (bitsandbytes 0.50: a
    zero-shot evaluation before `fit` silently ruined training), and unpacking is not exact. The
    plain path is ~1.5x slower per 4-bit matmul at inference, and always right.
    """
    from bitsandbytes.nn import Linear4bit

    for layer in model.modules():
        if isinstance(layer, Linear4bit):
            layer.support_avx512bf16_for_cpu = False


def is_quantized(model: PreTrainedModel) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def peft_config(config: AdapterConfig) -> LoraConfig | PrefixTuningConfig | None:
    if config.adapter == "lora":
        return LoraConfig(
            task_type=TaskType.CAUSAL_LM,
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=config.lora_target_modules,
        )
    if config.adapter == "prefix":
        return PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=config.num_prefix_tokens)
    return None


def add_adapter(llm: PreTrainedModel, config: AdapterConfig) -> PreTrainedModel | PeftModel:
    """Freeze the LLM and wrap it with the configured PEFT adapter (or leave it frozen for 'none')."""
    if is_quantized(llm):
        # Casts norms to fp32 and makes input embeddings require grad; checkpointing is the Trainer's choice.
        llm = prepare_model_for_kbit_training(llm, use_gradient_checkpointing=False)
        disable_cpu_4bit_repacking(llm)
    llm.requires_grad_(False)
    peft_cfg = peft_config(config)
    return llm if peft_cfg is None else get_peft_model(llm, peft_cfg)


def load_adapter(llm: PreTrainedModel, directory: str, config: AdapterConfig) -> PreTrainedModel | PeftModel:
    """Put saved PEFT weights (safetensors only) back on a freshly loaded base."""
    if config.adapter == "none":
        return add_adapter(llm, config)
    if is_quantized(llm):
        llm = prepare_model_for_kbit_training(llm, use_gradient_checkpointing=False)
        disable_cpu_4bit_repacking(llm)
    llm.requires_grad_(False)
    # PEFT refuses to load prompt-learning adapters as trainable; their prompt encoder is unfrozen
    # by hand so a loaded prefix adapter can be trained further, like a loaded LoRA.
    prompt_learning = config.adapter == "prefix"
    model = PeftModel.from_pretrained(llm, directory, is_trainable=not prompt_learning, use_safetensors=True)
    if prompt_learning:
        for name, param in model.named_parameters():
            param.requires_grad_("prompt_encoder" in name)
    return model
