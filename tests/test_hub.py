"""save_pretrained / load / push_to_hub: identical logits after a round trip, clear errors for
folders that do not fit, the Hub cache read offline, and an upload with only HTTP replaced.

What each test proves:
- save_then_load_gives_identical_logits: LoRA, prefix and projector-only adapters save only what was trained and
  reload to the same label scores.
- loading_onto_a_different_base_fails_clearly: another LLM, or a vision base of another width, is refused by the
  signature check, naming both signatures.
- folder_without_projector_fails_loudly: a folder without projector.safetensors is refused.
- pickled_weights_are_refused_unless_allowed: pickles are refused by default and read with weights_only when allowed.
- config_is_validated_before_any_weight_is_read: bad fields, unknown keys and broken JSON are named before weights are
  opened.
- in_memory_base_must_be_named_on_load: an adapter of an in-memory encoder asks for it on load, then gives the same
  scores.
- load_by_repo_id_reads_the_hub_cache_offline: a repo id (and a branch) load from the Hub cache with the network off.
- nf4_base_by_repo_id_is_quantized_from_the_hub_cache_offline: the library's NF4 load finds sharded weights in the Hub
  cache and equals transformers' load.
- push_to_hub_uploads_the_adapter_through_huggingface_hub: the create-repo and commit requests carry the adapter
  files, the visibility and the token, and no file holds the token.
- a_failed_save_leaves_the_previous_adapter_intact: a full disk mid-save leaves the old folder, loading to the same
  scores.
- code_in_a_base_folder_is_never_run: a base folder's auto_map code is not imported without trust_remote_code.
"""

from __future__ import annotations

import json
import os
import shutil

import huggingface_hub
import pytest
import torch
from conftest import colour_dataset, save_llm, save_vision, uploaded_files
from huggingface_hub import ModelCard
from peft import AdaLoraConfig
from safetensors.torch import load_file

from vlm_adapters import AdapterLoadError, attach, load
from vlm_adapters.config import CONFIG_NAME

LABELS = ["red", "green", "blue"]


@pytest.fixture(scope="module")
def images():
    ds = colour_dataset(1, seed=11)
    return [ds[i]["image"] for i in range(len(ds))]


