"""The checkpoints users pass: full CLIPModel / SiglipModel ones (text tower included) and DINOv2 with
registers give exactly the encoder's patch tokens and learn a task; the text tower gives the zero-shot
baseline, as transformers' zero-shot-image-classification pipeline computes it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import colour_dataset, colour_image, save_image_text, save_vision
from transformers import AutoModel, ViTImageProcessor, pipeline

from vlm_adapters import attach
from vlm_adapters.features import vision_fingerprint
from vlm_adapters.vision import VisionTower

LABELS = ["red", "green", "blue"]
# leading tokens before the 4x4 patch grid: CLS for CLIP, none for SigLIP, CLS + 2 registers for DINOv2
DROPPED = {"clip": 1, "siglip": 0, "dinov2_registers": 3}


def checkpoint(tmp_path_factory, family: str) -> str:
    path = str(tmp_path_factory.mktemp(family))
    return save_vision(path, family) if family == "dinov2_registers" else save_image_text(path, family)


@pytest.fixture(scope="module", params=list(DROPPED))
def family_dir(request, tmp_path_factory) -> tuple[str, str]:
    return request.param, checkpoint(tmp_path_factory, request.param)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(5)
    return [colour_image(name, rng) for name in LABELS]


def encoder_hidden_states(path: str, family: str, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The encoder's own hidden states, from a separate load of the checkpoint."""
    model = AutoModel.from_pretrained(path).eval()
    vision = model if family == "dinov2_registers" else model.vision_model
    with torch.no_grad():
        return vision(pixel_values=pixels, output_hidden_states=True).hidden_states


@pytest.mark.parametrize("layer", [-2, -1, 1])
def test_patch_tokens_are_the_encoders_hidden_states_without_cls_and_registers(family_dir, llm_dir, images, layer):
    family, path = family_dir
    model = attach(path, llm_dir, vision_feature_layer=layer)
    assert (model.vision.image_text_model is not None) == (family != "dinov2_registers")
    assert model.vision.kind == "hf" and type(model.vision.encoder).__name__.endswith("Model")
    pixels = model.vision.preprocess(images)
    text_calls = []
    if model.vision.image_text_model is not None:  # kept for clip_classify, never run to encode images
        model.vision.image_text_model.text_model.register_forward_hook(lambda *args: text_calls.append(1))
    tokens = model.vision.encode_images(images)
    assert not text_calls
    hidden = encoder_hidden_states(path, family, pixels)[layer]
    assert hidden.shape[1] == 16 + DROPPED[family] and tokens.shape == (3, 16, 32)
    assert torch.equal(tokens, hidden[:, DROPPED[family] :])
    assert model.config.vision_signature == {"num_tokens": 16, "hidden_size": 32}


def test_registers_are_dropped_when_the_processor_size_differs_from_the_config(tmp_path, images):
    """Real DINOv2 checkpoints say image_size=518 but their processor crops 224: the patch grid then
    comes from the pixels, and CLS + registers are still the leading 3."""
    path = save_vision(str(tmp_path / "dinov2"), "dinov2_registers")
    tower = VisionTower.from_pretrained(path, image_processor=ViTImageProcessor(size={"height": 48, "width": 48}))
    pixels = tower.preprocess(images)
    hidden = encoder_hidden_states(path, "dinov2_registers", pixels)[-2]
    assert hidden.shape[1] == 36 + 3
    assert torch.equal(tower.encode_images(images), hidden[:, 3:])


def test_feature_cache_fingerprint_ignores_the_text_tower(tmp_path):
    """The cache key of a full checkpoint is the one of its vision model alone, as before the text tower
    was kept: the text weights do not enter it, the vision weights do."""
    path = save_image_text(str(tmp_path / "clip"), "clip")
    tower = VisionTower.from_pretrained(path)
    alone = VisionTower(AutoModel.from_pretrained(path).vision_model, tower.image_processor, source=tower.source)
    assert alone.image_text_model is None
    assert vision_fingerprint(tower) == vision_fingerprint(alone)
    with torch.no_grad():
        tower.image_text_model.text_model.embeddings.token_embedding.weight.add_(1.0)
        assert vision_fingerprint(tower) == vision_fingerprint(alone)
        next(tower.encoder.parameters()).add_(1.0)
    assert vision_fingerprint(tower) != vision_fingerprint(alone)


