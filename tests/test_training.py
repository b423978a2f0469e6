"""fit / evaluate with transformers' Trainer on the coloured-squares task (chance = 1/3).

What each test proves:
- fit_learns_the_colour_task: LoRA and prefix training reach >= 90% from chance and leave curves and a confusion
  matrix.
- checkpoints_hold_only_trained_weights_and_resume_matches: checkpoints hold the projector and adapter only; a resume
  from other initial weights runs only the remaining steps and ends at the uninterrupted run's weights.
- two_stage_training_and_projector_learning_rate: the align stage trains the projector alone at projector_lr with the
  adapter frozen; fine-tuning adds the adapter at learning_rate.
- early_stopping_on_eval_accuracy: training stops after an evaluation that did not improve, and the best checkpoint's
  weights (not the last one's) are restored.
- feature_cache_matches_live_encoder_and_is_reused: cached features equal the live encoder's and a second call reads
  them.
- evaluate_free_text_dataset: free-text evaluation generates with each row's own prompt and scores exact match /
  ROUGE-L.
- prefix_with_gradient_checkpointing_is_refused_before_training: prefix + gradient checkpointing is refused by name.
- gradient_checkpointing_trains_lora_exactly_as_without: LoRA with `gradient_checkpointing=True` runs (the Trainer
  finds the model's checkpointing switch) and gives the same losses and weights as without.
- save_steps_or_eval_steps_alone_mean_steps: save_steps / eval_steps without a strategy save / evaluate every N steps.
- two_identical_fits_give_identical_adapters: the same fit twice gives byte-identical adapter files.
- fit_standardizes_the_projector_input_with_training_statistics: fit sets the projector's per-channel mean / scale
  from the training features, and they travel with the saved adapter.
- gradient_accumulation_trains_as_the_full_batch: batches of 4 accumulated twice train the weights of batches of 8
  where the micro-batches hold unequal answer-token counts (the loss is the mean over the step's tokens).
- compiled_layers_train_as_eager_and_are_restored: `compile_layers=True` runs the decoder layers through torch.compile
  (one graph for all of them) and trains to the eager run's losses and weights; the layers are eager again after fit.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch
from conftest import StepCounter, colour_dataset
from safetensors.torch import load_file
from transformers import TrainerCallback

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

    # Other initial weights and only the remaining steps: only the checkpoint can make it match.
    resumed, counter = attach(vit_dir, llm_dir, seed=1), StepCounter()
    resumed.fit(train, output_dir=str(tmp_path / "full"), resume_from_checkpoint=str(ckpt), callbacks=[counter], **args)
    assert counter.steps == [4, 5, 6]
    for a, b in zip(full.projector.parameters(), resumed.projector.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    lora = {n: p for n, p in full.llm.named_parameters() if "lora_" in n}
    for name, param in resumed.llm.named_parameters():
        if name in lora:
            torch.testing.assert_close(param, lora[name], rtol=1e-4, atol=1e-5)


class StageProbe(TrainerCallback):
    """Per stage (named by its output folder): each optimizer group's starting learning rate and
    parameters, and the LoRA weights when the stage ends."""

    def __init__(self, model):
        self.model, self.groups, self.lora_at_end = model, {}, {}

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        groups = [(g["initial_lr"], {id(p) for p in g["params"]}) for g in optimizer.param_groups]
        self.groups.setdefault(os.path.basename(args.output_dir), groups)

    def on_train_end(self, args, state, control, **kwargs):
        self.lora_at_end[os.path.basename(args.output_dir)] = _lora(self.model)


def _lora(model):
    return {n: p.detach().clone() for n, p in model.llm.named_parameters() if "lora_" in n}


def test_two_stage_training_and_projector_learning_rate(tmp_path, llm_dir, vit_dir, colours):
    train, test = colours
    model = attach(vit_dir, llm_dir)
    model.set_stage("align")
    assert not any(p.requires_grad for n, p in model.llm.named_parameters() if "lora_" in n)
    assert all(p.requires_grad for p in model.projector.parameters())
    model.set_stage("finetune")
    start, probe = _lora(model), StageProbe(model)
    options = dict(FAST, learning_rate=5e-3, projector_lr=1e-3)
    result = model.fit(train, test, output_dir=str(tmp_path / "run"), align_epochs=1, num_train_epochs=1,
                       callbacks=[probe], **options)
    assert {"align_train_loss", "finetune_train_loss"} <= set(result)
    assert os.path.isdir(tmp_path / "run" / "align") and os.path.isdir(tmp_path / "run" / "finetune")
    projector = {id(p) for p in model.projector.parameters()}
    lora = {id(p) for n, p in model.llm.named_parameters() if "lora_" in n}
    assert probe.groups["align"] == [(1e-3, projector)]  # the projector alone, at its own rate
    assert probe.groups["finetune"] == [(1e-3, projector), (5e-3, lora)]
    assert all(torch.equal(probe.lora_at_end["align"][n], start[n]) for n in start)  # frozen in stage 1
    assert any(not torch.equal(probe.lora_at_end["finetune"][n], start[n]) for n in start)
    assert any(p.requires_grad for n, p in model.llm.named_parameters() if "lora_" in n)


def test_early_stopping_on_eval_accuracy(tmp_path, llm_dir, vit_dir, colours):
    train, test = colours
    model = attach(vit_dir, llm_dir)
    result = model.fit(
        train, test, output_dir=str(tmp_path / "run"), num_train_epochs=20, early_stopping_patience=1,
        **dict(FAST, learning_rate=1e-8, projector_lr=1e-8),  # nothing improves, so it must stop early
    )
    evals = [(row["step"], row["eval_accuracy"]) for row in result["log_history"] if "eval_accuracy" in row]
    assert 2 <= len(evals) < 20
    best, last = max(evals, key=lambda e: e[1])[0], evals[-1][0]  # the first of the best scores counts
    assert best != last  # it stopped after an evaluation that did not improve
    final = model.save_pretrained(str(tmp_path / "final"))
    assert _same_weights(final, tmp_path / "run" / f"checkpoint-{best}")  # the best weights are restored
    assert not _same_weights(final, tmp_path / "run" / f"checkpoint-{last}")


def _same_weights(a, b) -> bool:
    for name in ("projector.safetensors", "adapter_model.safetensors"):
        x, y = load_file(os.path.join(a, name)), load_file(os.path.join(b, name))
        if x.keys() != y.keys() or not all(torch.equal(x[k], y[k]) for k in x):
            return False
    return True


def test_feature_cache_matches_live_encoder_and_is_reused(tmp_path, llm_dir, vit_dir, colours):
    train, _ = colours
    model = attach(vit_dir, llm_dir)
    shape = model.feature_shape
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
    images = [ds[i]["image"] for i in range(3)]
    prompts = ["Describe this image.", "What is shown in this image?", "Describe this image."]
    model = attach(vit_dir, llm_dir)
    generated = [model.describe(image, prompt=p, max_new_tokens=4) for image, p in zip(images, prompts)]
    assert model.describe(images[1], prompt=prompts[0], max_new_tokens=4) != generated[1]  # the prompt matters
    answers = [generated[0], "a red square", "a blue square"]  # one exact answer out of three
    rows = [{"image": i, "answer": a, "prompt": p} for i, a, p in zip(images, answers, prompts)]
    metrics = model.evaluate(rows, max_new_tokens=4)
    assert metrics["predictions"] == generated  # each row's own prompt
    assert metrics["exact_match"] == pytest.approx(1 / 3)
    assert 1 / 3 <= metrics["rougeL"] < 1 and 0 <= metrics["bleu"] <= 100


def test_prefix_with_gradient_checkpointing_is_refused_before_training(tmp_path, llm_dir, vit_dir, colours):
    model = attach(vit_dir, llm_dir, adapter="prefix")
    message = "PEFT prefix tuning does not support gradient checkpointing; set gradient_checkpointing=False."
    with pytest.raises(ValueError, match=re.escape(message)):
        model.fit(colours[0], output_dir=str(tmp_path / "run"), max_steps=2, gradient_checkpointing=True, **FAST)
    assert not os.path.exists(tmp_path / "run" / "checkpoint-2")


def test_save_steps_or_eval_steps_alone_mean_steps(tmp_path, llm_dir, vit_dir, colours):
    """transformers' default strategy is "steps", the library's "epoch": a user who passes save_steps
    or eval_steps means steps."""
    train, test = colours
    model = attach(vit_dir, llm_dir)
    result = model.fit(train, test, output_dir=str(tmp_path), max_steps=4, save_steps=3, eval_steps=2, **FAST)
    saved = sorted(d for d in os.listdir(tmp_path) if d.startswith("checkpoint-"))
    assert saved == ["checkpoint-3", "checkpoint-4"]  # every 3 steps, and at the end (as transformers does)
    assert [row["step"] for row in result["log_history"] if "eval_loss" in row] == [2, 4]
    result = model.fit(train, test, output_dir=str(tmp_path / "b"), max_steps=2, eval_steps=1, save_strategy="no",
                       **FAST)
    assert [row["step"] for row in result["log_history"] if "eval_loss" in row] == [1, 2]


def test_two_identical_fits_give_identical_adapters(tmp_path, llm_dir, vit_dir, colours, cache_dir):
    """Same data, options and machine: byte-identical adapter files (compute_dtype="auto" included)."""
    folders = []
    for run in ("a", "b"):
        model = attach(vit_dir, llm_dir)
        model.fit(colours[0], output_dir=str(tmp_path / run), max_steps=3, save_strategy="no", **FAST)
        folders.append(model.save_pretrained(str(tmp_path / run / "adapter")))
    for name in ("projector.safetensors", "adapter_model.safetensors", "vlm_adapter_config.json"):
        assert (Path(folders[0]) / name).read_bytes() == (Path(folders[1]) / name).read_bytes(), name


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


def test_gradient_checkpointing_trains_lora_exactly_as_without(tmp_path, llm_dir, vit_dir, colours):
    runs = []
    for checkpointing in (False, True):
        model = attach(vit_dir, llm_dir)
        result = model.fit(colours[0], output_dir=str(tmp_path / str(checkpointing)), max_steps=4, save_strategy="no",
                           gradient_checkpointing=checkpointing, **FAST)
        layers = [m for m in model.base_llm.modules() if hasattr(m, "gradient_checkpointing")]
        assert any(m.gradient_checkpointing for m in layers) == checkpointing
        runs.append((_losses(result), [p.detach().clone() for p in model.adapter_parameters]))
    assert runs[0][0] == pytest.approx(runs[1][0], rel=1e-5)
    for plain, recomputed in zip(runs[0][1], runs[1][1]):
        torch.testing.assert_close(plain, recomputed, rtol=1e-5, atol=1e-6)


def test_gradient_accumulation_trains_as_the_full_batch(tmp_path, llm_dir, vit_dir):
    from datasets import ClassLabel

    data = colour_dataset(8, seed=0).cast_column("label", ClassLabel(names=["cat", "dog", "small brown bird"]))
    weights = []
    for batch, accumulate in ((8, 1), (4, 2)):
        model = attach(vit_dir, llm_dir, compute_dtype="float32")
        model.fit(data, output_dir=str(tmp_path / str(batch)), max_steps=3, save_strategy="no", label_prior=False,
                  describe_ratio=0.0, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulate,
                  train_sampling_strategy="random", seed=0, **FAST)
        trained = [*model.adapter_parameters, *model.projector.parameters()]
        weights.append(torch.cat([p.detach().flatten() for p in trained]))
    torch.testing.assert_close(weights[1], weights[0], rtol=1e-4, atol=1e-6)


def test_compiled_layers_train_as_eager_and_are_restored(tmp_path, llm_dir, vit_dir, colours):
    from torch._dynamo.utils import counters

    from vlm_adapters.compiled import compiled_layers, decoder_layers

    runs = []
    for compiled in (False, True):
        graphs = counters["stats"]["unique_graphs"]
        model = attach(vit_dir, llm_dir, compute_dtype="float32")
        result = model.fit(colours[0], output_dir=str(tmp_path / str(compiled)), max_steps=4, save_strategy="no",
                           compile_layers=compiled, **FAST)
        assert (counters["stats"]["unique_graphs"] > graphs) == compiled
        assert not any("forward" in layer.__dict__ for layer in decoder_layers(model.base_llm))
        runs.append((_losses(result), [p.detach().clone() for p in model.adapter_parameters]))
    assert runs[0][0] == pytest.approx(runs[1][0], rel=1e-4)
    for eager, fused in zip(runs[0][1], runs[1][1]):
        torch.testing.assert_close(eager, fused, rtol=1e-3, atol=1e-5)
    with pytest.raises(ValueError, match="no decoder layers.*without compile_layers"):
        with compiled_layers(torch.nn.Linear(2, 2)):
            pass
