"""The PEFT adapter on the LLM: any method PEFT offers, given by name ("lora", "prefix") or as a config object.

The packed training forward and inference call the base transformers model (`VisionLanguageCore.feed`),
not PEFT's wrapper, so whatever a method adds in its own `forward` is added here instead: a prefix
becomes the KV cache the tokens follow (`prefix_length`, `VisionLanguageCore.prefix_cache`), AdaLoRA's
orthogonal regulariser joins the loss (`regularization`), and its rank budget is reallocated after
every optimizer step by a Trainer callback (`RankAllocation`), as PEFT requires. Prompt-learning
methods that prepend input embeddings (prompt tuning, P-tuning) would be skipped by that path, so
they are refused.
"""

from __future__ import annotations

import contextlib
import copy
import os
import warnings
from collections.abc import Iterator
from typing import Any

import peft
import torch
from peft import (
    LoraConfig,
    PeftConfig,
    PeftModel,
    PeftType,
    PrefixTuningConfig,
    TaskType,
    get_peft_model,
    prepare_model_for_kbit_training,
)
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import SAFETENSORS_WEIGHTS_NAME
from safetensors.torch import load_file
from transformers import PreTrainedModel, TrainerCallback

from .config import AdapterConfig
from .llm import disable_cpu_4bit_repacking, is_quantized

# Methods measured to compute on bitsandbytes layers exactly what they compute on the dequantized
# weights (tests/test_peft_methods.py checks every entry against the installed PEFT). LoHa, LoKr and HRA
# build their adapter from the shape of the packed 4-bit weight and fail on NF4; HRA on int8 runs but
# computes something else; DoRA on int8 fails inside PEFT on CPU.
QUANTIZED_METHODS = {
    "nf4": ("LORA", "DORA", "ADALORA", "IA3", "PREFIX_TUNING", "VERA", "OFT", "BOFT", "FOURIERFT", "LN_TUNING"),
    "int8": (
        "LORA", "ADALORA", "IA3", "PREFIX_TUNING", "VERA", "OFT", "BOFT", "FOURIERFT", "LN_TUNING", "LOHA", "LOKR"
    ),
}


def method_name(config: PeftConfig) -> str:
    """PEFT's type name, with DoRA apart from LoRA (PEFT types both as LORA; they differ on int8)."""
    if isinstance(config, LoraConfig) and config.use_dora:
        return "DORA"
    return PeftType(config.peft_type).value


def quantization_of(llm: PreTrainedModel) -> str | None:
    if getattr(llm, "is_loaded_in_4bit", False):
        return "nf4"
    return "int8" if getattr(llm, "is_loaded_in_8bit", False) else None


def check_method(config: PeftConfig, quantization: str | None) -> None:
    """Refuse, naming the fix, a PEFT config the packed forward cannot run or PEFT cannot run quantized."""
    if config.task_type not in (None, TaskType.CAUSAL_LM, TaskType.CAUSAL_LM.value):
        raise ValueError(
            f"{type(config).__name__}(task_type={config.task_type!r}): the LLM is a causal LM; "
            "leave task_type unset or pass TaskType.CAUSAL_LM."
        )
    if config.is_prompt_learning and not isinstance(config, PrefixTuningConfig):
        raise ValueError(
            f"{type(config).__name__} prepends trainable input embeddings inside PEFT's forward, which vlm_adapters' "
            "packed forward does not run. Use PrefixTuningConfig (its virtual tokens are a KV cache the "
            "prompt follows) or a LoRA-family method."
        )
    name = method_name(config)
    if quantization is not None and name not in QUANTIZED_METHODS[quantization]:
        raise ValueError(
            f"{name} on a {quantization} LLM is not supported: PEFT {peft.__version__} builds this adapter from "
            f"the packed quantized weight, which fails or computes something else. Attach with "
            f"quantization=None to train {name} in full precision, or use one of "
            f"{', '.join(QUANTIZED_METHODS[quantization])} on {quantization}."
        )


def peft_config(config: AdapterConfig, given: PeftConfig | None = None) -> PeftConfig | None:
    """PEFT config of the adapter: `given` (a copy, typed as a causal LM), or one built from the options."""
    if given is not None:
        given = copy.deepcopy(given)
        given.task_type = TaskType.CAUSAL_LM
        return given
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


