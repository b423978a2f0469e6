"""PEFT config objects as adapters: every method trains in 4-bit and reloads (ours and plain PEFT),
AdaLoRA's budget moves during fit and its regulariser is in the packed loss, and the methods allowed
on quantized layers compute there what they compute on the dequantized weights."""

from __future__ import annotations

import copy
import json
import os

import bitsandbytes as bnb
import pytest
import torch
from bitsandbytes.functional import dequantize_4bit
from conftest import colour_dataset
from peft import (
    AdaLoraConfig,
    BOFTConfig,
    FourierFTConfig,
    HRAConfig,
    IA3Config,
    LNTuningConfig,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    OFTConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptTuningConfig,
    VeraConfig,
    get_peft_model_state_dict,
    set_peft_model_state_dict,
)
from transformers import AutoModelForCausalLM

from vlm_adapters import AdapterLoadError, VLMCollator, attach, load
from vlm_adapters.adapters import QUANTIZED_METHODS, add_adapter, regularization
from vlm_adapters.config import CONFIG_NAME, AdapterConfig
from vlm_adapters.fast_lora import peft_lora_forward
from vlm_adapters.llm import load_llm

LABELS = ["red", "green", "blue"]
PROMPT = "What is shown in this image?"
FAST = dict(learning_rate=5e-3, projector_lr=5e-3, disable_tqdm=True, logging_steps=3, save_strategy="no")
STEPS = 18  # 2 epochs of 72 rows at batch 8


def adalora(**options):
    settings = dict(init_r=8, target_r=2, total_step=STEPS, tinit=3, tfinal=5, deltaT=1, target_modules="all-linear")
    return AdaLoraConfig(**{**settings, **options})


# What a user compares, as they would write it.
METHODS = {
    "lora": lambda: LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"),
    "dora": lambda: LoraConfig(r=8, lora_alpha=16, use_dora=True, target_modules="all-linear"),
    "rslora": lambda: LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules="all-linear"),
    "adalora": adalora,
    "ia3": IA3Config,
    "prefix": lambda: PrefixTuningConfig(num_virtual_tokens=8),
}
PEFT_TYPES = {"lora": "LORA", "dora": "LORA", "rslora": "LORA", "adalora": "ADALORA", "ia3": "IA3",
              "prefix": "PREFIX_TUNING"}

T = ["q_proj", "v_proj", "down_proj"]
# One config per method name of adapters.QUANTIZED_METHODS, and the methods refused there.
BY_NAME = {
    "LORA": lambda: LoraConfig(target_modules=T),
    "DORA": lambda: LoraConfig(target_modules=T, use_dora=True),
    "ADALORA": lambda: AdaLoraConfig(target_modules=T, total_step=10),
    "IA3": lambda: IA3Config(target_modules=T, feedforward_modules=["down_proj"]),
    "PREFIX_TUNING": lambda: PrefixTuningConfig(num_virtual_tokens=4),
    "VERA": lambda: VeraConfig(target_modules=["q_proj", "v_proj"]),
    "OFT": lambda: OFTConfig(target_modules=T, r=0, oft_block_size=16),
    "BOFT": lambda: BOFTConfig(target_modules=T, boft_block_size=4),
    "FOURIERFT": lambda: FourierFTConfig(target_modules=T, n_frequency=10),
    "LN_TUNING": LNTuningConfig,
    "LOHA": lambda: LoHaConfig(target_modules=T),
    "LOKR": lambda: LoKrConfig(target_modules=T),
    "HRA": lambda: HRAConfig(target_modules=T),
}


@pytest.fixture(scope="module")
def images():
    ds = colour_dataset(1, seed=11)
    return [ds[i]["image"] for i in range(len(ds))]


def _scores(model, images):
    return model.score_labels(model.vision.encode_images(images), LABELS, PROMPT)


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_trains_in_4bit_and_reloads_with_identical_probabilities(
    tmp_path, llm_dir, vit_dir, colours, images, name
):
    # bf16 compute: PEFT would round a reloaded AdaLoRA through it (see adapters._restore_exactly)
    model = attach(vit_dir, llm_dir, adapter=METHODS[name](), compute_dtype="bfloat16")
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.base_llm.modules())
    initial = {n: p.detach().clone() for n, p in model.llm.named_parameters() if p.requires_grad}
    result = model.fit(colours[0], output_dir=str(tmp_path / "run"), num_train_epochs=2, **FAST)
    losses = [row["loss"] for row in result["log_history"] if "loss" in row]
    assert losses[-1] < 0.8 * losses[0], losses
    moved = [n for n, p in model.llm.named_parameters() if n in initial and not torch.equal(p, initial[n])]
    assert moved and moved == [n for n in initial if n in moved]  # the adapter itself trained

    folder = model.save_pretrained(str(tmp_path / "adapter"))
    saved = json.loads((tmp_path / "adapter" / CONFIG_NAME).read_text())
    assert saved["adapter"] == "peft" and saved["peft_type"] == PEFT_TYPES[name]
    again = load(folder)
    assert again.num_prefix_tokens == model.num_prefix_tokens == (8 if name == "prefix" else 0)
    # 1e-5: the CI machine saw AdaLoRA's reload differ by 2e-6 in one of nine probabilities (float order)
    torch.testing.assert_close(_scores(again, images), _scores(model, images), rtol=0, atol=1e-5)
    if name == "adalora":  # PEFT's allocator cannot run on ranks already allocated (and pruned on load)
        with pytest.raises(ValueError, match="already allocated its ranks"):
            again.fit(colours[0], output_dir=str(tmp_path / "again"), max_steps=1, **FAST)

    # plain PEFT reads the folder by itself, onto the full-precision base
    theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llm_dir), folder)
    ours = get_peft_model_state_dict(model.llm)
    assert ours.keys() == get_peft_model_state_dict(theirs).keys()
    for key, value in get_peft_model_state_dict(theirs).items():
        torch.testing.assert_close(value, ours[key].to(value.dtype))


