"""Nothing lost, clear errors: crashes mid-training and mid-save, NaN losses, bad data, tokens.

What each test proves:
- sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run: after a SIGKILL, a process that starts from other
  weights resumes from the last checkpoint, runs only the remaining steps and ends with the uninterrupted run's
  weights and accuracy.
- crash_while_saving_a_checkpoint_keeps_the_previous_one: a full disk mid-save leaves the previous checkpoint complete
  and no half checkpoint; resuming (from other initial weights) starts from it and ends at the straight run's weights.
- nan_or_inf_stops_training_naming_the_step_and_the_last_good_checkpoint: a non-finite loss (image embeddings finite)
  stops training with the step and the last good checkpoint's path, which stays finite.
- a_hub_token_never_reaches_disk: no file a run and a save write holds the hub token.
- bad_datasets_get_clear_errors: empty data, a DatasetDict, missing columns, bad labels and empty classes are named.
- one_bad_file_stops_training_or_is_skipped_and_reported: an unreadable image stops fit naming the file, or is skipped
  and reported.
- any_prompt_string_keeps_every_image_token_or_fails_clearly: any prompt keeps all image tokens within the context, or
  raises PromptTooLongError.
- projector_nan_at_inference_is_a_clear_error: NaN projector weights give a clear FloatingPointError at inference.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import datasets
import pytest
import torch
from conftest import StepCounter, colour_dataset
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from transformers import TrainerCallback

from vlm_adapters import PromptTooLongError, attach
from vlm_adapters import trainer as trainer_module
from vlm_adapters.images import ImageLoadError
from vlm_adapters.prompting import IMAGE_TOKEN_ID

WORKER = os.path.join(os.path.dirname(__file__), "train_worker.py")
FAST = dict(learning_rate=5e-3, projector_lr=5e-3, disable_tqdm=True)


def _run_worker(llm_dir, vit_dir, out_dir, kill_at=0, resume=False):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, WORKER, llm_dir, vit_dir, str(out_dir), str(kill_at), "resume" if resume else "fresh"],
        env=env, capture_output=True, text=True, timeout=600,
    )


def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(tmp_path, llm_dir, vit_dir):
    killed = _run_worker(llm_dir, vit_dir, tmp_path / "crash", kill_at=5)
    assert killed.returncode == -9, killed.stderr[-2000:]  # SIGKILL: no cleanup ran
    assert sorted(d for d in os.listdir(tmp_path / "crash") if d.startswith("checkpoint-")) == [
        "checkpoint-2", "checkpoint-4"
    ]
    resumed = _run_worker(llm_dir, vit_dir, tmp_path / "crash", resume=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    # 72 rows, batches of 8: 27 steps in 3 epochs; killed at step 5, resumed from checkpoint-4: only the rest run
    assert json.loads((tmp_path / "crash" / "steps-resume.json").read_text()) == list(range(5, 28))
    straight = _run_worker(llm_dir, vit_dir, tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-2000:]
    assert json.loads((tmp_path / "straight" / "steps-fresh.json").read_text()) == list(range(1, 28))
    for name in ("projector.safetensors", "adapter_model.safetensors"):
        a = load_file(tmp_path / "crash" / "final" / name)
        b = load_file(tmp_path / "straight" / "final" / name)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    accuracy = [json.loads((tmp_path / run / "accuracy.json").read_text()) for run in ("crash", "straight")]
    assert accuracy[0] == accuracy[1]


def test_crash_while_saving_a_checkpoint_keeps_the_previous_one(tmp_path, llm_dir, vit_dir, colours, monkeypatch):
    train, _ = colours
    model = attach(vit_dir, llm_dir)
    real_write = trainer_module.write_adapter_files
    calls = []

    def failing_write(m, directory):
        calls.append(directory)
        if len(calls) == 2:  # the second checkpoint: write part of it, then the disk is "full"
            with open(os.path.join(directory, "projector.safetensors"), "wb") as fh:
                fh.write(b"\0" * 10)
            raise OSError(28, "No space left on device")
        real_write(m, directory)

    monkeypatch.setattr(trainer_module, "write_adapter_files", failing_write)
    with pytest.raises(OSError, match="No space left"):
        model.fit(train, output_dir=str(tmp_path), max_steps=6, save_strategy="steps", save_steps=2, **FAST)
    entries = os.listdir(tmp_path)
    assert [e for e in entries if e.startswith("checkpoint-")] == ["checkpoint-2"]
    assert len(load_file(tmp_path / "checkpoint-2" / "projector.safetensors")) > 0  # intact
    monkeypatch.setattr(trainer_module, "write_adapter_files", real_write)
    resumed, counter = attach(vit_dir, llm_dir, seed=1), StepCounter()  # other weights: only checkpoint-2 helps
    resumed.fit(train, output_dir=str(tmp_path), max_steps=6, save_steps=2, resume_from_checkpoint=True,
                callbacks=[counter], **FAST)
    assert counter.steps == [3, 4, 5, 6]  # resumed from checkpoint-2, not the half-written checkpoint-4
    assert os.path.isdir(tmp_path / "checkpoint-6")
    straight = attach(vit_dir, llm_dir)
    straight.fit(train, output_dir=str(tmp_path / "straight"), max_steps=6, save_strategy="no", **FAST)
    for a, b in zip(resumed.parameters(), straight.parameters()):
        if a.requires_grad:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


class PoisonAdapter(TrainerCallback):
    """Turns the LoRA weights to inf at a given step, as a diverging run would: the LLM's output and
    the loss become non-finite while the projector, and so the image embeddings, stay finite."""

    def __init__(self, model, step):
        self.model, self.step = model, step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                for name, param in self.model.llm.named_parameters():
                    if "lora_B" in name:
                        param.fill_(float("inf"))


def test_nan_or_inf_stops_training_naming_the_step_and_the_last_good_checkpoint(tmp_path, llm_dir, vit_dir, colours):
    train, _ = colours
    model = attach(vit_dir, llm_dir)
    last_good = re.escape(str(tmp_path / "checkpoint-4"))
    with pytest.raises(FloatingPointError, match=rf"training loss became (nan|inf) at step 5\. .*"
                                                 rf"The last good checkpoint is {last_good};") as err:
        model.fit(train, output_dir=str(tmp_path), max_steps=8, save_strategy="steps", save_steps=2,
                  callbacks=[PoisonAdapter(model, 4)], **FAST)
    assert "learning_rate" in str(err.value)
    features = model.vision.encode_images([train[0]["image"]])
    assert torch.isfinite(model.image_embeddings(image_features=features)).all()  # the loss guard, not the projector's
    assert os.path.isdir(tmp_path / "checkpoint-4")
    good = load_file(tmp_path / "checkpoint-4" / "projector.safetensors")
    assert all(torch.isfinite(t).all() for t in good.values())


def test_a_hub_token_never_reaches_disk(tmp_path, llm_dir, vit_dir, colours):
    train, test = colours
    token = "hf_NeverWriteThisToken0123456789"
    model = attach(vit_dir, llm_dir)
    model.fit(train, test, output_dir=str(tmp_path / "run"), max_steps=2, save_strategy="steps", save_steps=1,
              hub_token=token, **FAST)
    model.save_pretrained(str(tmp_path / "adapter"))
    for root, _, files in os.walk(tmp_path):
        for name in files:
            with open(os.path.join(root, name), "rb") as fh:
                assert token.encode() not in fh.read(), os.path.join(root, name)


# ----------------------------------------------------------------------------- bad data
def test_bad_datasets_get_clear_errors(llm_dir, vit_dir, colours):
    model = attach(vit_dir, llm_dir)
    image = colours[0][0]["image"]
    with pytest.raises(ValueError, match="empty"):
        model.fit([])
    with pytest.raises(ValueError, match="empty"):
        model.fit(colours[0].select([]))
    with pytest.raises(ValueError, match="DatasetDict"):
        model.fit(datasets.DatasetDict({"train": colours[0]}))
    with pytest.raises(ValueError, match="needs an 'image' column"):
        model.fit([{"picture": image, "label": "red"}])
    with pytest.raises(ValueError, match="'label'.*or 'answer'"):
        model.fit([{"image": image, "caption": "red"}])
    with pytest.raises(ValueError, match="ClassLabel"):
        model.fit([{"image": image, "label": 3}, {"image": image, "label": 1}])
    with pytest.raises(ValueError, match="not UTF-8"):
        model.fit([{"image": image, "label": b"\xff\xfe red"}])
    with_missing_class = colours[0].filter(lambda row: row["label"] != 2)
    with pytest.raises(ValueError, match=r"\['blue'\] have no training examples"):
        model.fit(with_missing_class)


def test_one_bad_file_stops_training_or_is_skipped_and_reported(tmp_path, llm_dir, vit_dir, colours):
    train, _ = colours
    rows = [{"image": row["image"], "label": ["red", "green", "blue"][row["label"]]} for row in train]
    bad = tmp_path / "scan_0042.png"
    bad.write_bytes(b"this is not a png")
    rows.insert(7, {"image": str(bad), "label": "red"})
    paths = []
    for i, row in enumerate(rows):  # a dataset of file paths, as an imagefolder gives
        if not isinstance(row["image"], str):
            path = tmp_path / f"img_{i}.png"
            row["image"].save(path)
            row["image"] = str(path)
        paths.append(row)
    data = datasets.Dataset.from_list(paths).cast_column("image", datasets.Image())
    model = attach(vit_dir, llm_dir)
    with pytest.raises(ImageLoadError, match="scan_0042.png"):
        model.fit(data, output_dir=str(tmp_path / "a"), max_steps=1, **FAST)
    result = model.fit(data, output_dir=str(tmp_path / "b"), max_steps=1, skip_bad_images=True, **FAST)
    assert "skipped 1 bad images" in result["skipped_bad_images"][0]
    assert "scan_0042.png" in result["skipped_bad_images"][0]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=st.text(max_size=300))
def test_any_prompt_string_keeps_every_image_token_or_fails_clearly(llm_dir, vit_dir, prompt):
    model = _shared_model(llm_dir, vit_dir)
    try:
        enc = model.prompts.encode(prompt, "red")
    except PromptTooLongError:
        return
    assert enc.input_ids.count(IMAGE_TOKEN_ID) == model.projector.num_image_tokens
    assert len(enc.input_ids) <= model.prompts.max_length


_MODELS: dict = {}


def _shared_model(llm_dir, vit_dir):
    if (llm_dir, vit_dir) not in _MODELS:
        _MODELS[(llm_dir, vit_dir)] = attach(vit_dir, llm_dir)
    return _MODELS[(llm_dir, vit_dir)]


def test_projector_nan_at_inference_is_a_clear_error(llm_dir, vit_dir, colours):
    model = attach(vit_dir, llm_dir)
    with torch.no_grad():
        model.projector.proj[0].bias.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="NaN/inf image embeddings"):
        model.classify(colours[1][0]["image"], ["red", "blue"])
    assert colour_dataset  # fixture helper imported for the shared task
