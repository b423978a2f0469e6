"""Every encoder kind: transformers ViT / CLIP / SigLIP / DINOv2 (by path and as a module), timm, any CNN.

What each test proves:
- hf_encoders_by_path_and_as_module: ViT, CLIP, SigLIP, DINOv2 and DINOv2 with registers give the penultimate layer's
  patch tokens with CLS and registers dropped, by path and in memory.
- feature_layer_is_configurable: vision_feature_layer=-1 gives other features than the default -2.
- timm_models: timm ViTs give forward_features without prefix tokens, timm CNNs their feature map flattened per
  position.
- generic_feature_map_module_is_frozen_and_flattened: any [B, C, H, W] module is flattened, frozen, and keeps its
  batch-norm statistics through fit.
- encoder_without_patch_tokens_is_a_clear_error: an encoder returning no tokens is refused by name.
- vision_tower_runs_without_autograd: encoding returns float32 features without a graph.
"""

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


@pytest.mark.parametrize("family", ["vit", "clip", "siglip", "dinov2", "dinov2_registers"])
def test_hf_encoders_by_path_and_as_module(tmp_path, llm_dir, image, family):
    path = save_vision(str(tmp_path / family), family)
    model = attach(path, llm_dir)
    tokens = model.vision.encode_images([image])
    assert tokens.shape == (1, GRID, 32)
    # layer -2 by default (LLaVA): the penultimate hidden state without CLS
    encoder = model.vision.encoder
    pixels = model.vision.preprocess([image])
    hidden = encoder(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
    prefix = {"siglip": 0, "dinov2_registers": 3}.get(family, 1)  # CLS (+ registers) come first
    assert hidden.shape[1] == prefix + GRID
    torch.testing.assert_close(tokens, hidden[:, prefix:])
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
        with torch.no_grad():
            features = encoder.forward_features(model.vision.preprocess([image]))
        if name == "test_vit":  # tokens [B, prefix + patches, C]: the prefix (CLS) tokens dropped
            assert encoder.num_prefix_tokens > 0
            expected = features[:, encoder.num_prefix_tokens :]
            assert expected.shape[1] == encoder.patch_embed.num_patches
        else:  # a feature map [B, C, H, W] -> one token per position
            expected = features.flatten(2).transpose(1, 2)
        torch.testing.assert_close(out, expected)
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
