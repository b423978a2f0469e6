"""attach / forward / classify / describe on tiny random models in real NF4 (bitsandbytes on CPU).

What each test proves:
- attach_loads_llm_in_nf4_with_lora: Llama, Qwen2 and GPT-2 load in NF4 with LoRA; only LoRA and the projector train;
  the encoder stays frozen, in eval mode and unquantized; the projector is float32.
- nf4_load_without_mapping_equals_transformers_load: the one-tensor-at-a-time NF4 load equals transformers' own
  (single and sharded files) in weights, logits and recorded path, with CPU repacking off.
- quantization_none_and_linear_projector: quantization=None, a linear projector and adapter="none" train the projector
  only.
- classify_contract: probabilities over the labels sum to 1, sorted; a batch gives the single image's answer.
- label_scoring_equals_full_sequence_likelihood: trie scoring equals each full sequence's log-likelihood (LoRA,
  prefix).
- predict_equals_the_best_full_score: predict's bounded search returns the top exact score.
- describe_equals_greedy_decoding_of_the_full_sequence: describe (prompt KV cache) equals greedy decoding that reruns
  the whole sequence each step, alone and in a batch.
- forward_loss_only_on_answer_tokens_and_plain_torch_loop: labels cover only the answer; logits come only there; a
  plain PyTorch loop lowers the loss.
- packed_training_forward_equals_the_padded_batch: the packed forward gives the padded batch's loss and gradients.
- packed_rows_end_at_their_last_supervised_token: packing feeds no token after a row's last target.
- prompt_head_runs_once_per_call_and_sees_weights_changed_between_calls: the prompt head is computed once per call,
  with per-batch results, and again after the weights change.
- pixel_values_and_cached_features_give_the_same_loss: raw pixels and cached features give the same loss.
- projector_pooling_reduces_image_tokens: avg / pixel_shuffle pooling computes the documented grid pooling (quadrant
  means, 2x2 neighbours side by side, 1-D windows when the output is not square) before norm and MLP.
- inference_before_training_leaves_the_4bit_weights_trainable: classify / describe before training change neither the
  training loss nor the gradient path.
- auto_compute_dtype_is_the_faster_of_bf16_and_fp32: bf16 only when >= 1.25x faster; the choice reaches every 4-bit
  layer.
- auto_compute_dtype_is_decided_once_per_machine_and_read_back: the decision is written once per machine key with a
  log line, and read back (a decision on file wins over a new timing).
- int8_base_trains_and_reloads: quantization="int8" loads int8 layers, gradients reach LoRA, the loss falls, and a
  reload is int8 with the same scores.
- fused_lora_4bit_equals_peft_lora_in_loss_and_gradients: the fused LoRA node runs on every layer and equals PEFT's
  forward in loss and gradients (fp32 and bf16 compute).
- fused_lora_4bit_falls_back_to_peft_where_it_does_not_apply: a disabled adapter gives the base model's scores; with
  dropout no fused node runs and PEFT's dropout does.
"""

from __future__ import annotations

import json
import logging
import os

import bitsandbytes as bnb
import pytest
import torch
from conftest import colour_dataset, save_llm
from peft import PeftModel

from vlm_adapters import VisionLanguageModel, VLMCollator, attach
from vlm_adapters.collator import pad_right
from vlm_adapters.packing import PackedBatch
from vlm_adapters.prompting import IGNORE_INDEX, IMAGE_TOKEN_ID

LABELS = ["red", "green", "blue"]


