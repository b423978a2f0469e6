"""The `vlm-adapters` command end to end on tiny local models: train -> evaluate -> predict."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import yaml
from conftest import COLOURS, colour_image

from vlm_adapters.cli import COMMANDS, main


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(1)
    for name in COLOURS:
        os.makedirs(root / name)
        for i in range(8):
            colour_image(name, rng).save(root / name / f"{i}.png")
    return root


@pytest.mark.parametrize("command", list(COMMANDS))
def test_help_lists_every_option(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    classes, _ = COMMANDS[command][1]()
    for cls in classes:
        for name in cls.__dataclass_fields__:
            if cls.__dataclass_fields__[name].init:
                assert f"--{name}" in text, f"--{name} missing from `{command} --help`"


def test_train_evaluate_predict(tmp_path, image_folder, llm_dir, vit_dir, capsys):
    config = {
        "vision": vit_dir, "llm": llm_dir, "train": str(image_folder), "output_dir": str(tmp_path / "run"),
        "num_train_epochs": 1, "learning_rate": 5e-3, "projector_lr": 5e-3, "save_strategy": "no",
        "disable_tqdm": True,
    }
    config_file = tmp_path / "train.yaml"
    config_file.write_text(yaml.safe_dump(config))
    assert main(["train", str(config_file)]) == 0
    adapter = tmp_path / "run" / "adapter"
    assert (adapter / "projector.safetensors").exists()

    assert main(["evaluate", "--adapter", str(adapter), "--data", str(image_folder), "--split", "train",
                 "--output_dir", str(tmp_path / "eval")]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert 0.0 <= metrics["accuracy"] <= 1.0 and sum(sum(r) for r in metrics["confusion_matrix"]) == 24

    out = tmp_path / "pred.jsonl"
    assert main(["predict", "--adapter", str(adapter), "--images", str(image_folder / "red"),
                 "--output", str(out), "--max_new_tokens", "3"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 8 and {"image", "label", "probability", "description"} <= set(rows[0])
    assert all(row["label"] in COLOURS and 0 < row["probability"] <= 1 for row in rows)

    csv_out = tmp_path / "pred.csv"
    main(["predict", "--adapter", str(adapter), "--images", str(image_folder / "*" / "0.png"),
          "--output", str(csv_out), "--no_describe"])
    lines = csv_out.read_text().splitlines()
    assert lines[0] == "image,label,probability" and len(lines) == 4