def _freeze_constants(model: PeftModel) -> PeftModel:
    """PEFT 0.21 marks every parameter of a tuner layer trainable, AdaLoRA's `ranknum` too: a constant
    (the rank its scaling divides by) that is never saved, so training it made a reloaded adapter
    compute something else. Parameters a layer lists as non-adapter state stay frozen."""
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            for name in module.other_param_names:
                if isinstance(getattr(module, name, None), torch.nn.ParameterDict):
                    getattr(module, name).requires_grad_(False)
    return model


def _frozen(llm: PreTrainedModel) -> PreTrainedModel:
    if is_quantized(llm):
        # Casts norms to fp32 and makes input embeddings require grad; checkpointing is the Trainer's choice.
        llm = prepare_model_for_kbit_training(llm, use_gradient_checkpointing=False)
        disable_cpu_4bit_repacking(llm)
    return llm.requires_grad_(False)


@contextlib.contextmanager
def _peft_wrapping() -> Iterator[None]:
    """PEFT (0.21) reads transformers' deprecated `is_gradient_checkpointing` alias when it wraps a
    model, which prints a FutureWarning the user can do nothing about; only that one is silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def add_adapter(
    llm: PreTrainedModel, config: AdapterConfig, given: PeftConfig | None = None
) -> PreTrainedModel | PeftModel:
    """Freeze the LLM and wrap it with the adapter: `given` (a PEFT config object) or the one `config`
    names; left frozen for adapter='none'."""
    peft_cfg = peft_config(config, given)
    if peft_cfg is not None:
        check_method(peft_cfg, quantization_of(llm))
    llm = _frozen(llm)
    if peft_cfg is None:
        return _fast_4bit(llm, config)
    with _peft_wrapping():
        model = _freeze_constants(get_peft_model(llm, peft_cfg))
    return _fast_4bit(model, config)


def load_adapter(llm: PreTrainedModel, directory: str, config: AdapterConfig) -> PreTrainedModel | PeftModel:
    """Put saved PEFT weights (safetensors only) back on a freshly loaded base, through PEFT's own
    `PeftModel.from_pretrained`: whatever the method, its options are in PEFT's adapter_config.json."""
    if config.adapter == "none":
        return add_adapter(llm, config)
    saved = PeftConfig.from_pretrained(directory)
    check_method(saved, quantization_of(llm))
    # PEFT refuses to load prompt-learning adapters as trainable; their prompt encoder is unfrozen
    # by hand so a loaded prefix adapter can be trained further, like a loaded LoRA.
    prompt_learning = saved.is_prompt_learning
    with _peft_wrapping():
        model = PeftModel.from_pretrained(
            _frozen(llm), directory, is_trainable=not prompt_learning, use_safetensors=True
        )
    _freeze_constants(model)
    if prompt_learning:
        for name, param in model.named_parameters():
            param.requires_grad_("prompt_encoder" in name)
    if saved.peft_type == PeftType.ADALORA:
        _restore_exactly(model, directory)
    return _fast_4bit(model, config)


def _fast_4bit(model: PreTrainedModel | PeftModel, config: AdapterConfig) -> PreTrainedModel | PeftModel:
    """The one-node LoRA forward on 4-bit layers, and the kept dequantized weights if asked for."""
    if not is_quantized(model.get_base_model() if isinstance(model, PeftModel) else model):
        return model
    from .dequantized import keep_dequantized
    from .fast_lora import fuse_lora_4bit

    fuse_lora_4bit(model)
    if config.dequantize == "once":
        keep_dequantized(model)
    return model


def _restore_exactly(model: PeftModel, directory: str) -> None:
    """PEFT resizes AdaLoRA's modules to the saved rank pattern after casting the adapter to float32, so
    the new modules take the base layer's compute dtype and a bf16 base rounds the loaded weights
    (PEFT 0.21). The saved float32 values are put back (PEFT drops the adapter name from the keys)."""
    params = dict(model.named_parameters())
    saved = load_file(os.path.join(directory, SAFETENSORS_WEIGHTS_NAME))
    with torch.no_grad():
        for key, value in saved.items():
            params[f"{key}.{model.active_adapter}"].copy_(value)


