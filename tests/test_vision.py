"""Every encoder kind: transformers ViT / CLIP / SigLIP / DINOv2 (by path and as a module), timm, any CNN."""

from __future__ import annotations

import pytest
import torch
from conftest import colour_dataset, save_vision
from PIL import Image
from torch import nn
from transformers import AutoModel, ViTImageProcessor

from vlm_adapters import attach
from vlm_adapters.vision import VisionTower

# 32 px images, 8 px patches -> a 4x4 grid of 16 patch tokens; CLS (and registers) are dropped.
GRID = 16


@pytest.fixture(scope="module")
def image():
    return colour_dataset(1, seed=4)[0]["image"]


@pytest.mark.parametrize("family", ["vit", "clip", "siglip", "dinov2"])
def test_hf_encoders_by_path_and_as_module(tmp_path, llm_dir, image, family):
    path = save_vision(str(tmp_path / family), family)
    model = attach(path, llm_dir)
    tokens = model.vision.encode_images([image])
    assert tokens.shape == (1, GRID, 32)
    # layer -2 by default (LLaVA): the penultimate hidden state without CLS
    encoder = model.vision.encoder
    pixels = model.vision.preprocess([image])
    hidden = encoder(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(tokens, hidden[:, hidden.shape[1] - GRID :])
    assert model.config.vision == path
    # the same encoder passed in memory, with its processor
    module = AutoModel.from_pretrained(path)
    module = getattr(module, "vision_model", module)
    in_memory = attach(module, llm_dir, image_processor=ViTImageProcessor.from_pretrained(path))
    assert in_memory.config.vision is None
    assert in_memory.vision.encode_images([image]).shape == (1, GRID, 32)
    assert set(in_memory.classify(image, ["red", "blue"])) == {"red", "blue"}


def test_feature_layer_is_configurable(tmp_path, llm_dir, vit_dir, image):
    last = attach(vit_dir, llm_dir, vision_feature_layer=-1).vision.encode_images([image])
    penultimate = attach(vit_dir, llm_dir).vision.encode_images([image])
    assert last.shape == penultimate.shape and not torch.allclose(last, penultimate)


def test_timm_models(llm_dir, image):
    timm = pytest.importorskip("timm")
    for name in ("test_vit", "test_resnet"):
        encoder = timm.create_model(name, pretrained=False)
        model = attach(encoder, llm_dir)
        assert model.vision.kind == "timm"
        out = model.vision.encode_images([image])
        assert out.ndim == 3 and out.shape[1] > 0
        if name == "test_vit":  # prefix (CLS) tokens dropped
            assert out.shape[1] == encoder.patch_embed.num_patches
        assert sum(model.classify(image, ["red", "blue"]).values()) == pytest.approx(1.0, abs=1e-5)


class TinyCNN(nn.Module):
    """Any module returning a feature map [B, C, H, W]."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 24, 3, stride=4), nn.BatchNorm2d(24), nn.ReLU())

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.body(pixel_values)


def test_generic_feature_map_module_is_frozen_and_flattened(tmp_path, llm_dir, image):
    cnn = TinyCNN()
    model = attach(cnn, llm_dir, image_size=32)
    out = model.vision.encode_images([image])
    assert out.shape == (1, 8 * 8, 24)  # 32 px, kernel 3, stride 4 -> 8x8 map
    model.train()
    assert not cnn.training  # batch-norm statistics stay frozen
    assert not any(p.requires_grad for p in cnn.parameters())
    before = cnn.body[1].running_mean.clone()
    model.fit([{"image": image, "label": "red"}, {"image": image, "label": "blue"}], max_steps=1,
              output_dir=str(tmp_path), save_strategy="no", disable_tqdm=True)
    assert torch.equal(before, cnn.body[1].running_mean)


def test_encoder_without_patch_tokens_is_a_clear_error(llm_dir):
    class Pooled(nn.Module):
        def forward(self, pixel_values):
            return pixel_values.mean(dim=(1, 2, 3))  # [B]: no tokens at all

    with pytest.raises(ValueError, match="no patch tokens"):
        attach(Pooled(), llm_dir)


def test_vision_tower_runs_without_autograd(vit_dir):
    tower = VisionTower.from_pretrained(vit_dir)
    out = tower.encode_images([Image.new("RGB", (40, 30), "red")])
    assert not out.requires_grad and out.dtype == torch.float32