@pytest.fixture(scope="module")
def images():
    ds = colour_dataset(2, seed=3)
    return [ds[i]["image"] for i in range(len(ds))]


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_attach_loads_llm_in_nf4_with_lora(tmp_path, vit_dir, family):
    llm_dir = save_llm(str(tmp_path / family), family)
    model = attach(vit_dir, llm_dir, adapter="lora")
    assert isinstance(model, VisionLanguageModel)
    linear4bit = [m for m in model.base_llm.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert linear4bit, "the LLM's linear layers should be bitsandbytes 4-bit"
    assert {m.weight.quant_type for m in linear4bit} == {"nf4"}
    assert isinstance(model.llm, PeftModel)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(("lora_" in n) or n.startswith("projector.") for n in trainable)
    assert any(n.startswith("projector.") for n in trainable)
    # vision tower frozen, in eval mode even after model.train(), never quantized
    model.train()
    assert not model.vision.training and not any(p.requires_grad for p in model.vision.parameters())
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model.vision.modules())
    assert all(p.dtype == torch.float32 for p in model.projector.parameters())


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_nf4_load_without_mapping_equals_transformers_load(tmp_path, family):
    """The library quantizes a checkpoint one mapped tensor at a time (so the whole file never counts
    in RSS); the result must be transformers' own NF4 load: same weights, outputs and recorded path."""
    from transformers import AutoModelForCausalLM

    from vlm_adapters.config import AdapterConfig
    from vlm_adapters.llm import _load_quantized_unmapped, load_llm, quantization_config

    folder = str(tmp_path / family)
    save_llm(folder, family)
    sharded = str(tmp_path / f"{family}-sharded")
    AutoModelForCausalLM.from_pretrained(folder).save_pretrained(sharded, max_shard_size="100KB")
    config = AdapterConfig(quantization="nf4", compute_dtype="bfloat16")
    for path in (folder, sharded):
        assert _load_quantized_unmapped(path, None, quantization_config(config), torch.device("cpu"), False)
        ours = load_llm(path, config, torch.device("cpu"))
        # bitsandbytes' CPU inference repacking has no autograd; the loader turns it off itself
        assert not any(m.support_avx512bf16_for_cpu for m in ours.modules() if isinstance(m, bnb.nn.Linear4bit))
        theirs = AutoModelForCausalLM.from_pretrained(
            path, quantization_config=quantization_config(config), device_map={"": "cpu"}
        )
        a, b = ours.state_dict(), theirs.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert ours.name_or_path == path and ours.is_loaded_in_4bit
        ids = torch.arange(8)[None]
        assert torch.equal(ours(ids).logits, theirs(ids).logits)


def test_quantization_none_and_linear_projector(llm_dir, vit_dir):
    model = attach(vit_dir, llm_dir, quantization=None, projector="linear", adapter="none")
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert isinstance(model.projector.proj, torch.nn.Linear)
    assert not isinstance(model.llm, PeftModel)
    assert {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad} == {"projector"}


@pytest.mark.parametrize("adapter", ["lora", "prefix"])
def test_classify_contract(llm_dir, vit_dir, images, adapter):
    model = attach(vit_dir, llm_dir, adapter=adapter)
    one = model.classify(images[0], LABELS)
    assert isinstance(one, dict) and set(one) == set(LABELS)
    assert sum(one.values()) == pytest.approx(1.0, abs=1e-5)
    assert list(one.values()) == sorted(one.values(), reverse=True)
    many = model.classify(images[:3], LABELS)
    assert isinstance(many, list) and len(many) == 3
    assert many[0] == pytest.approx(one, abs=1e-5)  # batching does not change the answer


@pytest.mark.parametrize("adapter", ["lora", "prefix"])
def test_label_scoring_equals_full_sequence_likelihood(llm_dir, vit_dir, images, adapter):
    """Shared-prefix scoring (one prefill, K candidates against the cache) must equal scoring each
    full sequence separately, including multi-token labels of different lengths."""
    model = attach(vit_dir, llm_dir, adapter=adapter)
    labels = ["red", "a photo of a cat", "green shape"]
    features = model.vision.encode_images(images[:2])
    fast = model.score_labels(features, labels, "What is shown in this image?")
    model.eval()
    for i in range(2):
        for k, label in enumerate(labels):
            enc = model.prompts.encode("What is shown in this image?", label)
            ids = torch.tensor([enc.input_ids])
            with torch.no_grad():
                logits = model.llm(
                    inputs_embeds=model.embed(ids, model.image_embeddings(image_features=features[i : i + 1])),
                    attention_mask=torch.ones_like(ids),
                    position_ids=torch.arange(ids.shape[1])[None],
                ).logits[0]
            labels_t = torch.tensor(enc.labels)
            positions = (labels_t != IGNORE_INDEX).nonzero().squeeze(1)
            logp = logits[positions - 1].float().log_softmax(-1).gather(1, labels_t[positions, None]).sum()
            assert fast[i, k].item() == pytest.approx(logp.item(), abs=2e-3)