def _active_config(llm: Any) -> PeftConfig | None:
    configs = getattr(llm, "peft_config", None)
    return configs.get(llm.active_adapter) if isinstance(configs, dict) and hasattr(llm, "active_adapter") else None


def prefix_length(llm: Any) -> int:
    """Virtual tokens of a prefix-tuning adapter (the KV cache every sequence follows); 0 for others."""
    config = _active_config(llm)
    return config.num_virtual_tokens if config is not None and config.is_prompt_learning else 0


def regularization(llm: Any) -> torch.Tensor | float:
    """What a PEFT method adds to the loss inside its own forward, which the packed forward bypasses.

    AdaLoRA: `orth_reg_weight` x the mean Frobenius distance of P P^T (lora_A) and Q^T Q (lora_B) from
    the identity, computed as in PEFT's `AdaLoraModel.forward` (PEFT offers it only inside that
    forward); tests check it against that forward. 0 for every other method.
    """
    config = _active_config(llm)
    if config is None or config.peft_type != PeftType.ADALORA:
        return 0.0
    if config.orth_reg_weight < 0:
        raise ValueError("AdaLoraConfig.orth_reg_weight must be >= 0.")
    name = llm.base_model.trainable_adapter_name
    terms = []
    for key, param in llm.base_model.model.named_parameters():
        if ("lora_A" in key or "lora_B" in key) and name in key:
            cov = param @ param.T if "lora_A" in key else param.T @ param
            terms.append(torch.linalg.matrix_norm(cov - torch.eye(*cov.shape, dtype=cov.dtype, device=cov.device)))
    return config.orth_reg_weight * torch.stack(terms).mean() if terms else 0.0


class RankAllocation(TrainerCallback):
    """AdaLoRA's budget step after each optimizer step, before the gradients are zeroed (PEFT's
    `update_and_allocate`, which reads them). Skipped while the adapter is frozen (the projector-only
    alignment stage): there are no gradients to read."""

    def __init__(self, llm: PeftModel) -> None:
        self.llm = llm

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        config = _active_config(self.llm)
        if self._trainable() and config.rank_pattern is not None:
            raise ValueError(
                "this AdaLoRA adapter has already allocated its ranks (it was trained or loaded), and PEFT's rank "
                "allocator cannot run again on it. Train AdaLoRA in one run, from a fresh attach(...)."
            )
        total = config.total_step
        if self._trainable() and state.max_steps != total:
            warnings.warn(
                f"AdaLoraConfig.total_step={total} but this training runs {state.max_steps} optimizer steps; "
                "AdaLoRA's rank budget follows total_step (tinit, tfinal), so set total_step to the steps trained.",
                stacklevel=2,
            )

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._trainable():
            self.llm.base_model.update_and_allocate(state.global_step)

    def _trainable(self) -> bool:
        name = self.llm.base_model.trainable_adapter_name
        return all(p.requires_grad for key, p in self.llm.named_parameters() if "lora_" in key and name in key)


def check_reloadable(llm: Any, what: str) -> None:
    """Refuse to load a checkpoint into a running AdaLoRA model: PEFT keeps the rank allocator's importance
    scores in memory only and saves pruned ranks resized, so the checkpoint no longer fits the modules."""
    config = _active_config(llm)
    if config is not None and config.peft_type == PeftType.ADALORA:
        raise ValueError(
            f"{what} is not supported with AdaLoRA: its rank allocation state lives in memory only and its "
            "checkpoints hold the pruned ranks resized. Train AdaLoRA in one run (no resume_from_checkpoint, "
            "no early_stopping_patience / load_best_model_at_end); the final adapter saves and loads as usual."
        )


def adapter_callbacks(llm: Any) -> list[TrainerCallback]:
    """Trainer callbacks the adapter's method needs (AdaLoRA's rank allocation), none for the others."""
    config = _active_config(llm)
    return [RankAllocation(llm)] if config is not None and config.peft_type == PeftType.ADALORA else []
