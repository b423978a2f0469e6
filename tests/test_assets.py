"""Tests for the offline assets: Fashion-MNIST, EfficientNet-Lite0 and the converted SmolLM2.

No network: everything is read from installed packages and local folders. The SmolLM2 conversion
(~20-30 s) runs once into the shared cache (`VLM_ADAPTERS_CACHE` or ~/.cache/vlm_adapters) and is
reused by later runs.

What each test proves:
- fashion_mnist_features: a `datasets.Dataset` with an Image column of 28x28 grey images and the 10 ClassLabel names.
- fashion_mnist_per_class_is_balanced_and_seeded: per_class rows of every class; the same seed, the same pixels;
  another seed, others.
- fashion_mnist_test_split_is_t10k: the test split is the 10,000-image t10k file, 1,000 per class.
- fashion_mnist_errors: a missing folder names the apt package; an unknown split is refused.
- fashion_mnist_per_class_too_large: asking for more rows than a class holds is refused.
- efficientnet_lite0_feature_map_and_safetensors_cache: [B, 1280, 7, 7] maps from images of any size; a reload reads
  safetensors only.
- efficientnet_lite0_normalisation_is_x_minus_127_over_128: the processor computes (x - 127) / 128 exactly.
- efficientnet_lite0_recognises_a_cat: ImageNet top-1 on a real photo is a cat: the weights and normalisation are the
  real ones.
- packaged_encoder_is_named_in_the_adapter: `attach("vlm_adapters:efficientnet-lite0", ...)` records that name, so the
  adapter reloads from its folder alone with the same probabilities (its card names no base_model, not a Hub id);
  its cached features are the in-memory module's;
  an unknown name is refused with the names known.
- smollm2_instruct_folder_loads_offline: the converted folder loads in transformers, has the chat template and EOS,
  and scores English far above chance.
- smollm2_instruct_reuses_cache: a second call returns the cached folder without converting again.
- build_folder_atomically: an interrupted build leaves nothing behind; an incomplete old folder is replaced.
"""

from __future__ import annotations

import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from conftest import needs_fashion_mnist
from huggingface_hub import ModelCard
from PIL import Image

from vlm_adapters import attach, load
from vlm_adapters.demo import assets
from vlm_adapters.demo.assets import (
    EFFICIENTNET_LITE0,
    FASHION_MNIST_LABELS,
    efficientnet_lite0,
    fashion_mnist,
    smollm2_instruct,
)
from vlm_adapters.features import vision_fingerprint
from vlm_adapters.files import write_folder_atomically


@pytest.fixture(scope="session")
def cache_dir() -> str:
    """The real asset cache, so the one slow conversion is shared by every run."""
    return assets.cache_root()


@pytest.fixture(scope="session")
def smollm2_path(cache_dir: str) -> str:
    return smollm2_instruct(cache_dir)


# --- Fashion-MNIST ---------------------------------------------------------------------------


@needs_fashion_mnist
def test_fashion_mnist_features() -> None:
    import datasets

    ds = fashion_mnist(per_class=2)
    assert isinstance(ds.features["image"], datasets.Image)
    assert isinstance(ds.features["label"], datasets.ClassLabel)
    assert ds.features["label"].names == FASHION_MNIST_LABELS
    image = ds[0]["image"]
    assert isinstance(image, Image.Image) and image.mode == "L" and image.size == (28, 28)


@needs_fashion_mnist
def test_fashion_mnist_per_class_is_balanced_and_seeded() -> None:
    ds = fashion_mnist(per_class=7, seed=3)
    assert len(ds) == 70
    assert np.bincount(ds["label"], minlength=10).tolist() == [7] * 10

    def pixels(d):
        return np.stack([np.asarray(row["image"]) for row in d])

    again = fashion_mnist(per_class=7, seed=3)
    assert again["label"] == ds["label"]
    np.testing.assert_array_equal(pixels(again), pixels(ds))
    assert not np.array_equal(pixels(fashion_mnist(per_class=7, seed=4)), pixels(ds))


@needs_fashion_mnist
def test_fashion_mnist_test_split_is_t10k() -> None:
    ds = fashion_mnist("test")
    assert len(ds) == 10_000
    assert np.bincount(ds["label"], minlength=10).tolist() == [1000] * 10


def test_fashion_mnist_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist(root=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="split"):
        fashion_mnist("validation")


@needs_fashion_mnist
def test_fashion_mnist_per_class_too_large() -> None:
    with pytest.raises(ValueError, match="per_class"):
        fashion_mnist("test", per_class=1001)


# --- EfficientNet-Lite0 ----------------------------------------------------------------------