def _trained(model):
    """Move every trainable weight off its initial value (LoRA B starts at zero), as training would."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return model


def _scores(model, images):
    return model.score_labels(model.vision.encode_images(images), LABELS, "What is shown in this image?")


@pytest.mark.parametrize("adapter", ["lora", "prefix", "none"])
def test_save_then_load_gives_identical_logits(tmp_path, llm_dir, vit_dir, images, adapter):
    model = _trained(attach(vit_dir, llm_dir, adapter=adapter))
    before = _scores(model, images)
    folder = model.save_pretrained(str(tmp_path / "adapter"))
    expected = {CONFIG_NAME, "projector.safetensors", "README.md"}
    if adapter != "none":
        expected |= {"adapter_config.json", "adapter_model.safetensors"}
    assert set(os.listdir(folder)) == expected  # only what was trained, no pickles, no base weights
    config = json.loads((tmp_path / "adapter" / CONFIG_NAME).read_text())
    assert config["vision"] == vit_dir and config["llm"] == llm_dir and config["adapter"] == adapter
    card = ModelCard.load(tmp_path / "adapter" / "README.md")
    assert card.data.library_name == "vlm_adapters" and card.data.pipeline_tag == "image-text-to-text"
    assert f'load("{folder}")' in card.text

    again = load(folder)
    torch.testing.assert_close(_scores(again, images), before, rtol=0, atol=1e-5)
    torch.testing.assert_close(
        load_file(os.path.join(folder, "projector.safetensors"))["norm.weight"], again.projector.norm.weight.detach()
    )


def test_loading_onto_a_different_base_fails_clearly(tmp_path, llm_dir, vit_dir):
    folder = attach(vit_dir, llm_dir).save_pretrained(str(tmp_path / "adapter"))
    other_llm = save_llm(str(tmp_path / "qwen"), "qwen2")
    with pytest.raises(AdapterLoadError, match="trained on a llm base .* Load it onto the same base"):
        load(folder, llm=other_llm)
    # 16 patch tokens without CLS, as the ViT, but 48 wide: the signature check must name the mismatch
    other_vision = save_vision(str(tmp_path / "siglip"), "siglip", hidden_size=48)
    with pytest.raises(AdapterLoadError, match="trained on a vision base .*'hidden_size': 32.*'hidden_size': 48.* "
                       "Load it onto the same base"):
        load(folder, vision=other_vision)


def test_folder_without_projector_fails_loudly(tmp_path, llm_dir, vit_dir):
    folder = attach(vit_dir, llm_dir).save_pretrained(str(tmp_path / "adapter"))
    os.remove(os.path.join(folder, "projector.safetensors"))
    with pytest.raises(AdapterLoadError, match="no projector.safetensors"):
        load(folder)


def test_pickled_weights_are_refused_unless_allowed(tmp_path, llm_dir, vit_dir, images):
    model = _trained(attach(vit_dir, llm_dir))
    folder = model.save_pretrained(str(tmp_path / "adapter"))
    projector = load_file(os.path.join(folder, "projector.safetensors"))
    os.remove(os.path.join(folder, "projector.safetensors"))
    torch.save(projector, os.path.join(folder, "projector.bin"))
    with pytest.raises(AdapterLoadError, match="pickle.*refused.*allow_pickle=True"):
        load(folder)
    allowed = load(folder, allow_pickle=True)  # read with torch.load(weights_only=True)
    torch.testing.assert_close(_scores(allowed, images), _scores(model, images), rtol=0, atol=1e-5)


def test_config_is_validated_before_any_weight_is_read(tmp_path, llm_dir, vit_dir):
    folder = attach(vit_dir, llm_dir).save_pretrained(str(tmp_path / "adapter"))
    path = os.path.join(folder, CONFIG_NAME)
    for name in ("projector.safetensors", "adapter_model.safetensors"):
        with open(os.path.join(folder, name), "wb") as fh:
            fh.write(b"not weights")  # reading these would fail differently
    config = json.loads(open(path).read())
    for field, value, message in [
        ("projector", "mlp9x", "projector='mlp9x' is not valid"),
        ("lora_r", -4, "lora_r=-4 is not valid"),
        ("lora_dropout", "high", "lora_dropout='high' is not valid"),
        ("surprise", 1, "Unknown keys \\['surprise'\\]"),
    ]:
        with open(path, "w") as fh:
            json.dump(config | {field: value}, fh)
        with pytest.raises(ValueError, match=message):
            load(folder)
    with open(path, "w") as fh:
        fh.write("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load(folder)


def test_in_memory_base_must_be_named_on_load(tmp_path, llm_dir, vit_dir):
    from transformers import ViTImageProcessor, ViTModel

    encoder = ViTModel.from_pretrained(vit_dir, add_pooling_layer=False)
    model = _trained(attach(encoder, llm_dir, image_processor=ViTImageProcessor.from_pretrained(vit_dir)))
    folder = model.save_pretrained(str(tmp_path / "adapter"))
    with pytest.raises(AdapterLoadError, match="in-memory vision module.*load\\(.*vision="):
        load(folder)
    again = load(folder, vision=encoder, image_processor=ViTImageProcessor.from_pretrained(vit_dir))
    images = [colour_dataset(1, seed=12)[i]["image"] for i in range(3)]
    torch.testing.assert_close(_scores(again, images), _scores(model, images), rtol=0, atol=1e-5)


def _put_in_hub_cache(cache: str, repo_id: str, folder: str, commit: str, branch: str) -> None:
    """The layout huggingface_hub writes when it downloads a repo: blobs, snapshots/<commit>, refs/<branch>."""
    repo = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    shutil.copytree(folder, os.path.join(repo, "snapshots", commit), dirs_exist_ok=True)
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    with open(os.path.join(repo, "refs", branch), "w") as fh:
        fh.write(commit)


def test_load_by_repo_id_reads_the_hub_cache_offline(tmp_path, llm_dir, vit_dir, images, monkeypatch):
    assert huggingface_hub.constants.HF_HUB_OFFLINE  # conftest forces it: any network call would raise
    cache = str(tmp_path / "hub")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", cache)
    first = _trained(attach(vit_dir, llm_dir))
    _put_in_hub_cache(cache, "me/colours", first.save_pretrained(str(tmp_path / "v1")), "a" * 40, "main")
    second = _trained(_trained(attach(vit_dir, llm_dir)))
    _put_in_hub_cache(cache, "me/colours", second.save_pretrained(str(tmp_path / "v2")), "b" * 40, "v2")

    torch.testing.assert_close(_scores(load("me/colours"), images), _scores(first, images), rtol=0, atol=1e-5)
    from_branch = load("me/colours", revision="v2")
    torch.testing.assert_close(_scores(from_branch, images), _scores(second, images), rtol=0, atol=1e-5)
    with pytest.raises(Exception, match="(?i)offline|cannot find|not.*cache"):
        load("me/not-there")


def test_nf4_base_by_repo_id_is_quantized_from_the_hub_cache_offline(tmp_path, llm_dir, monkeypatch):
    """The library's own NF4 load (each tensor mapped on its own) finds a base's shards in the Hub
    cache as transformers does, and loads the weights transformers would."""
    from transformers import AutoModelForCausalLM

    from vlm_adapters.config import AdapterConfig
    from vlm_adapters.llm import _load_quantized_unmapped, quantization_config

    cache = str(tmp_path / "hub")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", cache)
    sharded = str(tmp_path / "sharded")
    AutoModelForCausalLM.from_pretrained(llm_dir).save_pretrained(sharded, max_shard_size="100KB")
    _put_in_hub_cache(cache, "me/tiny-llm", sharded, "c" * 40, "main")
    quant = quantization_config(AdapterConfig(quantization="nf4", compute_dtype="bfloat16"))
    ours = _load_quantized_unmapped("me/tiny-llm", None, quant, torch.device("cpu"), False)
    theirs = AutoModelForCausalLM.from_pretrained(
        "me/tiny-llm", cache_dir=cache, quantization_config=quant, device_map={"": "cpu"}
    )
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert ours.name_or_path == "me/tiny-llm"


@pytest.mark.parametrize(("adapter", "method", "with_app"), [
    ("lora", "LORA", False), ("lora", "LORA", True), (AdaLoraConfig(total_step=10), "ADALORA", False)])
def test_push_to_hub_uploads_the_adapter_through_huggingface_hub(
    tmp_path, llm_dir, vit_dir, fake_hub, adapter, method, with_app
):
    """Only the HTTP layer is replaced: huggingface_hub builds the real create-repo and commit requests.
    With `with_app`, the Space's app.py and requirements.txt go up too, and the card names the SDK."""
    model = attach(vit_dir, llm_dir, adapter=adapter)
    # the names a Hub user's config holds (the model card lists them as its bases and dataset)
    model.config.llm, model.config.vision = "HuggingFaceTB/SmolLM2-135M-Instruct", "google/siglip-base-patch16-224"
    model.config.dataset = "me/colour-squares"
    url = model.push_to_hub("me/colours", token="hf_SecretToken0123456789", private=True, with_app=with_app)
    assert url.endswith("c" * 40)
    create = next(r for r in fake_hub if r.url.path == "/api/repos/create")
    assert json.loads(create.content) == {"name": "colours", "organization": "me", "visibility": "private"}
    assert create.headers["authorization"] == "Bearer hf_SecretToken0123456789"
    uploaded = uploaded_files(fake_hub)
    app_files = {"app.py", "requirements.txt"} if with_app else set()
    assert set(uploaded) == {CONFIG_NAME, "projector.safetensors", "adapter_config.json",
                             "adapter_model.safetensors", "README.md"} | app_files
    card = ModelCard(uploaded["README.md"].decode())
    assert (card.data.get("sdk"), card.data.get("app_file")) == (("gradio", "app.py") if with_app else (None, None))
    if with_app:
        app = uploaded["app.py"].decode()
        assert "serve(load(here)" in app and "colours (vlm_adapters)" in app
    assert card.data.base_model == ["HuggingFaceTB/SmolLM2-135M-Instruct", "google/siglip-base-patch16-224"]
    assert card.data.datasets == ["me/colour-squares"] and card.data.pipeline_tag == "image-text-to-text"
    assert card.data.library_name == "vlm_adapters" and method.lower() in card.data.tags
    assert json.loads(uploaded["adapter_config.json"])["peft_type"] == method
    assert 'load("me/colours")' in card.text  # the usage snippet names the real repo
    for name, content in uploaded.items():
        assert b"hf_SecretToken" not in content, name


