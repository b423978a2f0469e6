"""Tiny random models built from configs and saved to temp dirs, as transformers' own tests do.

Nothing here touches the network: HF_HUB_OFFLINE is forced on for the whole session.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Feature caches and converted assets of the test session live in a throw-away folder.
# Worker processes started by tests inherit the session's folder instead of making their own.
if "VLM_ADAPTERS_TEST_CACHE" not in os.environ:
    os.environ["VLM_ADAPTERS_TEST_CACHE"] = tempfile.mkdtemp(prefix="vlm-adapters-test-cache-")
_SESSION_CACHE = os.environ["VLM_ADAPTERS_TEST_CACHE"]
os.environ["VLM_ADAPTERS_CACHE"] = _SESSION_CACHE

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import TrainerCallback

from vlm_adapters.demo.assets import FASHION_MNIST_ROOT

# The real-data tests need Debian's dataset-fashion-mnist, which setup.sh installs.
needs_fashion_mnist = pytest.mark.skipif(
    not os.path.isdir(FASHION_MNIST_ROOT), reason="apt-get install dataset-fashion-mnist"
)

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 60, 220)}
CORPUS = [
    "What is shown in this image? Describe this image. This image shows red green blue.",
    "a photo of a cat dog bird shape circle square triangle the color of the object is",
    "pneumonia normal chest x-ray leaf healthy rust scab defect scratch dent ok",
] * 20


def train_tokenizer(chat_template: str | None = CHATML, with_pad: bool = True):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"] + (["<pad>"] if with_pad else [])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        CORPUS,
        trainers.BpeTrainer(
            vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>" if chat_template else "<|endoftext|>",
        pad_token="<pad>" if with_pad else None,
    )
    if chat_template:
        fast.chat_template = chat_template
    return fast


def llm_config(family: str, vocab_size: int):
    """Tiny LLMs. initializer_range=0.2: with the default 0.02 a 64-wide model's tied embeddings are so
    small that no logit can grow large, and the loss cannot fall far enough to test learning."""
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    if family == "llama":
        return LlamaConfig(
            vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
            initializer_range=0.2,
        )
    if family == "qwen2":
        return Qwen2Config(
            vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2,
        )
    if family == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=256, initializer_range=0.2)
    raise ValueError(family)


def save_llm(path: str, family: str = "llama", chat_template: str | None = CHATML, with_pad: bool = True) -> str:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    tokenizer = train_tokenizer(chat_template, with_pad)
    model = AutoModelForCausalLM.from_config(llm_config(family, len(tokenizer)))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_vision(path: str, family: str = "vit", hidden_size: int = 32, image_size: int = 32) -> str:
    from transformers import (
        CLIPVisionConfig,
        CLIPVisionModel,
        Dinov2Config,
        Dinov2Model,
        Dinov2WithRegistersConfig,
        Dinov2WithRegistersModel,
        SiglipVisionConfig,
        SiglipVisionModel,
        ViTConfig,
        ViTImageProcessor,
        ViTModel,
    )

    torch.manual_seed(0)
    common = dict(hidden_size=hidden_size, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                  image_size=image_size, patch_size=8)
    if family == "vit":
        model = ViTModel(ViTConfig(**common), add_pooling_layer=False)
    elif family == "clip":
        model = CLIPVisionModel(CLIPVisionConfig(**common))
    elif family == "siglip":
        model = SiglipVisionModel(SiglipVisionConfig(**common))
    elif family == "dinov2":
        model = Dinov2Model(Dinov2Config(**common))
    elif family == "dinov2_registers":  # CLS + 2 registers before the patch tokens, all to be dropped
        model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=2, **common))
    else:
        raise ValueError(family)
    model.save_pretrained(path)
    ViTImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(path)
    return path


def save_image_text(path: str, family: str = "clip") -> str:
    """A full CLIPModel / SiglipModel checkpoint, text tower included (as openai/clip-vit-base-patch32 and
    google/siglip-base-patch16-224 are), with its image processor and a tokenizer that ends texts with EOS."""
    from tokenizers import processors
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, SiglipConfig, SiglipImageProcessor, SiglipModel

    torch.manual_seed(0)
    tokenizer = train_tokenizer(chat_template=None)
    tokenizer.eos_token = "<|im_end|>"  # not id 2, which CLIP's text model takes for its legacy pooling
    eos = tokenizer.eos_token_id
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="$A <|im_end|>", special_tokens=[("<|im_end|>", eos)]
    )
    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    vision = dict(common, image_size=32, patch_size=8)
    text = dict(common, vocab_size=len(tokenizer), max_position_embeddings=64, bos_token_id=eos, eos_token_id=eos,
                pad_token_id=tokenizer.pad_token_id)
    if family == "clip":
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
        processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    elif family == "siglip":
        model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
        processor = SiglipImageProcessor(size={"height": 32, "width": 32})
    else:
        raise ValueError(family)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session", autouse=True)
def _remove_session_cache():
    yield
    shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def llm_dir(tmp_path_factory) -> str:
    return save_llm(str(tmp_path_factory.mktemp("llama")), "llama")


@pytest.fixture(scope="session")
def vit_dir(tmp_path_factory) -> str:
    return save_vision(str(tmp_path_factory.mktemp("vit")), "vit")


def colour_image(name: str, rng: np.random.Generator, size: int = 32) -> Image.Image:
    """A coloured square on a noisy grey background: a tiny task a random encoder can separate."""
    array = rng.integers(90, 140, size=(size, size, 3)).astype(np.uint8)
    lo, hi = rng.integers(2, 10), rng.integers(22, 30)
    array[lo:hi, lo:hi] = np.clip(np.array(COLOURS[name]) + rng.integers(-20, 20, 3), 0, 255)
    return Image.fromarray(array)


def colour_dataset(n_per_class: int, seed: int = 0):
    import datasets

    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    rows = [(colour_image(name, rng), i) for i, name in enumerate(names) for _ in range(n_per_class)]
    return datasets.Dataset.from_dict(
        {"image": [r[0] for r in rows], "label": [r[1] for r in rows]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)}),
    )


def object_image(name: str, rng: np.random.Generator, size: int = 64, side: int = 16):
    """A `side`-pixel square of colour `name` at a random place on grey noise, and its box
    (left, top, right, bottom): a task whose evidence sits at a known place (the pointing game)."""
    array = rng.integers(90, 140, size=(size, size, 3)).astype(np.uint8)
    left, top = (int(v) for v in rng.integers(0, size - side + 1, 2))
    array[top : top + side, left : left + side] = np.clip(np.array(COLOURS[name]) + rng.integers(-20, 20, 3), 0, 255)
    return Image.fromarray(array), (left, top, left + side, top + side)


def object_dataset(n_per_class: int, seed: int = 0, size: int = 64, side: int = 16):
    """`object_image`s of every colour as a dataset (label = the colour), and their boxes in row order."""
    import datasets

    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    rows = [(*object_image(name, rng, size, side), i) for i, name in enumerate(names) for _ in range(n_per_class)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    columns = {"image": [r[0] for r in rows], "label": [r[2] for r in rows]}
    dataset = datasets.Dataset.from_dict(columns, features=features)
    return dataset, [r[1] for r in rows]


@pytest.fixture(scope="session")
def colours():
    return colour_dataset(24, seed=0), colour_dataset(10, seed=1)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> str:
    path = str(tmp_path / "cache")
    monkeypatch.setenv("VLM_ADAPTERS_CACHE", path)
    return path


class StepCounter(TrainerCallback):
    """Records the global step after each optimizer step a `fit` runs (a resumed run runs only the rest)."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


