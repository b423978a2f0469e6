"""`dequantize="per_call"` / `"once"`: compute-dtype copies of the 4-bit weights give exactly the results
of dequantizing in every pass (bitsandbytes' way), and exist only when and while they should."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from conftest import colour_dataset

from vlm_adapters import VLMCollator, attach, load
from vlm_adapters.dequantized import _COPY

LABELS = ["red", "green", "blue"]


def copies(model) -> int:
    return sum(_COPY in m.__dict__ for m in model.base_llm.modules() if isinstance(m, bnb.nn.Linear4bit))


def layers(model) -> int:
    return sum(isinstance(m, bnb.nn.Linear4bit) for m in model.base_llm.modules())


def with_lora_values(model):
    """LoRA B starts at zero; give the LoRA term a value so that it takes part in the comparison."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    return model


@pytest.fixture(scope="module")
def images():
    ds = colour_dataset(2, seed=5)
    return [ds[i]["image"] for i in range(len(ds))]


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("adapter", ["lora", "prefix"])
def test_inference_equals_dequantizing_in_every_pass(llm_dir, vit_dir, images, compute_dtype, adapter):
    results = {}
    for mode in ("per_forward", "per_call", "once"):
        model = with_lora_values(attach(vit_dir, llm_dir, adapter=adapter, compute_dtype=compute_dtype,
                                        dequantize=mode))
        features = model.vision.encode_images(images)
        results[mode] = (
            model.score_labels(features, LABELS, "Colour?"),
            model.classify(images, LABELS, batch_size=2),
            model.predict(images, LABELS, batch_size=2),
            model.describe(images[:2], max_new_tokens=4),
        )
    plain = results["per_forward"]
    for mode in ("per_call", "once"):
        assert torch.equal(results[mode][0], plain[0]), mode
        assert results[mode][1:] == plain[1:], mode


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_training_with_kept_copies_equals_dequantizing_in_every_pass(llm_dir, vit_dir, compute_dtype):
    """Same loss and the same gradients for the projector and every LoRA weight, in the fused LoRA
    forward and in PEFT's own (lora_dropout > 0 takes PEFT's forward, on the base layer's)."""
    batch = None
    for dropout in (0.0, 0.1):
        grads = {}
        for mode in ("per_forward", "once"):
            model = with_lora_values(
                attach(vit_dir, llm_dir, compute_dtype=compute_dtype, dequantize=mode, lora_dropout=dropout)
            )
            if batch is None:
                ds = colour_dataset(3, seed=8)
                batch = VLMCollator(model, LABELS)([ds[i] for i in range(6)])
            model.train()
            torch.manual_seed(0)  # the same dropout masks
            loss = model(**batch).loss
            params = [p for p in model.parameters() if p.requires_grad]
            grads[mode] = (loss, torch.autograd.grad(loss, params))
        assert torch.equal(grads["once"][0], grads["per_forward"][0])
        for got, want in zip(grads["once"][1], grads["per_forward"][1]):
            assert want.abs().sum() > 0
            assert torch.equal(got, want)


def test_copies_exist_only_when_and_while_they_should(llm_dir, vit_dir, images, tmp_path, monkeypatch):
    plain = attach(vit_dir, llm_dir)
    assert plain.config.dequantize == "per_forward" and copies(plain) == 0
    kept = attach(vit_dir, llm_dir, dequantize="once")
    assert copies(kept) == layers(kept) > 0
    reloaded = load(kept.save_pretrained(str(tmp_path / "adapter")), vision=vit_dir, llm=llm_dir)
    assert reloaded.config.dequantize == "once" and copies(reloaded) == layers(reloaded)
    per_call = attach(vit_dir, llm_dir, dequantize="per_call")
    seen = []
    predict_labels = per_call.predict_labels
    monkeypatch.setattr(per_call, "predict_labels", lambda *a: seen.append(copies(per_call)) or predict_labels(*a))
    per_call.predict(images, LABELS, batch_size=2)
    assert seen == [layers(per_call)] * 3  # every batch of the call ran on the copies
    assert copies(per_call) == 0  # freed when the call ended
    per_call.train()
    ds = colour_dataset(1, seed=2)
    per_call(**VLMCollator(per_call, LABELS)([ds[i] for i in range(3)])).loss.backward()
    assert copies(per_call) == 0  # training dequantizes in every pass