def test_full_checkpoints_learn_the_colour_task_and_report_the_zero_shot_baseline(
    tmp_path, family_dir, llm_dir, colours
):
    family, path = family_dir
    train, test = colours
    model = attach(path, llm_dir)
    result = model.fit(train, test, output_dir=str(tmp_path / "run"), num_train_epochs=6, learning_rate=5e-3,
                       projector_lr=5e-3, disable_tqdm=True, save_strategy="no")
    assert result["eval_accuracy"] >= 0.9  # chance is 0.33
    if family == "dinov2_registers":
        with pytest.raises(ValueError, match="text tower"):
            model.evaluate(test, zero_shot_baseline=True)
        return
    metrics = model.evaluate(test, zero_shot_baseline=True)
    assert metrics["accuracy"] == result["eval_accuracy"]
    top = [max(p, key=p.get) for p in model.clip_classify([row["image"] for row in test], LABELS)]
    expected = np.mean([label == LABELS[i] for label, i in zip(top, test["label"], strict=True)])
    assert metrics["clip_zero_shot_accuracy"] == pytest.approx(expected)


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_clip_classify_gives_the_pipelines_probabilities(tmp_path, llm_dir, images, family):
    path = save_image_text(str(tmp_path / family), family)
    model = attach(path, llm_dir)
    ours = model.clip_classify(images, LABELS)
    reference = pipeline("zero-shot-image-classification", model=path)
    for image, probs in zip(images, ours, strict=True):
        theirs = {row["label"]: row["score"] for row in reference(image, candidate_labels=LABELS)}
        assert list(probs) == list(theirs)  # most likely first, as the pipeline orders them
        for label in LABELS:
            assert probs[label] == pytest.approx(theirs[label], abs=1e-6)
    assert len(set(ours[0].values())) == 3  # the labels are told apart
    total = sum(ours[0].values())
    assert total == pytest.approx(1.0) if family == "clip" else total != pytest.approx(1.0)
    single = model.clip_classify(images[0], LABELS, template="a {} square")
    assert isinstance(single, dict) and single != ours[0]


def test_clip_classify_without_a_text_tower_fails_clearly(tmp_path, llm_dir, images):
    import timm

    vision_only = attach(save_vision(str(tmp_path / "clip_vision"), "clip"), llm_dir)
    cnn = attach(torch.nn.Conv2d(3, 8, 8, stride=8), llm_dir, image_size=32)
    vit = attach(timm.create_model("test_vit", pretrained=False), llm_dir)
    for model in (vision_only, cnn, vit):
        with pytest.raises(ValueError, match="CLIP / SigLIP checkpoint with its text tower"):
            model.clip_classify(images, LABELS)
    with pytest.raises(ValueError, match="text tower"):
        vision_only.evaluate(colour_dataset(1), zero_shot_baseline=True)


def test_an_in_memory_full_model_needs_its_tokenizer(tmp_path, llm_dir, images):
    from transformers import AutoImageProcessor, AutoTokenizer

    path = save_image_text(str(tmp_path / "clip"), "clip")
    model = attach(AutoModel.from_pretrained(path), llm_dir, image_processor=AutoImageProcessor.from_pretrained(path))
    assert model.vision.encode_images(images).shape == (3, 16, 32)
    with pytest.raises(ValueError, match="tokenizer="):
        model.clip_classify(images, LABELS)
    by_path = attach(path, llm_dir).clip_classify(images, LABELS)
    assert model.clip_classify(images, LABELS, tokenizer=AutoTokenizer.from_pretrained(path)) == by_path