@pytest.mark.parametrize("adapter", ["lora", "prefix"])
def test_predict_equals_the_best_full_score(llm_dir, vit_dir, images, adapter):
    """The bounded search of `predict_labels` returns the label with the highest exact score, with
    labels sharing first tokens and of different lengths; untrained models exercise both rounds."""
    model = attach(vit_dir, llm_dir, adapter=adapter)
    labels = ["red", "red square", "a photo of a cat", "a green shape", "blue", "green"]
    features = model.vision.encode_images(images)
    for prompt in ("What is shown in this image?", "Colour?"):
        full = model.score_labels(features, labels, prompt)
        fast = model.predict_labels(features, labels, prompt)
        chosen = full.gather(1, fast[:, None])[:, 0]
        torch.testing.assert_close(chosen, full.max(-1).values, rtol=0, atol=1e-4)
    top = [max(p, key=p.get) for p in model.classify(images[:3], labels)]
    assert model.predict(images[:3], labels) == top and model.predict(images[0], labels) == top[0]


def _greedy_without_cache(model, image, prompt, max_new_tokens):
    """Greedy decoding the plain way: the whole sequence through the PEFT model at every step."""
    features = model.vision.encode_images([image])
    ids = list(model.prompts.encode(prompt).input_ids)
    new = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(input_ids=torch.tensor([ids + new]), image_features=features).logits
            new.append(int(logits[0, -1].argmax()))
            if new[-1] in model.stop_token_ids:
                new.pop()
                break
    return model.tokenizer.decode(new, skip_special_tokens=True).strip()


@pytest.mark.parametrize("adapter", ["lora", "prefix"])
def test_describe_equals_greedy_decoding_of_the_full_sequence(llm_dir, vit_dir, images, adapter):
    model = attach(vit_dir, llm_dir, adapter=adapter)
    with torch.no_grad():  # LoRA B starts at zero: give the adapter a say in what is generated
        for name, param in model.llm.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    model.eval()
    text = model.describe(images[0], max_new_tokens=6)
    assert text and text == _greedy_without_cache(model, images[0], model.config.describe_prompt, 6)
    texts = model.describe(images[:2], max_new_tokens=6)
    assert texts == [text, _greedy_without_cache(model, images[1], model.config.describe_prompt, 6)]


