"""attach / forward / classify / describe on tiny random models in real NF4 (bitsandbytes on CPU)."""

from __future__ import annotations

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


@pytest.mark.parametrize("adapter", ["lora", "prefix"])
def test_describe_returns_text(llm_dir, vit_dir, images, adapter):
    model = attach(vit_dir, llm_dir, adapter=adapter)
    text = model.describe(images[0], max_new_tokens=6)
    assert isinstance(text, str)
    texts = model.describe(images[:2], max_new_tokens=6)
    assert isinstance(texts, list) and len(texts) == 2 and texts[0] == text


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


@pytest.mark.parametrize("adapter", ["lora", "prefix"])
def test_packed_training_forward_equals_the_padded_batch(llm_dir, vit_dir, images, adapter):
    """The packed forward (shared heads, no padding) gives the loss and gradients of running every
    padded row through the LLM on its own, with rows of two prompts and different lengths. In float32:
    bfloat16 rounds the two ways' matmuls of other shapes differently."""
    model = attach(vit_dir, llm_dir, adapter=adapter, system_prompt="Be brief.", compute_dtype="float32")
    model.train()
    rows = [("What is shown in this image?", "red"), ("Describe this image.", "a green shape on white"),
            ("What is shown in this image?", "a photo of a cat"), ("Describe this image.", "blue")]
    batch = pad_right([model.prompts.encode(p, a) for p, a in rows], model.pad_token_id)
    features = model.vision.encode_images(images[:4])
    packed = model(**batch, image_features=features)
    grad_packed = torch.autograd.grad(packed.loss, model.projector.proj[0].weight)[0]
    embeds = model.embed(batch["input_ids"], model.image_embeddings(image_features=features))
    mask = batch["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    logits = model.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits
    targets = batch["labels"][:, 1:]
    supervised = targets != IGNORE_INDEX
    plain = torch.nn.functional.cross_entropy(logits[:, :-1][supervised].float(), targets[supervised])
    grad_plain = torch.autograd.grad(plain, model.projector.proj[0].weight)[0]
    assert packed.loss.item() == pytest.approx(plain.item(), abs=1e-4)
    torch.testing.assert_close(grad_packed, grad_plain, rtol=1e-3, atol=1e-5)


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


@pytest.mark.parametrize("pooling,tokens", [("avg", 4), ("pixel_shuffle", 4), ("avg", 3)])
def test_projector_pooling_reduces_image_tokens(llm_dir, vit_dir, images, pooling, tokens):
    model = attach(vit_dir, llm_dir, num_image_tokens=tokens, pooling=pooling)
    embeds = model.image_embeddings(image_features=model.vision.encode_images(images[:2]))
    assert embeds.shape == (2, tokens, model.config.llm_signature["hidden_size"])
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
    from vlm_adapters.llm import faster_dtype, native_compute_dtype

    assert faster_dtype(fp32_seconds=1.0, bf16_seconds=0.5) == "bfloat16"  # e.g. a CPU with AMX
    assert faster_dtype(fp32_seconds=1.0, bf16_seconds=0.9) == "float32"  # not clearly faster: the exact one
    assert faster_dtype(fp32_seconds=0.55, bf16_seconds=1.0) == "float32"  # AVX512-BF16 without AMX
    assert native_compute_dtype(torch.device("cpu")) in ("bfloat16", "float32")
    model = attach(vit_dir, llm_dir)  # "auto" is resolved once and saved with the adapter
    assert model.config.compute_dtype in ("bfloat16", "float32")
    compute = {m.compute_dtype for m in model.base_llm.modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert compute == {getattr(torch, model.config.compute_dtype)}


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
    fused_grads = torch.autograd.grad(fused, params)
    with peft_lora_forward(model):
        assert not any("forward" in m.__dict__ for m in lora_layers)
        plain = model(**batch).loss
        plain_grads = torch.autograd.grad(plain, params)
    assert all("forward" in m.__dict__ for m in lora_layers)
    tol = 1e-5 if compute_dtype == "float32" else 2e-2
    assert fused.item() == pytest.approx(plain.item(), rel=tol)
    for got, want in zip(fused_grads, plain_grads):
        assert got.abs().sum() > 0
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * want.abs().max().item())


def test_fused_lora_4bit_falls_back_to_peft_where_it_does_not_apply(llm_dir, vit_dir, images):
    """Disabled adapters and LoRA dropout take PEFT's own forward."""
    model = attach(vit_dir, llm_dir, lora_dropout=0.1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.fill_(0.05)
    features = model.vision.encode_images(images[:2])
    with_lora = model.score_labels(features, LABELS, "Colour?")
    with model.llm.disable_adapter():
        without = model.score_labels(features, LABELS, "Colour?")
    assert not torch.allclose(with_lora, without)
    model.train()
    ds = colour_dataset(2, seed=9)
    batch = VLMCollator(model, LABELS)([ds[i] for i in range(4)])
    torch.manual_seed(0)
    first = model(**batch).loss
    torch.manual_seed(1)
    assert model(**batch).loss.item() != first.item()  # dropout masks differ: PEFT's dropout ran
