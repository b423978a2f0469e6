"""The `vlm-adapters` command end to end on tiny local models (train -> push -> evaluate -> predict),
and on the real assets (convert-gguf, demo). The Hub is replaced only at the HTTP layer.

What each test proves:
- help_lists_every_option: each command's `--help` lists every field of its option dataclasses.
- train_push_evaluate_predict: `train` from a YAML file saves an adapter and `--push_to_hub_id` uploads exactly its
  files; `evaluate` writes the metrics the Python API gives; `predict` writes the labels, probabilities and
  descriptions of `predict` / `classify` / `describe`, as JSONL or CSV.
- push_uploads_exactly_the_adapter_files: `push` creates the repo (private, token from HF_TOKEN) and uploads the
  adapter's files byte for byte, never code or pickles beside them; a folder without a projector is refused before any
  request.
- convert_gguf_prints_the_converted_folder_in_the_cache_it_is_given: `convert-gguf --cache_dir` prints the SmolLM2
  folder in that cache, which transformers loads (the conversion itself: test_assets).
- demo_runs_end_to_end_on_a_few_images: `demo` on 2 + 1 images per class runs every phase and writes the report, the
  adapter, the confusion matrix; the reloaded adapter predicts the same; the scores are on the test images; its
  short mosaic stage captions and answers test mosaics; the VLM - probe difference is paired on the test images; the
  adapter keeps the demo's dequantize="once" and names its packaged encoder, so `predict` loads it from its folder.
- demo_mosaic_runs_end_to_end_on_a_few_mosaics: `demo mosaic` on 6 train / 3 test mosaics scores the trained,
  zero-shot and classification-only models and the probe, writes report.json, the PNG and its section of the
  results file (keeping the rest of that file), and prints the table.
- train_with_a_peft_config_of_any_method: `--peft_config` (a JSON file, as PEFT writes one, even one saved for
  inference) trains that PEFT method and the saved adapter names it; --adapter beside it, or JSON without a known
  peft_type, is refused by name.
- split_folder_label_map_and_attach_flags: a train/ validation/ test/ folder needs no --split (validation/ is
  the eval split of training, test/ the split `evaluate` scores), --label_map renames, flags of every kind
  (`none`, `--no_x`, numbers) reach the saved config, and TrainingArguments flags the user gives reach `fit` even
  when they equal transformers' defaults (`--seed 42`, `--learning_rate 5e-5`).
- optional_options_take_none_and_text_keeps_it: `--quantization none` etc. give None; defaults are the dataclass's.
- export_writes_a_llava_model: `export` writes a folder transformers loads as Llava.
- console_is_free_of_library_noise: `train` + `predict` in a fresh process print no FutureWarning / deprecation
  message and no bitsandbytes kernel message.
(`predict` on real folders: test_cli_predict.py; `serve`: test_app.py.)
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import COLOURS, colour_image, needs_fashion_mnist, uploaded_files

from vlm_adapters import attach, load
from vlm_adapters.cli import COMMANDS, main
from vlm_adapters.demo.assets import EFFICIENTNET_LITE0, FASHION_MNIST_LABELS, fashion_mnist
from vlm_adapters.sources import load_data

REPO = Path(__file__).resolve().parents[1]


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


def test_train_push_evaluate_predict(tmp_path, image_folder, llm_dir, vit_dir, fake_hub, capsys):
    config = {
        "vision": vit_dir, "llm": llm_dir, "train": str(image_folder), "output_dir": str(tmp_path / "run"),
        "num_train_epochs": 1, "learning_rate": 5e-3, "projector_lr": 5e-3, "save_strategy": "no",
        "disable_tqdm": True, "push_to_hub_id": "me/colours",
    }
    config_file = tmp_path / "train.yaml"
    config_file.write_text(yaml.safe_dump(config))
    assert main(["train", str(config_file)]) == 0
    adapter = tmp_path / "run" / "adapter"
    assert (adapter / "projector.safetensors").exists()
    # --push_to_hub_id: the saved adapter, file for file, to the named repo
    assert json.loads(next(r for r in fake_hub if r.url.path == "/api/repos/create").content)["name"] == "colours"
    uploaded = uploaded_files(fake_hub)
    assert set(uploaded) == set(os.listdir(adapter))
    assert all(uploaded[name] == (adapter / name).read_bytes() for name in uploaded if name != "README.md")
    assert b'load("me/colours")' in uploaded["README.md"]  # the pushed card names the repo, the saved one its folder
    assert "c" * 40 in capsys.readouterr().out  # the commit URL is printed

    assert main(["evaluate", "--adapter", str(adapter), "--data", str(image_folder),  # a flat folder: no --split
                 "--output_dir", str(tmp_path / "eval")]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert sum(sum(r) for r in metrics["confusion_matrix"]) == 24
    model = load(str(adapter))
    expected = model.evaluate(load_data(str(image_folder)), progress=False)  # what the Python API gives
    assert metrics["accuracy"] == expected["accuracy"] and metrics["confusion_matrix"] == expected["confusion_matrix"]

    out = tmp_path / "pred.jsonl"
    assert main(["predict", "--adapter", str(adapter), "--images", str(image_folder / "red"),
                 "--output", str(out), "--max_new_tokens", "3"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 8 and {"image", "label", "probability", "description"} <= set(rows[0])
    paths = [row["image"] for row in rows]
    assert paths == sorted(str(p) for p in (image_folder / "red").iterdir())
    labels = model.config.labels  # the adapter's classes, in their order, as the command uses them
    assert sorted(labels) == sorted(COLOURS)
    assert [row["label"] for row in rows] == model.predict(paths, labels)
    assert [row["description"] for row in rows] == model.describe(paths, max_new_tokens=3)
    top = [max(p.values()) for p in model.classify(paths, labels)]
    assert [row["probability"] for row in rows] == pytest.approx(top, abs=1e-6)

    csv_out = tmp_path / "pred.csv"
    main(["predict", "--adapter", str(adapter), "--images", str(image_folder / "*" / "0.png"),
          "--output", str(csv_out), "--no_describe"])
    lines = csv_out.read_text().splitlines()
    assert lines[0] == "image,label,probability,reason,p_blue,p_green,p_red" and len(lines) == 4


def test_train_with_a_peft_config_of_any_method(tmp_path, image_folder, llm_dir, vit_dir):
    import torch
    from safetensors.torch import load_file

    peft_file = tmp_path / "adapter_config.json"
    peft_file.write_text(json.dumps({"peft_type": "IA3", "target_modules": ["q_proj", "v_proj", "down_proj"],
                                     "feedforward_modules": ["down_proj"], "inference_mode": True}))
    run = ["train", "--vision", vit_dir, "--llm", llm_dir, "--train", str(image_folder), "--output_dir",
           str(tmp_path / "run"), "--max_steps", "2", "--learning_rate", "1e-2", "--save_strategy", "no",
           "--disable_tqdm", "true", "--report_to", "none"]
    assert main([*run, "--peft_config", str(peft_file)]) == 0
    adapter = tmp_path / "run" / "adapter"
    config = json.loads((adapter / "vlm_adapter_config.json").read_text())
    assert config["adapter"] == "peft" and config["peft_type"] == "IA3"
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "IA3"
    scales = load_file(adapter / "adapter_model.safetensors")  # IA3 starts at ones: trained, not frozen
    assert scales and any(not torch.all(t == 1) for t in scales.values())
    with pytest.raises(ValueError, match="both name the adapter"):
        main([*run, "--peft_config", str(peft_file), "--adapter", "lora"])
    with pytest.raises(ValueError, match="peft_type is one of .*'IA3'"):
        main([*run, "--peft_config", '{"r": 4}'])


def test_split_folder_label_map_and_attach_flags(tmp_path, llm_dir, vit_dir, monkeypatch):
    """train/ validation/ test/ folders with upper-case class names, renamed by --label_map; flags of
    every kind (none, false, numbers) reach the saved config; no --split anywhere."""
    from vlm_adapters.model import VisionLanguageModel

    rng = np.random.default_rng(3)
    for split, count in (("train", 4), ("validation", 2), ("test", 3)):
        for name in COLOURS:
            os.makedirs(tmp_path / "data" / split / name.upper())
            for i in range(count):
                colour_image(name, rng).save(tmp_path / "data" / split / name.upper() / f"{i}.png")
    label_map = tmp_path / "labels.json"
    label_map.write_text(json.dumps({name.upper(): name for name in COLOURS}))
    sizes = {}
    fit = VisionLanguageModel.fit

    def spy(self, train, eval=None, **options):  # noqa: A002 - fit's own name
        sizes.update(train=len(train), eval=len(eval), names=train.features["label"].names)
        sizes.update(seed=options.get("seed"), learning_rate=options.get("learning_rate"))
        return fit(self, train, eval, **options)

    monkeypatch.setattr(VisionLanguageModel, "fit", spy)
    assert main(["train", "--vision", vit_dir, "--llm", llm_dir, "--train", str(tmp_path / "data"),
                 "--label_map", str(label_map), "--output_dir", str(tmp_path / "run"), "--num_train_epochs", "1",
                 "--save_strategy", "no", "--disable_tqdm", "true", "--report_to", "none", "--quantization", "none",
                 "--lora_dropout", "0.05", "--no_projector_norm", "--num_image_tokens", "none",
                 "--describe_ratio", "0", "--seed", "42", "--learning_rate", "5e-5"]) == 0
    # validation/ is the eval split; flags equal to transformers' defaults (seed 42, lr 5e-5) still win over fit's
    assert sizes == {"train": 12, "eval": 6, "names": ["blue", "green", "red"], "seed": 42, "learning_rate": 5e-5}
    config = json.loads((tmp_path / "run" / "adapter" / "vlm_adapter_config.json").read_text())
    assert config["quantization"] is None and config["lora_dropout"] == 0.05 and config["projector_norm"] is False
    assert config["labels"] == ["blue", "green", "red"] and config["lora_target_modules"] == "all-linear"

    adapter = str(tmp_path / "run" / "adapter")
    data_dir = tmp_path / "data"
    for data, images in ((data_dir, 9), (data_dir / "test", 9), (data_dir / "validation", 6)):
        assert main(["evaluate", "--adapter", adapter, "--data", str(data), "--label_map", str(label_map),
                     "--output_dir", str(tmp_path / "eval")]) == 0
        metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
        assert sum(map(sum, metrics["confusion_matrix"])) == images  # a split folder gives its test split
        assert set(metrics["per_class"]) == set(COLOURS)  # scored under the adapter's names


def test_optional_options_take_none_and_text_keeps_it():
    from transformers import HfArgumentParser

    from vlm_adapters.cli import fix_flags
    from vlm_adapters.config import AttachOptions, FitOptions

    parser = HfArgumentParser((AttachOptions, FitOptions))
    fix_flags(parser, (AttachOptions, FitOptions))
    attach_opts, fit_opts = parser.parse_args_into_dataclasses(
        ["--quantization", "none", "--num_image_tokens", "None", "--system_prompt", "none",
         "--early_stopping_patience", "none", "--describe_ratio", "0.5"])
    assert attach_opts.quantization is None and attach_opts.num_image_tokens is None
    assert attach_opts.system_prompt == "none" and fit_opts.early_stopping_patience is None
    assert fit_opts.describe_ratio == 0.5 and attach_opts.lora_target_modules == "all-linear"
    defaults, _ = parser.parse_args_into_dataclasses([])
    assert defaults == AttachOptions()  # every default as the dataclass has it
    with pytest.raises(SystemExit):
        parser.parse_args_into_dataclasses(["--quantization", "fp4"])


def test_export_writes_a_llava_model(tmp_path, llm_dir, capsys):
    from conftest import save_vision
    from transformers import LlavaForConditionalGeneration

    clip = save_vision(str(tmp_path / "clip"), "clip")
    adapter = attach(clip, llm_dir, projector_norm=False).save_pretrained(tmp_path / "adapter")
    assert main(["export", "--adapter", adapter, "--output_dir", str(tmp_path / "llava")]) == 0
    assert capsys.readouterr().out.strip().endswith(str(tmp_path / "llava"))
    assert isinstance(LlavaForConditionalGeneration.from_pretrained(tmp_path / "llava"), LlavaForConditionalGeneration)


NOISE = re.compile(r"FutureWarning|DeprecationWarning|deprecated|gemm_4bit_forward|kernels-community", re.I)


def test_console_is_free_of_library_noise(tmp_path, image_folder, llm_dir, vit_dir):
    """`train` (NF4 + LoRA, with an evaluation) then `predict` (classify + describe) in a fresh process
    with Python's default warning filters: no FutureWarning or deprecation message, and no
    bitsandbytes kernel message."""
    run, out = tmp_path / "run", tmp_path / "pred.csv"
    script = (
        "from vlm_adapters.cli import main\n"
        f"main(['train', '--vision', {vit_dir!r}, '--llm', {llm_dir!r}, '--train', {str(image_folder)!r}, "
        f"'--output_dir', {str(run)!r}, '--num_train_epochs', '1', '--save_strategy', 'no'])\n"
        f"main(['predict', '--adapter', {str(run / 'adapter')!r}, '--images', {str(image_folder / 'red')!r}, "
        f"'--output', {str(out)!r}, '--max_new_tokens', '3'])\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": ""}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    console = done.stdout + done.stderr
    assert done.returncode == 0, console[-3000:]
    assert len(out.read_text().splitlines()) == 9
    assert not NOISE.search(console), NOISE.findall(console)


def test_push_uploads_exactly_the_adapter_files(tmp_path, llm_dir, vit_dir, fake_hub, monkeypatch, capsys):
    from vlm_adapters import attach

    monkeypatch.setenv("HF_TOKEN", "hf_FromTheEnvironment0123456789")
    folder = tmp_path / "adapter"
    attach(vit_dir, llm_dir).save_pretrained(str(folder))
    adapter_files = {name: (folder / name).read_bytes() for name in os.listdir(folder)}
    (folder / "train.py").write_text("print('code is never uploaded')")
    (folder / "optimizer.pt").write_bytes(b"pickles are never uploaded")
    assert main(["push", "--adapter_dir", str(folder), "--repo_id", "me/colours", "--private"]) == 0
    create = next(r for r in fake_hub if r.url.path == "/api/repos/create")
    assert json.loads(create.content) == {"name": "colours", "organization": "me", "visibility": "private"}
    assert create.headers["authorization"] == "Bearer hf_FromTheEnvironment0123456789"
    assert uploaded_files(fake_hub) == adapter_files
    assert capsys.readouterr().out.strip().endswith("c" * 40)

    fake_hub.clear()
    os.remove(folder / "projector.safetensors")
    with pytest.raises(FileNotFoundError, match="has no projector.safetensors"):
        main(["push", "--adapter_dir", str(folder), "--repo_id", "me/colours"])
    assert fake_hub == []  # refused before any request


def test_convert_gguf_prints_the_converted_folder_in_the_cache_it_is_given(tmp_path, capsys):
    from transformers import AutoConfig, AutoTokenizer

    from vlm_adapters.demo.assets import SMOLLM2_FOLDER, smollm2_instruct

    converted = smollm2_instruct()  # converted once per session (test_assets shares it)
    os.symlink(converted, tmp_path / SMOLLM2_FOLDER)  # a cache that already holds it: no second conversion
    assert main(["convert-gguf", "--cache_dir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert printed == str(tmp_path / SMOLLM2_FOLDER)
    assert AutoConfig.from_pretrained(printed).model_type == "llama"
    assert AutoTokenizer.from_pretrained(printed).chat_template


@needs_fashion_mnist
def test_demo_runs_end_to_end_on_a_few_images(tmp_path, capsys):
    """The real assets (SmolLM2 NF4 + LoRA, EfficientNet-Lite0, Fashion-MNIST) on 2 + 1 images per class."""
    out = tmp_path / "demo"
    assert main(["demo", "--output_dir", str(out), "--train_per_class", "2", "--test_per_class", "1",
                 "--zero_shot_per_class", "1", "--describe_images", "2", "--describe_max_new_tokens", "4",
                 "--mosaic_train", "4", "--mosaic_test", "2"]) == 0
    report = json.loads((out / "report.json").read_text())
    figures = report["figures"]
    assert report["options"]["train_per_class"] == 2 and figures["test_images"] == 10
    assert set(figures["per_class"]) == set(FASHION_MNIST_LABELS)
    assert sum(row["support"] for row in figures["per_class"].values()) == 10  # scored on the test images
    assert all(0 <= figures[k] <= 1 for k in ("accuracy", "balanced_accuracy", "roc_auc", "ece",
                                              "linear_probe_accuracy", "zero_shot_accuracy"))
    assert figures["train_loss"] > 0 and figures["reload_same_predictions"] is True
    paired = figures["vlm_minus_probe"]
    assert paired["n"] == 10 and paired["diff"] == pytest.approx(figures["accuracy"] - figures["linear_probe_accuracy"])
    assert len(figures["describe_examples"]) == 2 and all(e["text"] for e in figures["describe_examples"])
    assert set(os.listdir(out / "adapter")) == {"vlm_adapter_config.json", "projector.safetensors",
                                                "adapter_config.json", "adapter_model.safetensors", "README.md",
                                                "label_prior.safetensors"}
    assert (out / "confusion_matrix.png").exists() and (out / "roc_curve.png").exists()
    saved = json.loads((out / "adapter" / "vlm_adapter_config.json").read_text())
    assert saved["dequantize"] == "once"  # the demo keeps compute-dtype copies of its 4-bit weights
    assert saved["vision"] == EFFICIENTNET_LITE0  # so the command line loads the adapter from its folder alone
    shirt = tmp_path / "shirt.png"
    fashion_mnist("test", per_class=1, seed=0)[6]["image"].save(shirt)
    assert main(["predict", "--adapter", str(out / "adapter"), "--images", str(shirt), "--output",
                 str(tmp_path / "predicted.jsonl"), "--no_describe"]) == 0
    predicted = json.loads((tmp_path / "predicted.jsonl").read_text())
    assert predicted["label"] in FASHION_MNIST_LABELS
    assert len(figures["mosaic_examples"]) == 2 and all(e["caption"] for e in figures["mosaic_examples"])
    assert 0 <= figures["mosaic_cells_right"] <= 1 and "mosaics: caption + worked answers" in report["phases_s"]
    assert "| VLM accuracy (label scoring, 10 test images) |" in capsys.readouterr().out


@needs_fashion_mnist
def test_demo_mosaic_runs_end_to_end_on_a_few_mosaics(tmp_path, capsys):
    out, results = tmp_path / "mosaic", tmp_path / "docs" / "results.md"
    results.parent.mkdir()
    results.write_text("# Demo results\n\nthe classification demo's table\n")
    assert main(["demo", "mosaic", "--output_dir", str(out), "--results_md", str(results), "--train_mosaics", "6",
                 "--test_mosaics", "3", "--baseline_mosaics", "2", "--classifier_per_class", "1",
                 "--max_new_tokens", "6", "--answer_max_new_tokens", "2", "--worked_max_new_tokens", "4",
                 "--questions_per_mosaic", "1", "--test_questions_per_mosaic", "2"]) == 0
    figures = json.loads((out / "report.json").read_text())["figures"]
    assert figures["probe"]["n"] == 12 and figures["trained"]["caption"]["per_cell"]["n"] == 12
    assert figures["zero_shot"]["caption"]["per_cell"]["n"] == 8 == figures["classifier"]["caption"]["per_cell"]["n"]
    assert sum(q["n"] for q in figures["trained"]["questions"].values()) == 6  # 2 questions per test mosaic
    assert figures["train"]["rows"] == 12 and len(figures["examples"]["captions"]) == 3
    text = results.read_text()
    assert text.startswith("# Demo results\n\nthe classification demo's table\n") and "## Mosaic task" in text
    assert (results.parent / "mosaic_captions.png").exists() and (out / "mosaic_captions.png").exists()
    assert "| per-cell linear probe (same features) |" in capsys.readouterr().out