def test_a_failed_save_leaves_the_previous_adapter_intact(tmp_path, llm_dir, vit_dir, images, monkeypatch):
    from vlm_adapters import hub

    model = _trained(attach(vit_dir, llm_dir))
    folder = model.save_pretrained(str(tmp_path / "adapter"))
    before = sorted(os.listdir(folder)), _scores(load(folder), images)
    real_save_file = hub.save_file

    def disk_full(*args, **kwargs):
        real_save_file(*args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hub, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        _trained(model).save_pretrained(folder)
    assert sorted(os.listdir(folder)) == before[0]
    assert [n for n in os.listdir(tmp_path) if n != "adapter"] == []  # no staging folder left behind
    torch.testing.assert_close(_scores(load(folder), images), before[1], rtol=0, atol=0)


def test_code_in_a_base_folder_is_never_run(tmp_path, llm_dir, vit_dir):
    """A config's `auto_map` points at code; without trust_remote_code=True it must not be imported."""
    folder = attach(vit_dir, llm_dir).save_pretrained(str(tmp_path / "adapter"))
    tricked = tmp_path / "llm"
    shutil.copytree(llm_dir, tricked)
    marker = tmp_path / "code_ran"
    (tricked / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    config = json.loads((tricked / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "evil.EvilModel", "AutoConfig": "evil.EvilConfig"}
    (tricked / "config.json").write_text(json.dumps(config))
    load(folder, llm=str(tricked))
    assert not marker.exists()