def _hub_response(request):
    """The Hub API's answers to what `create_repo` + `upload_folder` send (nothing is stored)."""
    import httpx2 as httpx

    path = request.url.path
    if path == "/api/repos/create":
        body = json.loads(request.content)
        repo = f"{body.get('organization')}/{body['name']}"
        return httpx.Response(200, json={"url": f"https://huggingface.co/{repo}", "name": repo})
    if path == "/api/validate-yaml":  # the model card's metadata
        return httpx.Response(200, json={"errors": [], "warnings": []})
    if "/preupload/" in path:
        files = json.loads(request.content)["files"]
        return httpx.Response(200, json={"files": [
            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None} for f in files
        ]})
    if "/commit/" in path:
        return httpx.Response(200, json={
            "commitUrl": "https://huggingface.co/me/colours/commit/" + "c" * 40, "commitOid": "c" * 40,
            "commitMessage": "Upload", "pullRequestUrl": None,
        })
    return httpx.Response(404, json={"error": f"unexpected {request.method} {path}"})


@pytest.fixture
def fake_hub(monkeypatch):
    """Only the network is replaced: huggingface_hub builds its real HTTP requests (create repo,
    preupload, commit) and an in-process transport answers them. Yields the requests sent."""
    import httpx2 as httpx  # the HTTP client huggingface_hub is built on
    import huggingface_hub
    from huggingface_hub.utils._http import default_client_factory

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    requests: list = []

    def handler(request):
        requests.append(request)
        return _hub_response(request)

    huggingface_hub.set_client_factory(lambda: httpx.Client(transport=httpx.MockTransport(handler)))
    try:
        yield requests
    finally:
        huggingface_hub.set_client_factory(default_client_factory)
        huggingface_hub.close_session()


def uploaded_files(requests) -> dict[str, bytes]:
    """Path -> content of every file in the commit request huggingface_hub sent."""
    commit = next(r for r in requests if "/commit/" in r.url.path)
    lines = [json.loads(line) for line in commit.content.decode().splitlines()]
    files = [line["value"] for line in lines if line["key"] == "file"]
    return {entry["path"]: base64.b64decode(entry["content"]) for entry in files}
