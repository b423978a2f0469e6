"""`merge_and_export`: transformers alone loads the Llava checkpoint and computes the same logits.

What each test proves:
- llava_export_gives_the_same_logits: for CLIP and SigLIP, LlavaForConditionalGeneration gives our logits; its
  processor expands one `<image>` into one token per patch and runs end to end.
- nf4_lora_is_merged_into_full_precision_weights: an NF4-trained LoRA exports into float32 weights equal to the same
  adapter on the float32 base, not the NF4-rounded model.
- unsupported_models_fail_clearly: options Llava cannot express (projector norm, prefix, linear, pooling) name the fix
  and write nothing.
- non_vit_encoders_are_refused: a ViT encoder (not CLIP / SigLIP) is refused by name.
- projector_norm_is_validated: a non-boolean projector_norm is refused.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import colour_image, save_image_text, save_vision
from peft import AdaLoraConfig, IA3Config, LoraConfig, PrefixTuningConfig
from transformers import AutoProcessor, LlavaForConditionalGeneration

from vlm_adapters import attach, load, merge_and_export
from vlm_adapters.prompting import IMAGE_TOKEN_ID

PROMPT = "What is shown in this image?"


@pytest.fixture(scope="module", params=["clip", "siglip", "clip_full", "siglip_full"])
def encoder(request, tmp_path_factory) -> tuple[str, str]:
    """Vision-model checkpoints, and full CLIPModel / SiglipModel ones (text tower included) as users pass."""
    family, full = request.param.removesuffix("_full"), request.param.endswith("_full")
    path = str(tmp_path_factory.mktemp(request.param))
    return family, save_image_text(path, family) if full else save_vision(path, family)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> str:
    return save_vision(str(tmp_path_factory.mktemp("clip")), "clip")


def perturb(model) -> None:
    """LoRA B starts at zero (merging would change nothing): give every adapter weight and the projector
    random values."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        adapter = [p for p in model.llm.parameters() if p.requires_grad]
        assert adapter
        for param in [*adapter, *model.projector.parameters()]:
            param.add_(0.1 * torch.randn(param.shape, generator=generator).to(param))


def ours(model, image) -> tuple[torch.Tensor, list[int], torch.Tensor]:
    pixel_values = model.vision.preprocess([image])
    ids = model.prompts.encode(PROMPT).input_ids
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        logits = model.eval()(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), pixel_values=pixel_values)
    return logits.logits, ids, pixel_values


def test_llava_export_gives_the_same_logits(tmp_path, llm_dir, encoder):
    family, vision_dir = encoder
    model = attach(vision_dir, llm_dir, adapter="lora", quantization=None, projector_norm=False,
                   compute_dtype="float32", device="cpu")
    perturb(model)
    image = colour_image("red", np.random.default_rng(0))
    expected, ids, pixel_values = ours(model, image)
    vocab = len(model.tokenizer)

    out = model.merge_and_export(str(tmp_path / "llava"))
    assert len(model.tokenizer) == vocab  # the "<image>" token went into a copy
    llava = LlavaForConditionalGeneration.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    image_id = llava.config.image_token_id
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == image_id
    assert llava.config.vision_feature_select_strategy == ("default" if family == "clip" else "full")

    llava_ids = torch.tensor([[image_id if i == IMAGE_TOKEN_ID else i for i in ids]])
    with torch.no_grad():
        logits = llava(input_ids=llava_ids, attention_mask=torch.ones_like(llava_ids), pixel_values=pixel_values).logits
    torch.testing.assert_close(logits[..., :vocab], expected[..., :vocab], atol=1e-4, rtol=1e-4)

    # The processor alone expands one "<image>" into one token per patch (16 for 32px / 8px patches).
    batch = processor(text=f"<image>\n{PROMPT}", images=image, return_tensors="pt")
    assert int((batch["input_ids"] == image_id).sum()) == model.projector.num_image_tokens == 16
    torch.testing.assert_close(batch["pixel_values"], pixel_values)
    with torch.no_grad():
        llava(**batch)  # runs end to end on the processor's own output


@pytest.mark.parametrize(
    "adapter",
    ["lora", LoraConfig(use_dora=True, target_modules="all-linear"), IA3Config(),
     AdaLoraConfig(total_step=10, target_modules="all-linear")],
    ids=["lora", "dora", "ia3", "adalora"],
)
def test_nf4_adapter_is_merged_into_full_precision_weights(tmp_path, llm_dir, clip_dir, adapter):
    """Trained on NF4, exported in float32: the export equals the same adapter + projector on the
    float32 base (vlm_adapters' own `load(..., quantization=None)`), not the NF4-rounded model."""
    pytest.importorskip("bitsandbytes")
    model = attach(clip_dir, llm_dir, adapter=adapter, quantization="nf4", projector_norm=False,
                   compute_dtype="float32", device="cpu")
    perturb(model)
    model.save_pretrained(str(tmp_path / "adapter"))
    out = merge_and_export(model, tmp_path / "llava")
    reference = load(str(tmp_path / "adapter"), quantization=None, compute_dtype="float32", device="cpu")
    expected, ids, pixel_values = ours(reference, colour_image("blue", np.random.default_rng(1)))

    llava = LlavaForConditionalGeneration.from_pretrained(out).eval()
    assert all(p.dtype == torch.float32 for p in llava.parameters())
    llava_ids = torch.tensor([[llava.config.image_token_id if i == IMAGE_TOKEN_ID else i for i in ids]])
    with torch.no_grad():
        logits = llava(input_ids=llava_ids, pixel_values=pixel_values).logits
    vocab = len(model.tokenizer)
    torch.testing.assert_close(logits[..., :vocab], expected[..., :vocab], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"projector_norm": True}, "projector_norm=False"),
        ({"adapter": "prefix"}, "prefix"),
        ({"adapter": PrefixTuningConfig(num_virtual_tokens=4)}, "prefix"),
        ({"projector": "linear"}, "mlp2x_gelu"),
        ({"num_image_tokens": 4}, "num_image_tokens=None"),
    ],
)
def test_unsupported_models_fail_clearly(tmp_path, llm_dir, clip_dir, options, message):
    settings = {"adapter": "lora", "projector_norm": False, **options}
    model = attach(clip_dir, llm_dir, quantization=None, compute_dtype="float32", device="cpu", **settings)
    with pytest.raises(ValueError, match=message):
        model.merge_and_export(str(tmp_path / "llava"))
    assert not (tmp_path / "llava").exists()


def test_non_vit_encoders_are_refused(tmp_path, llm_dir, vit_dir):
    model = attach(vit_dir, llm_dir, quantization=None, projector_norm=False, compute_dtype="float32", device="cpu")
    with pytest.raises(ValueError, match="CLIP or SigLIP"):
        model.merge_and_export(str(tmp_path / "llava"))


def test_projector_norm_is_validated():
    from vlm_adapters import AdapterConfig

    with pytest.raises(ValueError, match="projector_norm"):
        AdapterConfig(projector_norm="no")