def test_efficientnet_lite0_feature_map_and_safetensors_cache(tmp_path, monkeypatch) -> None:
    encoder, processor = efficientnet_lite0(cache_dir=str(tmp_path))
    cached = tmp_path / assets.EFFICIENTNET_LITE0_FILE
    assert cached.is_file()
    assert not encoder.training and encoder.num_channels == 1280

    # A grayscale (Fashion-MNIST-like) and an RGB image of other sizes both come out as [3, 224, 224].
    images = [Image.new("L", (28, 28), 200), Image.new("RGB", (320, 240), (10, 120, 250))]
    pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (2, 3, 224, 224)
    with torch.no_grad():
        features = encoder(pixel_values)
    assert features.shape == (2, 1280, 7, 7)

    # The second load reads only the safetensors file: unpickling would fail here.
    def no_pickle(*args, **kwargs):
        raise AssertionError("torch.load called although the safetensors cache exists")

    monkeypatch.setattr(torch, "load", no_pickle)
    encoder2, _ = efficientnet_lite0(cache_dir=str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(encoder2(pixel_values), features)


def test_efficientnet_lite0_normalisation_is_x_minus_127_over_128(tmp_path) -> None:
    _, processor = efficientnet_lite0(cache_dir=str(tmp_path))
    ramp = np.arange(256, dtype=np.uint8).reshape(16, 16)
    array = np.stack([ramp, ramp[::-1], ramp.T], axis=-1)
    out = processor(images=Image.fromarray(array), do_resize=False, return_tensors="pt")["pixel_values"][0]
    expected = (torch.from_numpy(array).permute(2, 0, 1).double() - 127) / 128
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-6)


def test_packaged_encoder_is_named_in_the_adapter(llm_dir, tmp_path) -> None:
    model = attach(EFFICIENTNET_LITE0, llm_dir, num_image_tokens=4)
    assert model.config.vision == EFFICIENTNET_LITE0
    images, labels = [Image.new("L", (28, 28), 200), Image.new("RGB", (40, 30), (10, 120, 250))], ["shirt", "bag"]
    reloaded = load(model.save_pretrained(str(tmp_path / "adapter")))  # no vision= / image_processor=
    assert ModelCard.load(str(tmp_path / "adapter" / "README.md")).data.base_model is None  # not a Hub id
    assert reloaded.classify(images, labels) == model.classify(images, labels)
    encoder, processor = efficientnet_lite0()
    in_memory = attach(encoder, llm_dir, image_processor=processor, num_image_tokens=4)
    assert vision_fingerprint(model.vision) == vision_fingerprint(in_memory.vision)
    with pytest.raises(ValueError, match=r"unknown packaged encoder 'vlm_adapters:resnet'.*efficientnet-lite0"):
        attach("vlm_adapters:resnet", llm_dir)


def test_efficientnet_lite0_recognises_a_cat(tmp_path) -> None:
    """ImageNet top-1 on a real photo: proves the weights and the normalisation are the right ones."""
    data = pytest.importorskip("skimage.data")
    encoder, processor = efficientnet_lite0(cache_dir=str(tmp_path))
    pixel_values = processor(images=Image.fromarray(data.chelsea()), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        top1 = encoder.classify(pixel_values).argmax(-1).item()
    assert 281 <= top1 <= 285  # tabby, tiger cat, Persian, Siamese, Egyptian cat


# --- SmolLM2-135M-Instruct -------------------------------------------------------------------


def test_smollm2_instruct_folder_loads_offline(smollm2_path: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer_config.json"):
        assert os.path.isfile(os.path.join(smollm2_path, name)), name
    with open(os.path.join(smollm2_path, "config.json")) as handle:
        assert "quantization_config" not in json.load(handle)  # a plain float checkpoint, not GGUF

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(smollm2_path, local_files_only=True)
    assert tokenizer.chat_template is not None
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token is not None and tokenizer.pad_token_id < model.config.vocab_size
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert "<|im_start|>user\nWhat is the capital of France?<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert ids["input_ids"].shape[0] == 1

    # Real weights: plain English is far more likely than under a random model (NLL ~ ln 49152 = 10.8).
    sentence = tokenizer("The capital of France is Paris. It is a large city in Europe.", return_tensors="pt")
    with torch.no_grad():
        loss = model(**sentence, labels=sentence["input_ids"]).loss.item()
    assert loss < 5.0


def test_smollm2_instruct_reuses_cache(smollm2_path: str, cache_dir: str) -> None:
    start = time.perf_counter()
    assert smollm2_instruct(cache_dir) == smollm2_path
    assert time.perf_counter() - start < 1.0


# --- atomic folder writes --------------------------------------------------------------------


def test_write_folder_atomically(tmp_path) -> None:
    target = str(tmp_path / "asset")

    def broken(folder: str) -> None:
        open(os.path.join(folder, "half"), "w").close()
        raise KeyboardInterrupt  # an interrupted conversion

    with pytest.raises(KeyboardInterrupt):
        write_folder_atomically(target, broken)
    assert os.listdir(tmp_path) == []  # neither the target nor the temp folder is left

    def good(folder: str) -> None:
        open(os.path.join(folder, "done"), "w").close()

    os.makedirs(target)  # an incomplete folder from older code is replaced
    assert write_folder_atomically(target, good) == target
    assert os.listdir(target) == ["done"] and os.listdir(tmp_path) == ["asset"]