def test_forward_loss_only_on_answer_tokens_and_plain_torch_loop(llm_dir, vit_dir):
    model = attach(vit_dir, llm_dir)
    ds = colour_dataset(4, seed=5)
    batch = VLMCollator(model, LABELS)([ds[i] for i in range(6)])
    ids, labels = batch["input_ids"], batch["labels"]
    assert int((ids == IMAGE_TOKEN_ID).sum()) == 6 * model.projector.num_image_tokens
    assert (labels[ids == IMAGE_TOKEN_ID] == IGNORE_INDEX).all()
    assert (labels[batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    answer_tokens = labels != IGNORE_INDEX
    name_ids = model.prompts.answer_ids(LABELS[ds[0]["label"]])
    assert labels[0][answer_tokens[0]].tolist() == list(name_ids)
    out = model(**batch)
    assert out.logits.shape[0] == int(answer_tokens.sum())  # logits only where supervised
    # a user's own PyTorch loop: the loss falls on a fixed batch
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(15):
        loss = model(**batch).loss
        loss.backward()
        optim.step()
        optim.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3, losses


def _padded_token_losses(model, batch: dict, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain reference: every padded row through the LLM on its own; (cross-entropy of each
    supervised token, the [B, T-1] mask of supervised positions)."""
    embeds = model.embed(batch["input_ids"], model.image_embeddings(image_features=features))
    mask = batch["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    logits = model.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits
    targets = batch["labels"][:, 1:]
    supervised = targets != IGNORE_INDEX
    logits = logits[:, :-1][supervised].float()
    return torch.nn.functional.cross_entropy(logits, targets[supervised], reduction="none"), supervised


@pytest.mark.parametrize("adapter", ["lora", "prefix"])
def test_packed_training_forward_equals_the_padded_batch(llm_dir, vit_dir, images, adapter):
    """The packed forward (shared heads, no padding) gives the loss and gradients of running every
    padded row through the LLM on its own, with rows of two prompts, different lengths and one or
    two images (everything before a row's first image is its shared head). In float32: the check is
    of the math (bf16 rounds the two layouts' matmuls differently, ~1e-3 relative in the gradients)."""
    model = attach(vit_dir, llm_dir, adapter=adapter, system_prompt="Be brief.", compute_dtype="float32")
    model.train()
    rows = [("What is shown in this image?", "red", 1), ("Describe this image.", "a green shape on white", 2),
            ("What is shown in this image?", "a photo of a cat", 2), ("Describe this image.", "blue", 1),
            ("Left: <image> right: <image>", "red blue", 2)]
    batch = pad_right([model.prompts.encode(p, a, num_images=n) for p, a, n in rows], model.pad_token_id)
    features = model.vision.encode_images((images * 2)[:8])
    packed = model(**batch, image_features=features)
    grad_packed = torch.autograd.grad(packed.loss, model.projector.proj[0].weight)[0]
    plain = _padded_token_losses(model, batch, features)[0].mean()
    grad_plain = torch.autograd.grad(plain, model.projector.proj[0].weight)[0]
    assert packed.loss.item() == pytest.approx(plain.item(), abs=1e-4)
    torch.testing.assert_close(grad_packed, grad_plain, rtol=1e-3, atol=1e-5)


def test_packed_weighted_loss_equals_the_padded_weighted_loss(llm_dir, vit_dir, images):
    """Class weights (`row_weights`) scale each row's token losses in the packed forward exactly as
    weighting the padded batch's per-token cross-entropy by its row's weight does."""
    model = attach(vit_dir, llm_dir, system_prompt="Be brief.")
    model.train()
    rows = [("What is shown in this image?", "red"), ("Describe this image.", "a green shape on white"),
            ("What is shown in this image?", "blue")]
    batch = pad_right([model.prompts.encode(p, a) for p, a in rows], model.pad_token_id)
    weights = torch.tensor([4.5, 0.5, 1.0])
    features = model.vision.encode_images(images[:3])
    packed = model(**batch, image_features=features, row_weights=weights)
    grad_packed = torch.autograd.grad(packed.loss, model.projector.proj[0].weight)[0]
    token_loss, supervised = _padded_token_losses(model, batch, features)
    plain = (token_loss * weights[:, None].expand_as(supervised)[supervised]).mean()
    grad_plain = torch.autograd.grad(plain, model.projector.proj[0].weight)[0]
    assert packed.loss.item() == pytest.approx(plain.item(), abs=1e-4)
    torch.testing.assert_close(grad_packed, grad_plain, rtol=1e-3, atol=1e-5)
    unweighted = model(**batch, image_features=features).loss
    assert abs(unweighted.item() - packed.loss.item()) > 0.1  # the weights do change the loss


def test_packed_rows_end_at_their_last_supervised_token(llm_dir, vit_dir):
    """The final end-of-turn of each row is a target but never an input: nothing reads its output; the
    heads of rows with different prompts share their common prefix."""
    model = attach(vit_dir, llm_dir, system_prompt="Be brief.")
    rows = [("What is shown in this image?", "red"), ("Describe this image.", "a green shape on white")]
    batch = pad_right([model.prompts.encode(p, a) for p, a in rows], model.pad_token_id)
    packed = PackedBatch.build(batch["input_ids"], batch["attention_mask"], batch["labels"])
    prefixes, fed = set(), 0
    for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"]):
        # the heads (tokens before the image) share the system turn and user header, fed once: one token
        # per distinct prefix; then each row's tokens up to its final end-of-turn, which sits at `last`
        # and is read at `last - 1`: positions cut .. last - 1
        cut = ids.index(IMAGE_TOKEN_ID)
        prefixes |= {tuple(ids[: i + 1]) for i in range(cut)}
        fed += int((labels != IGNORE_INDEX).nonzero()[-1]) - cut
    assert 0 < len(prefixes) < 2 * batch["input_ids"][0].tolist().index(IMAGE_TOKEN_ID)  # a shared prefix
    assert len(packed.input_ids) == len(prefixes) + fed
    assert packed.targets[-1] != IGNORE_INDEX


@pytest.mark.parametrize("adapter", ["lora", "prefix"])
def test_prompt_head_runs_once_per_call_and_sees_weights_changed_between_calls(
    llm_dir, vit_dir, images, adapter, monkeypatch
):
    """predict / classify / describe run the prompt's image-independent head (system turn, PEFT
    prefix) once for all their batches, with the results of running it per batch; the next call
    computes it again, so weights changed in between are used."""
    model = attach(vit_dir, llm_dir, adapter=adapter, system_prompt="Be brief.")
    adapter_params = [p for n, p in model.llm.named_parameters() if "lora_B" in n or "prompt_encoder" in n]
    heads = []
    head_cache = model._head_cache
    monkeypatch.setattr(model, "_head_cache", lambda ids: heads.append(ids) or head_cache(ids))
    one_by_one = [model.classify(image, LABELS) for image in images[:3]]
    assert len(heads) == 3
    heads.clear()
    together = model.classify(images[:3], LABELS, batch_size=1)
    assert len(heads) == 1
    for a, b in zip(one_by_one, together):
        assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], abs=1e-6) for k in a)
    heads.clear()
    assert model.predict(images[:3], LABELS, batch_size=1) == [max(p, key=p.get) for p in together]
    model.describe(images[:3], max_new_tokens=2, batch_size=1)
    assert len(heads) == 2
    original = [p.detach().clone() for p in adapter_params]
    with torch.no_grad():
        for p in adapter_params:
            p.add_(torch.randn_like(p), alpha=0.5)
    changed = model.classify(images[:3], LABELS, batch_size=1)
    with torch.no_grad():
        for p, value in zip(adapter_params, original):
            p.copy_(value)
    again = model.classify(images[:3], LABELS, batch_size=1)
    assert any(abs(c[k] - t[k]) > 1e-3 for c, t in zip(changed, together) for k in t)
    for a, b in zip(again, together):
        assert all(a[k] == pytest.approx(b[k], abs=1e-6) for k in a)


def test_pixel_values_and_cached_features_give_the_same_loss(llm_dir, vit_dir):
    model = attach(vit_dir, llm_dir).eval()
    ds = colour_dataset(2, seed=6)
    examples = [ds[i] for i in range(4)]
    pixel_batch = VLMCollator(model, LABELS)(examples)
    features = model.vision.encode_images([ex["image"] for ex in examples])
    feature_batch = VLMCollator(model, LABELS)(
        [{"image_features": f, "label": ex["label"]} for f, ex in zip(features, examples)]
    )
    with torch.no_grad():
        assert model(**pixel_batch).loss.item() == pytest.approx(model(**feature_batch).loss.item(), rel=1e-6)


def _expected_pooling(features, pooling, tokens):
    """The documented pooling of a 4x4 grid of patch tokens, written out by hand."""
    grid = features.reshape(features.shape[0], 4, 4, -1)  # [B, row, col, C]
    quadrants = [grid[:, r : r + 2, c : c + 2] for r in (0, 2) for c in (0, 2)]
    if pooling == "pixel_shuffle":  # each 2x2 neighbourhood's channels side by side, row-major
        return torch.stack([q.reshape(q.shape[0], -1) for q in quadrants], 1)
    if tokens == 4:  # a square output: the mean over each quarter of the grid
        return torch.stack([q.mean((1, 2)) for q in quadrants], 1)
    # not square: adaptive average pooling over the sequence, overlapping windows [0:6], [5:11], [10:16]
    return torch.stack([features[:, a:b].mean(1) for a, b in ((0, 6), (5, 11), (10, 16))], 1)


@pytest.mark.parametrize("pooling,tokens", [("avg", 4), ("pixel_shuffle", 4), ("avg", 3)])
def test_projector_pooling_reduces_image_tokens(llm_dir, vit_dir, images, pooling, tokens):
    model = attach(vit_dir, llm_dir, num_image_tokens=tokens, pooling=pooling)
    features = model.vision.encode_images(images[:2])
    embeds = model.image_embeddings(image_features=features)
    assert embeds.shape == (2, tokens, model.config.llm_signature["hidden_size"])
    pooled = _expected_pooling(features, pooling, tokens)  # standardisation is the identity before fit
    with torch.no_grad():
        torch.testing.assert_close(embeds, model.projector.proj(model.projector.norm(pooled)))
    assert model.classify(images[0], LABELS)


def test_inference_before_training_leaves_the_4bit_weights_trainable(llm_dir, vit_dir, images):
    """bitsandbytes repacks 4-bit weights for a no-autograd CPU kernel after eval-mode inference;
    a classify() before fit() must not change the training forward nor stop gradients."""
    model = attach(vit_dir, llm_dir)
    ds = colour_dataset(2, seed=7)
    batch = VLMCollator(model, LABELS)([ds[i] for i in range(4)])
    model.train()
    before = model(**batch).loss
    model.classify(images[0], LABELS)
    model.describe(images[0], max_new_tokens=2)
    model.train()
    after = model(**batch).loss
    assert after.item() == before.item()
    after.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.projector.parameters())


def test_auto_compute_dtype_is_the_faster_of_bf16_and_fp32(llm_dir, vit_dir):
    from vlm_adapters.compute_dtype import faster_dtype
    from vlm_adapters.llm import native_compute_dtype

    assert faster_dtype(fp32_seconds=1.0, bf16_seconds=0.5) == "bfloat16"  # e.g. a CPU with AMX
    assert faster_dtype(fp32_seconds=1.0, bf16_seconds=0.9) == "float32"  # not clearly faster: the exact one
    assert faster_dtype(fp32_seconds=0.55, bf16_seconds=1.0) == "float32"  # AVX512-BF16 without AMX
    assert native_compute_dtype(torch.device("cpu")) in ("bfloat16", "float32")
    model = attach(vit_dir, llm_dir)  # "auto" is resolved once and saved with the adapter
    assert model.config.compute_dtype in ("bfloat16", "float32")
    compute = {m.compute_dtype for m in model.base_llm.modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert compute == {getattr(torch, model.config.compute_dtype)}


def _fused_lora_nodes(loss: torch.Tensor) -> int:
    """How many fused LoRA autograd nodes produced `loss`: proof the fused forward ran, not only was installed."""
    seen, stack, count = set(), [loss.grad_fn], 0
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        count += type(node).__name__ == "_LoRA4bitBackward"
        stack += [child for child, _ in node.next_functions]
    return count


def test_auto_compute_dtype_is_decided_once_per_machine_and_read_back(llm_dir, vit_dir, cache_dir, caplog):
    """A timing at every attach flipped with the machine's load; the decision is cached per machine."""
    from vlm_adapters.compute_dtype import DECISIONS_FILE, cpu_compute_dtype, machine_key

    with caplog.at_level(logging.INFO, logger="vlm_adapters.compute_dtype"):
        first = cpu_compute_dtype()
    path = os.path.join(cache_dir, DECISIONS_FILE)
    with open(path) as fh:
        decisions = json.load(fh)
    assert list(decisions) == [machine_key()] and decisions[machine_key()]["dtype"] == first
    assert f": {first}, timed now, cached in {path}" in caplog.text
    other = "bfloat16" if first == "float32" else "float32"
    decisions[machine_key()]["dtype"] = other  # a decision on file wins over a new timing
    with open(path, "w") as fh:
        json.dump(decisions, fh)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="vlm_adapters.compute_dtype"):
        model = attach(vit_dir, llm_dir)
    assert model.config.compute_dtype == other
    assert {m.compute_dtype for m in model.base_llm.modules() if isinstance(m, bnb.nn.Linear4bit)} == {
        getattr(torch, other)
    }
    assert f": {other}, the decision cached for this machine in {path}" in caplog.text


def test_int8_base_trains_and_reloads(tmp_path, llm_dir, vit_dir, images):
    from vlm_adapters import load

    model = attach(vit_dir, llm_dir, quantization="int8")
    int8 = [m for m in model.base_llm.modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    assert int8 and {m.weight.dtype for m in int8} == {torch.int8}
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    ds = colour_dataset(2, seed=10)
    batch = VLMCollator(model, LABELS)([ds[i] for i in range(6)])
    model.train()
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model(**batch).loss
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)
        optim.step()
        optim.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3, losses
    again = load(model.save_pretrained(str(tmp_path / "adapter")))
    assert again.config.quantization == "int8"
    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in again.base_llm.modules())
    features = model.vision.encode_images(images[:3])
    torch.testing.assert_close(again.score_labels(features, LABELS, "Colour?"),
                               model.score_labels(features, LABELS, "Colour?"), rtol=0, atol=1e-4)


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_fused_lora_4bit_equals_peft_lora_in_loss_and_gradients(llm_dir, vit_dir, compute_dtype):
    """The one-node LoRA forward on 4-bit layers computes PEFT's function: same loss, same gradients
    for the projector and every LoRA weight (bf16 matmuls round in another order: looser there)."""
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    from vlm_adapters.fast_lora import peft_lora_forward

    model = attach(vit_dir, llm_dir, compute_dtype=compute_dtype)
    lora_layers = [m for m in model.modules() if isinstance(m, LoraLinear4bit)]
    assert lora_layers and all("forward" in m.__dict__ for m in lora_layers)
    with torch.no_grad():  # LoRA B starts at zero; give the LoRA term a value and a gradient path
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    ds = colour_dataset(3, seed=8)
    batch = VLMCollator(model, LABELS)([ds[i] for i in range(6)])
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    fused = model(**batch).loss
    assert _fused_lora_nodes(fused) == len(lora_layers)  # every LoRA layer ran fused, once
    fused_grads = torch.autograd.grad(fused, params)
    with peft_lora_forward(model):
        assert not any("forward" in m.__dict__ for m in lora_layers)
        plain = model(**batch).loss
        assert _fused_lora_nodes(plain) == 0
        plain_grads = torch.autograd.grad(plain, params)
    assert all("forward" in m.__dict__ for m in lora_layers)
    tol = 1e-5 if compute_dtype == "float32" else 2e-2
    assert fused.item() == pytest.approx(plain.item(), rel=tol)
    for got, want in zip(fused_grads, plain_grads):
        assert got.abs().sum() > 0
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * want.abs().max().item())


