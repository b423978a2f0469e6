"""Prompts through the LLM's own chat template; fallbacks and clear errors.

What each test proves:
- prompt_uses_the_chat_template_with_image_placeholders: system + user turn with one run of image placeholders; only
  the answer and end of turn are supervised.
- llm_without_chat_template_or_pad_token_uses_plain_template: a GPT-2 style LLM gets the plain template and EOS
  padding, and classifies and describes.
- prompt_too_long_is_an_error_never_a_truncation: a prompt over the context is refused; image tokens are never cut.
- classify_rejects_empty_or_duplicate_labels: empty or repeated labels are refused.
- cuda_device_on_a_cpu_machine_is_a_clear_error: device="cuda" without a GPU names the fix.
- bad_attach_options_name_the_field: unknown projector / adapter / quantization values name the field.
- image_position_and_configs_saved_before_the_option: the question comes before the image by default, after it with
  image_first; configs saved before the option load with the image first.
"""

from __future__ import annotations

import pytest
import torch
from conftest import colour_dataset, save_llm, train_tokenizer

from vlm_adapters import AdapterConfig, PromptTooLongError, attach
from vlm_adapters.prompting import IGNORE_INDEX, IMAGE_TOKEN_ID, PLAIN_TEMPLATE, PromptBuilder


def test_prompt_uses_the_chat_template_with_image_placeholders():
    tok = train_tokenizer()
    builder = PromptBuilder(tok, num_image_tokens=5, max_length=256, system_prompt="Be brief.")
    enc = builder.encode("What is shown in this image?", "red")
    text = tok.decode([i for i in enc.input_ids if i != IMAGE_TOKEN_ID])
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    assert "<|im_start|>assistant\nred<|im_end|>" in text
    assert enc.input_ids.count(IMAGE_TOKEN_ID) == 5
    first = enc.input_ids.index(IMAGE_TOKEN_ID)
    assert enc.input_ids[first : first + 5] == [IMAGE_TOKEN_ID] * 5  # one contiguous run
    supervised = [i for i, label in zip(enc.input_ids, enc.labels) if label != IGNORE_INDEX]
    assert tok.decode(supervised) == "red<|im_end|>"  # the answer and the end of turn, nothing else
    assert builder.answer_ids("red") == tuple(supervised)


def test_llm_without_chat_template_or_pad_token_uses_plain_template(tmp_path, vit_dir):
    path = save_llm(str(tmp_path / "gpt2"), "gpt2", chat_template=None, with_pad=False)
    model = attach(vit_dir, path)
    assert model.prompts.template == PLAIN_TEMPLATE
    assert model.tokenizer.pad_token is None and model.pad_token_id == model.tokenizer.eos_token_id
    enc = model.prompts.encode("What is it?", "red")
    text = model.tokenizer.decode([i for i in enc.input_ids if i != IMAGE_TOKEN_ID])
    assert text.startswith("User: What is it?\n\nAssistant:") and text.endswith("red<|endoftext|>")
    image = colour_dataset(1)[0]["image"]
    assert sum(model.classify(image, ["red", "green"]).values()) == pytest.approx(1.0, abs=1e-5)
    assert isinstance(model.describe(image, max_new_tokens=3), str)


def test_prompt_too_long_is_an_error_never_a_truncation(llm_dir, vit_dir):
    model = attach(vit_dir, llm_dir)
    long_prompt = "describe the color of the object " * 60
    with pytest.raises(PromptTooLongError, match="Image tokens are never truncated"):
        model.classify(colour_dataset(1)[0]["image"], ["red"], prompt=long_prompt)


def test_classify_rejects_empty_or_duplicate_labels(llm_dir, vit_dir):
    model = attach(vit_dir, llm_dir)
    image = colour_dataset(1)[0]["image"]
    with pytest.raises(ValueError, match="at least one candidate"):
        model.classify(image, [])
    with pytest.raises(ValueError, match="unique"):
        model.classify(image, ["red", "blue", "red"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error a CPU-only machine gives")
def test_cuda_device_on_a_cpu_machine_is_a_clear_error(llm_dir, vit_dir):
    with pytest.raises(ValueError, match="no CUDA GPU"):
        attach(vit_dir, llm_dir, device="cuda")


def test_bad_attach_options_name_the_field(llm_dir, vit_dir):
    with pytest.raises(ValueError, match="projector"):
        attach(vit_dir, llm_dir, projector="mlp3x")
    with pytest.raises(ValueError, match="adapter"):
        attach(vit_dir, llm_dir, adapter="ia3")
    with pytest.raises(ValueError, match="quantization"):
        attach(vit_dir, llm_dir, quantization="nf3")


def test_image_position_and_configs_saved_before_the_option():
    tok = train_tokenizer()
    text_first = PromptBuilder(tok, num_image_tokens=2, max_length=256).prompt_ids("Which colour?")
    image_first = PromptBuilder(tok, num_image_tokens=2, max_length=256, image_first=True).prompt_ids("Which colour?")
    question = tok("Which colour?", add_special_tokens=False)["input_ids"]
    for ids, question_before_image in ((text_first, True), (image_first, False)):
        ids = list(ids)
        start = next(i for i in range(len(ids)) if ids[i : i + len(question)] == question)
        assert (start < ids.index(IMAGE_TOKEN_ID)) == question_before_image
    assert AdapterConfig().image_first is False
    old = {k: v for k, v in AdapterConfig().to_dict().items() if k != "image_first"}
    assert AdapterConfig.from_dict(old).image_first is True  # adapters from before the option put the image first


def test_several_images_get_one_placeholder_run_each_after_the_prompt_or_at_its_markers():
    tok = train_tokenizer()
    builder = PromptBuilder(tok, num_image_tokens=3, max_length=256)
    one = builder.prompt_ids("Which colour?")
    assert builder.prompt_ids("Which colour?", 1) == one  # one image: the layout adapters were trained with
    two = list(builder.prompt_ids("Which colour?", 2))
    assert two.count(IMAGE_TOKEN_ID) == 6
    runs = [i for i in range(len(two)) if two[i] == IMAGE_TOKEN_ID and (i == 0 or two[i - 1] != IMAGE_TOKEN_ID)]
    assert len(runs) == 2 and two[runs[0] + 3] != IMAGE_TOKEN_ID  # two runs, with text between them
    question = tok("Which colour?", add_special_tokens=False)["input_ids"]
    start = next(i for i in range(len(two)) if two[i : i + len(question)] == question)
    assert start + len(question) <= runs[0]  # after the prompt by default
    first = PromptBuilder(tok, num_image_tokens=3, max_length=256, image_first=True).prompt_ids("Which colour?", 2)
    asked = next(i for i in range(len(first)) if list(first[i : i + len(question)]) == question)
    assert first.index(IMAGE_TOKEN_ID) < asked  # image_first: before it
    placed = builder.encode("Front: <image> Side: <image> Which colour?", "red", num_images=2)
    text = tok.decode([i if i != IMAGE_TOKEN_ID else tok.convert_tokens_to_ids("<pad>") for i in placed.input_ids])
    assert "Front: <pad><pad><pad> Side: <pad><pad><pad> Which colour?" in text
    with pytest.raises(ValueError, match="has 1 <image> markers but the row has 2 images"):
        builder.encode("Front: <image> Which colour?", num_images=2)
    with pytest.raises(PromptTooLongError, match="60 image tokens for 20 image"):
        PromptBuilder(tok, num_image_tokens=3, max_length=40).encode("Which colour?", num_images=20)