def test_strings_keep_building_their_configs(llm_dir, vit_dir):
    model = attach(vit_dir, llm_dir, adapter="lora", lora_r=4)
    assert model.config.adapter == "lora" and model.config.peft_type is None
    assert model.llm.peft_config["default"].r == 4
    prefix = attach(vit_dir, llm_dir, adapter="prefix", num_prefix_tokens=5)
    assert prefix.num_prefix_tokens == 5 and prefix.config.peft_type is None


def test_adalora_reallocates_its_rank_budget_during_fit(tmp_path, llm_dir, vit_dir, colours):
    """PEFT's rank allocator runs after every optimizer step: the final ranks differ between modules and
    sum to the budget (target_r per module), and the masked singular values are exactly zero. The
    projector-only stage first (align_epochs) has no adapter gradients and skips it."""
    model = attach(vit_dir, llm_dir, adapter=adalora())
    config = model.llm.peft_config["default"]
    assert config.rank_pattern is None
    model.fit(colours[0], output_dir=str(tmp_path / "run"), num_train_epochs=2, align_epochs=1, **FAST)
    pattern = config.rank_pattern
    assert pattern is not None
    ranks = {name: sum(kept) for name, kept in pattern.items()}
    assert len(ranks) == 14 and sum(ranks.values()) == 2 * len(ranks)  # 2 layers x 7 linears, target_r=2
    assert len(set(ranks.values())) > 1, ranks  # moved between modules, not cut evenly
    for name, param in model.llm.named_parameters():
        if "lora_E" in name:
            kept = torch.tensor(pattern[name.removeprefix("base_model.model.")])
            assert bool((param[~kept] == 0).all()) and bool((param[kept] != 0).all())


def test_adalora_warns_when_total_step_differs_from_the_steps_trained(tmp_path, llm_dir, vit_dir, colours):
    model = attach(vit_dir, llm_dir, adapter=adalora())
    with pytest.warns(UserWarning, match=f"total_step={STEPS} but this training runs 2"):
        model.fit(colours[0], output_dir=str(tmp_path / "run"), max_steps=2, **FAST)


def test_adalora_refuses_checkpoint_reloads(tmp_path, llm_dir, vit_dir, colours):
    model = attach(vit_dir, llm_dir, adapter=adalora())
    with pytest.raises(ValueError, match="load_best_model_at_end .* not supported with AdaLoRA"):
        model.fit(colours[0], colours[1], output_dir=str(tmp_path / "run"), early_stopping_patience=1,
                  **dict(FAST, save_strategy="epoch"))


def test_adalora_regulariser_is_in_the_packed_training_loss(llm_dir, vit_dir):
    """PEFT adds AdaLoRA's orthogonal regulariser inside AdaLoraModel.forward, which the packed forward
    bypasses: the loss still carries it, equal to what PEFT's forward adds, and so does the gradient."""
    model = attach(vit_dir, llm_dir, adapter=adalora(orth_reg_weight=0.5))
    config = model.llm.peft_config["default"]
    ds = colour_dataset(2, seed=3)
    batch = VLMCollator(model, LABELS)([ds[i] for i in range(6)])
    model.train()
    ids = torch.tensor([[5, 9, 14, 3, 22, 7]])
    with torch.no_grad():
        added_by_peft = model.llm(input_ids=ids, labels=ids).loss - model.base_llm(input_ids=ids, labels=ids).loss
    assert added_by_peft > 0.1
    torch.testing.assert_close(regularization(model.llm), added_by_peft, rtol=1e-5, atol=1e-6)
    loss = model(**batch).loss
    config.orth_reg_weight = 0.0
    without = model(**batch).loss
    torch.testing.assert_close(loss - without, added_by_peft, rtol=1e-4, atol=1e-5)
    # lora_E starts at zero, so the answer loss alone gives lora_A no gradient; the regulariser does
    config.orth_reg_weight = 0.5
    lora_a = next(p for n, p in model.llm.named_parameters() if "lora_A" in n)
    assert torch.autograd.grad(model(**batch).loss, lora_a)[0].abs().sum() > 0
    config.orth_reg_weight = 0.0
    assert torch.autograd.grad(model(**batch).loss, lora_a)[0].abs().sum() == 0


