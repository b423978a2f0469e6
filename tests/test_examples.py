"""The examples run as written: the imagefolder example on a class-sub-folder collection, with tiny
local models standing in for the Hub ids (the same code path the demo runs).

What each test proves:
- imagefolder_example: examples/finetune_imagefolder.py trains on an imagefolder, evaluates a stratified 10% and
  saves the adapter and confusion matrix.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
from conftest import COLOURS, colour_image


def _load_example(name: str):
    path = os.path.join(os.path.dirname(__file__), "..", "examples", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_imagefolder_example(tmp_path, llm_dir, vit_dir):
    rng = np.random.default_rng(0)
    for name in COLOURS:  # laid out like chest_xray/NORMAL, chest_xray/PNEUMONIA
        os.makedirs(tmp_path / "data" / name)
        for i in range(10):
            colour_image(name, rng).save(tmp_path / "data" / name / f"{i}.png")
    example = _load_example("finetune_imagefolder")
    metrics = example.main([
        str(tmp_path / "data"), "--vision", vit_dir, "--llm", llm_dir, "--output", str(tmp_path / "run"),
        "--epochs", "1",
    ])
    assert set(metrics["labels"]) == set(COLOURS)
    assert sum(c["support"] for c in metrics["per_class"].values()) == 3  # stratified 10% of 30
    assert os.path.isfile(tmp_path / "run" / "adapter" / "projector.safetensors")
    assert os.path.isfile(tmp_path / "run" / "confusion_matrix.png")
