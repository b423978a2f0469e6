"""The language side: a causal LLM loaded in NF4 / int8 / full precision (its PEFT adapter: `adapters.py`)."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, PreTrainedModel

from .compute_dtype import cpu_compute_dtype
from .config import AdapterConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`device`, or accelerate's choice: under torchrun each rank takes its own GPU (`cuda:LOCAL_RANK`)."""
    if device is None:
        if not torch.cuda.is_available():
            # On a CPU, leave accelerate's process state to TrainingArguments (use_cpu), which sets it up
            # for multi-process runs; creating it here first would fix it without the CPU flag.
            return torch.device("cpu")
        from accelerate import PartialState

        return PartialState().device
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device={str(device)!r} was asked for, but this machine has no CUDA GPU visible to torch. "
            "Pass device='cpu' (NF4 runs on CPU through bitsandbytes) or run on a GPU machine."
        )
    return device


def native_compute_dtype(device: torch.device) -> str:
    """The faster of bfloat16 and float32 on `device`; NF4 weights are dequantized to it.

    CUDA: bfloat16 where supported. CPU: AVX512-BF16 alone does not make bf16 faster (some CPUs
    with it run fp32 matmuls faster, others bf16; docs/benchmarks.md), so the two are timed, once
    per machine (`compute_dtype.py`). `attach` writes the result into the saved config, so a reload
    computes the same way.
    """
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    if device.type != "cpu":
        return "float32"
    return cpu_compute_dtype()


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
    model = None
    if quant is not None:
        model = _load_quantized_unmapped(name, config.llm_revision, quant, device, trust_remote_code)
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(
            name,
            revision=config.llm_revision,
            quantization_config=quant,
            dtype=DTYPES[config.compute_dtype] if quant is None else None,
            device_map={"": str(device)},
            trust_remote_code=trust_remote_code,
        )
    disable_cpu_4bit_repacking(model)
    return model


def _load_quantized_unmapped(
    name: str, revision: str | None, quant: BitsAndBytesConfig, device: torch.device, trust_remote_code: bool
) -> PreTrainedModel | None:
    """Quantize a full-precision safetensors checkpoint on load, one mapped tensor at a time.

    transformers maps each checkpoint file once; quantizing touches every page, and mapped pages
    count in the process's resident memory until the load ends, so an NF4 load peaked above a bf16
    one (the whole bf16 file plus the quantized copy). Here each tensor is mapped on its own
    (`_MappedTensor`) and unmapped once quantized. transformers accepts such a state dict only
    without a path, on the concrete class, so this covers built-in architectures with safetensors
    weights; anything else (remote code, .bin, GGUF) returns None and loads the usual way.
    """
    from safetensors import safe_open
    from transformers import AutoConfig, GenerationConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
    from transformers.utils.hub import cached_file, get_checkpoint_shard_files

    llm_config = AutoConfig.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(llm_config), None)
    if model_class is None or getattr(llm_config, "quantization_config", None) is not None:
        return None  # remote code, or weights already quantized: nothing to gain
    found = {"_raise_exceptions_for_missing_entries": False, "revision": revision}
    index = cached_file(name, "model.safetensors.index.json", **found)
    if index is not None:
        files, _ = get_checkpoint_shard_files(name, index, revision=revision)
    else:
        single = cached_file(name, "model.safetensors", **found)
        if single is None:
            return None
        files = [single]
    state_dict: dict[str, Any] = {}
    for path in files:
        with safe_open(path, framework="pt") as handle:  # reads the header only
            state_dict.update({key: _MappedTensor(path, key) for key in handle.keys()})
    model = model_class.from_pretrained(
        None, config=llm_config, state_dict=state_dict, quantization_config=quant, device_map={"": str(device)}
    )
    model.config.name_or_path = model.name_or_path = name  # what a load by path records (PEFT reads it)
    try:
        model.generation_config = GenerationConfig.from_pretrained(name, revision=revision)
    except OSError:  # no generation_config.json: keep the one derived from the model config
        pass
    return model


class _MappedTensor:
    """A checkpoint tensor that transformers materializes with `[...]`, as it does safetensors slices.

    Each one maps its file anew and returns a view of that mapping, so the pages leave the process
    when transformers drops the tensor after quantizing it. Reading into anonymous memory instead
    (safetensors' `pread` backend) left the heap fragmented and the peak higher (docs/benchmarks.md).
    """

    def __init__(self, path: str, key: str) -> None:
        self.path, self.key = path, key

    def __getitem__(self, index: Any) -> torch.Tensor:
        from safetensors import safe_open

        _release_free_heap()

        with safe_open(self.path, framework="pt") as handle:  # the returned view keeps its mapping alive
            return handle.get_tensor(self.key)[index]


@functools.cache
def _libc() -> Any:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") else None  # glibc only


def _release_free_heap() -> None:
    """Hand the heap's free pages back to the OS (glibc's `malloc_trim`; a no-op elsewhere).

    Quantizing a tensor allocates full-precision temporaries of tens of MB, and glibc serves
    the next ones from its heap between the small quantized blocks it keeps, so freed pages
    stayed resident well above the weights at the end of a load. Trimming before
    each tensor returns them.
    """
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def disable_cpu_4bit_repacking(model: nn.Module) -> None:
    """Keep bitsandbytes from repacking 4-bit weights for its CPU inference kernel.

    On CPUs with AVX512-BF16 a `Linear4bit` that runs in eval mode without grad repacks its weight
    in place and keeps it that way. Back in train mode `matmul_4bit` still takes that kernel, which
    has no autograd, so no gradient reaches the layers below or the projector (bitsandbytes 0.50: a
    zero-shot evaluation before `fit` silently ruined training), and unpacking is not exact. The
    plain path is slower per 4-bit matmul at inference, and always right.
    """
    from bitsandbytes.nn import Linear4bit

    for layer in model.modules():
        if isinstance(layer, Linear4bit):
            layer.support_avx512bf16_for_cpu = False


def is_quantized(model: PreTrainedModel) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))