def test_dora_layers_keep_pefts_forward(llm_dir, vit_dir):
    """The fused 4-bit LoRA node computes plain LoRA only; DoRA layers must run PEFT's own forward."""
    model = attach(vit_dir, llm_dir, adapter=METHODS["dora"]())
    with torch.no_grad():  # LoRA B starts at zero and the magnitude at the weight norm: move both
        for name, param in model.llm.named_parameters():
            if "lora_B" in name or "lora_magnitude" in name:
                param.add_(0.05 * torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))))
    ds = colour_dataset(2, seed=9)
    batch = VLMCollator(model, LABELS)([ds[i] for i in range(4)])
    model.train()
    fused = model(**batch).loss
    with peft_lora_forward(model):
        plain = model(**batch).loss
    assert fused.item() == plain.item()


@pytest.mark.parametrize(
    ("adapter", "quantization", "message"),
    [
        (PromptTuningConfig(num_virtual_tokens=4), None, "prepends trainable input embeddings.*PrefixTuningConfig"),
        (LoHaConfig(target_modules=T), "nf4", "LOHA on a nf4 LLM is not supported.*quantization=None"),
        (LoraConfig(use_dora=True), "int8", "DORA on a int8 LLM is not supported"),
        (LoraConfig(task_type="SEQ_CLS"), None, "causal LM"),
    ],
)
def test_unsupported_methods_fail_clearly(llm_dir, vit_dir, adapter, quantization, message):
    with pytest.raises(ValueError, match=message):
        attach(vit_dir, llm_dir, adapter=adapter, quantization=quantization)


def test_a_method_refused_on_4bit_runs_in_full_precision(tmp_path, llm_dir, vit_dir, images):
    model = attach(vit_dir, llm_dir, adapter=LoHaConfig(target_modules=T), quantization=None)
    with torch.no_grad():
        for param in model.llm.parameters():
            if param.requires_grad:
                param.add_(0.05)
    folder = model.save_pretrained(str(tmp_path / "adapter"))
    torch.testing.assert_close(_scores(load(folder), images), _scores(model, images), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="LOHA on a nf4 LLM is not supported"):
        load(folder, quantization="nf4")


def test_saved_configs_are_checked(tmp_path, llm_dir, vit_dir):
    with pytest.raises(ValueError, match="pass the object itself"):
        AdapterConfig(adapter="peft")
    folder = attach(vit_dir, llm_dir, adapter=IA3Config()).save_pretrained(str(tmp_path / "adapter"))
    path = os.path.join(folder, CONFIG_NAME)
    config = json.loads(open(path).read())
    with open(path, "w") as fh:
        json.dump(config | {"peft_type": "LORA"}, fh)
    with pytest.raises(AdapterLoadError, match="holds a IA3 adapter, but .* records LORA"):
        load(folder)


def _dequantized(model):
    """A copy of a bitsandbytes model with every quantized linear replaced by its dequantized weights."""
    model = copy.deepcopy(model)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
                linear = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                if isinstance(child, bnb.nn.Linear4bit):
                    weight = dequantize_4bit(child.weight.data, child.weight.quant_state)
                else:
                    weight = child.weight.data.float() * child.weight.SCB.float()[:, None] / 127
                linear.weight.data = weight.float()
                linear.bias = child.bias
                setattr(module, name, linear)
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize(
    ("quantization", "method"), [(q, m) for q, methods in QUANTIZED_METHODS.items() for m in methods]
)
def test_methods_allowed_on_quantized_layers_compute_as_on_the_dequantized_weights(llm_dir, quantization, method):
    """Same adapter weights on the quantized LLM and on its dequantized copy: NF4 gives the same logits
    (bitsandbytes dequantizes the same way); int8 quantizes activations too, so there the gap may be no
    more than twice the base model's own."""
    torch.manual_seed(0)  # the adapter's initialisation, which the perturbed weights start from
    config = AdapterConfig(quantization=quantization, compute_dtype="float32")
    quantized = load_llm(llm_dir, config, torch.device("cpu"))
    reference = _dequantized(quantized)
    ids = torch.tensor([[5, 9, 14, 3, 22, 7, 40, 11]])
    base_gap = (_logits(quantized, ids) - _logits(reference, ids)).abs().max()
    ours = add_adapter(quantized, config, BY_NAME[method]())
    plain = add_adapter(reference, config, BY_NAME[method]())
    generator = torch.Generator().manual_seed(1)
    state = {k: v + 0.3 * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
             for k, v in get_peft_model_state_dict(ours).items()}
    set_peft_model_state_dict(ours, state)
    set_peft_model_state_dict(plain, state)
    got, want = _logits(ours, ids), _logits(plain, ids)
    tolerance = 1e-4 if quantization == "nf4" else 2 * base_gap
    with ours.disable_adapter():
        moved = (got - _logits(ours, ids)).abs().max()
    assert moved > max(0.5, 4 * tolerance)  # the adapter changes the output well beyond the tolerance
    assert (got - want).abs().max() <= tolerance
