"""fit / evaluate with transformers' Trainer on the coloured-squares task (chance = 1/3)."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import colour_dataset
from safetensors.torch import load_file

from vlm_adapters import attach
from vlm_adapters.features import FEATURES_COLUMN, with_image_features

FAST = dict(learning_rate=5e-3, projector_lr=5e-3, disable_tqdm=True, logging_steps=3)


def _losses(result):
    return [row["loss"] for row in result["log_history"] if "loss" in row]


@pytest.mark.parametrize("adapter", ["lora", "prefix"])
def test_fit_learns_the_colour_task(tmp_path, llm_dir, vit_dir, colours, adapter):
    train, test = colours
    model = attach(vit_dir, llm_dir, adapter=adapter)
    before = model.evaluate(test)["accuracy"]
    result = model.fit(train, test, output_dir=str(tmp_path / "run"), num_train_epochs=6, **FAST)
    losses = _losses(result)
    assert losses[-1] < losses[0] / 2, losses
    assert result["eval_accuracy"] >= 0.9 > before + 0.3  # chance is 0.33
    assert result["eval_macro_f1"] >= 0.85
    assert set(result["eval_per_class"]) == {"red", "green", "blue"}
    assert os.path.exists(tmp_path / "run" / "training_curves.png")
    assert os.path.exists(tmp_path / "run" / "confusion_matrix.png")
    assert max(model.classify(test[0]["image"], ["red", "green", "blue"]).items(), key=lambda kv: kv[1])[0] == "red"


def test_checkpoints_hold_only_trained_weights_and_resume_matches(tmp_path, llm_dir, vit_dir, colours):
    train, _ = colours
    args = dict(FAST, max_steps=6, save_strategy="steps", save_steps=3, seed=0)
    full = attach(vit_dir, llm_dir)
    full.fit(train, output_dir=str(tmp_path / "full"), **args)
    ckpt = tmp_path / "full" / "checkpoint-3"
    files = set(os.listdir(ckpt))
    assert {"projector.safetensors", "adapter_model.safetensors", "vlm_adapter_config.json"} <= files
    assert not {f for f in files if f.startswith("model") and f.endswith(".safetensors")}  # no frozen LLM copy
    projector_keys = set(load_file(ckpt / "projector.safetensors"))
    assert projector_keys == set(full.projector.state_dict())

    resumed = attach(vit_dir, llm_dir)
    resumed.fit(train, output_dir=str(tmp_path / "full"), resume_from_checkpoint=str(ckpt), **args)
    for a, b in zip(full.projector.parameters(), resumed.projector.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    lora = {n: p for n, p in full.llm.named_parameters() if "lora_" in n}
    for name, param in resumed.llm.named_parameters():
        if name in lora:
            torch.testing.assert_close(param, lora[name], rtol=1e-4, atol=1e-5)


def test_two_stage_training_and_projector_learning_rate(tmp_path, llm_dir, vit_dir, colours):
    train, test = colours
    model = attach(vit_dir, llm_dir)
    model.set_stage("align")
    assert not any(p.requires_grad for n, p in model.llm.named_parameters() if "lora_" in n)
    assert all(p.requires_grad for p in model.projector.parameters())
    result = model.fit(train, test, output_dir=str(tmp_path / "run"), align_epochs=1, num_train_epochs=1, **FAST)
    assert {"align_train_loss", "finetune_train_loss"} <= set(result)
    assert os.path.isdir(tmp_path / "run" / "align") and os.path.isdir(tmp_path / "run" / "finetune")
    assert any(p.requires_grad for n, p in model.llm.named_parameters() if "lora_" in n)


def test_early_stopping_on_eval_accuracy(tmp_path, llm_dir, vit_dir, colours):
    train, test = colours
    model = attach(vit_dir, llm_dir)
    result = model.fit(
        train, test, output_dir=str(tmp_path / "run"), num_train_epochs=20, early_stopping_patience=1,
        **dict(FAST, learning_rate=1e-8, projector_lr=1e-8),  # nothing improves, so it must stop early
    )
    epochs = [row["epoch"] for row in result["log_history"] if "eval_accuracy" in row]
    assert 2 <= len(epochs) < 20


def test_feature_cache_matches_live_encoder_and_is_reused(tmp_path, llm_dir, vit_dir, colours):
    train, _ = colours
    model = attach(vit_dir, llm_dir)
    shape = (model.projector.num_vision_tokens, model.config.vision_signature["hidden_size"])
    cached = with_image_features(train, model.vision, cache_dir=str(tmp_path), token_shape=shape)
    live = model.vision.encode_images(train["image"][:5])
    torch.testing.assert_close(torch.tensor(cached[FEATURES_COLUMN][:5]), live)
    calls = []
    hook = model.vision.encoder.register_forward_hook(lambda *a: calls.append(1))
    again = with_image_features(train, model.vision, cache_dir=str(tmp_path), token_shape=shape)
    hook.remove()
    assert not calls and len(again) == len(train)
    assert len(os.listdir(tmp_path / "features")) == 1


def test_evaluate_free_text_dataset(llm_dir, vit_dir):
    ds = colour_dataset(2, seed=2)
    rows = [{"image": ds[i]["image"], "answer": "a red square", "prompt": "Describe this image."} for i in range(3)]
    model = attach(vit_dir, llm_dir)
    metrics = model.evaluate(rows, max_new_tokens=4)
    assert {"exact_match", "bleu", "rougeL"} <= set(metrics)
    assert len(metrics["predictions"]) == 3


def test_fit_standardizes_the_projector_input_with_training_statistics(tmp_path, llm_dir, vit_dir, colours):
    from vlm_adapters import load

    train, _ = colours
    model = attach(vit_dir, llm_dir)
    assert not model.projector.standardizes  # identity until fit has seen training features
    model.fit(train, output_dir=str(tmp_path / "run"), max_steps=1, save_strategy="no", disable_tqdm=True)
    tokens = model.vision.encode_images([row["image"] for row in train]).reshape(-1, 32)
    torch.testing.assert_close(model.projector.feature_mean, tokens.mean(0), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(model.projector.feature_scale, 1 / tokens.std(0, unbiased=False), rtol=1e-3, atol=1e-3)
    again = load(model.save_pretrained(str(tmp_path / "adapter")))  # the statistics travel with the projector
    assert torch.equal(again.projector.feature_scale, model.projector.feature_scale)