def _with_lora_b(model, value):
    with torch.no_grad():
        for name, param in model.llm.named_parameters():
            if "lora_B" in name:
                param.fill_(value)
    return model


def test_fused_lora_4bit_falls_back_to_peft_where_it_does_not_apply(llm_dir, vit_dir, images):
    """Disabled adapters and LoRA dropout take PEFT's own forward."""
    model = _with_lora_b(attach(vit_dir, llm_dir), 0.05)  # no dropout: fused until the adapter is disabled
    features = model.vision.encode_images(images[:2])
    with_lora = model.score_labels(features, LABELS, "Colour?")
    with model.llm.disable_adapter():
        disabled = model.score_labels(features, LABELS, "Colour?")
    base = _with_lora_b(model, 0.0).score_labels(features, LABELS, "Colour?")  # LoRA's term zero: the base
    torch.testing.assert_close(disabled, base, rtol=0, atol=1e-5)
    assert not torch.allclose(with_lora, base, atol=1e-3)

    model = _with_lora_b(attach(vit_dir, llm_dir, lora_dropout=0.1), 0.05)
    model.train()
    ds = colour_dataset(2, seed=9)
    batch = VLMCollator(model, LABELS)([ds[i] for i in range(4)])
    torch.manual_seed(0)
    first = model(**batch).loss
    assert _fused_lora_nodes(first) == 0
    torch.manual_seed(1)
    assert model(**batch).loss.item() != first.item()  # dropout masks differ: PEFT's dropout ran
