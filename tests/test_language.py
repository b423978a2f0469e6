"""The language half on tiny models: free-text and question rows mixed with label rows, answers that
follow the question about the same image, several images per row, every generation option, and the
feature cache encoding each distinct image once."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import COLOURS, colour_image
from PIL import Image
from transformers import GenerationConfig

from vlm_adapters import VLMCollator, attach
from vlm_adapters.data import as_dataset
from vlm_adapters.features import FEATURES_COLUMN, features_as_tensors, with_image_features

NAMES = list(COLOURS)
FAST = dict(learning_rate=5e-3, projector_lr=5e-3, disable_tqdm=True, save_strategy="no", logging_steps=10)
WHERE = "Where is the bar?"


def bar_image(colour: str, side: str, rng: np.random.Generator, size: int = 32) -> Image.Image:
    """A coloured vertical bar in the left or the right half of a noisy grey image."""
    array = rng.integers(90, 140, size=(size, size, 3)).astype(np.uint8)
    top, left = rng.integers(1, 4), rng.integers(1, 4) if side == "left" else rng.integers(size - 15, size - 12)
    array[top : top + 26, left : left + 12] = np.clip(np.array(COLOURS[colour]) + rng.integers(-20, 20, 3), 0, 255)
    return Image.fromarray(array)


def where_rows(n: int, seed: int) -> list[dict]:
    """Per image: a label row (its colour), a question row (where the bar is) and a caption row."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        colour, side = NAMES[i % 3], ("left", "right")[(i // 3) % 2]
        image = bar_image(colour, side, rng)
        rows += [
            {"image": image, "label": colour, "answer": None, "prompt": None},
            {"image": image, "label": None, "answer": side, "prompt": WHERE},
            {"image": image, "label": None, "answer": f"{colour} {side}", "prompt": "Describe this image."},
        ]
    return rows


def test_free_text_and_questions_mixed_with_labels_learn_where_things_are(tmp_path, llm_dir, vit_dir):
    """`fit` on captions + questions + class labels in one dataset, each row with its own prompt;
    on held-out images the answers follow the image (left / right: chance 0.5), and `evaluate`
    reports accuracy on the label rows beside exact match on the answer rows."""
    train, test = where_rows(96, seed=0), where_rows(24, seed=1)
    # one image token holding the whole patch grid (pixel shuffle): where the bar is becomes
    # a property of the token the projector learns, not of token order the 2-layer LLM must read
    model = attach(vit_dir, llm_dir, num_image_tokens=1, pooling="pixel_shuffle")
    model.fit(train, output_dir=str(tmp_path / "run"), num_train_epochs=4, **FAST)
    assert model.config.labels == sorted(NAMES)  # the class names come from the label rows only
    images = [row["image"] for row in test[::3]]
    sides = [row["answer"] for row in test[1::3]]
    answers = model.answer(images, WHERE, max_new_tokens=8)
    assert set(answers) == {"left", "right"}  # the answer changes with the image
    assert np.mean([a == s for a, s in zip(answers, sides)]) >= 0.9
    captions = model.describe(images, max_new_tokens=10)
    assert np.mean([c == row["answer"] for c, row in zip(captions, test[2::3])]) >= 0.8
    metrics = model.evaluate(test, max_new_tokens=10, progress=False)
    assert metrics["accuracy"] >= 0.9
    assert sum(c["support"] for c in metrics["per_class"].values()) == 24  # label rows only
    assert len(metrics["predictions"]) == 48 and metrics["exact_match"] >= 0.8
    # evaluate generates as describe / answer do, each answer row with its own prompt
    assert metrics["predictions"][0::2] == answers and metrics["predictions"][1::2] == captions


def side_question_rows(n: int, seed: int) -> list[dict]:
    """Two yes/no questions per image, "Is the bar on the left?" and "... right?": the same image, opposite answers."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        side = ("left", "right")[(i // 3) % 2]
        image = bar_image(NAMES[i % 3], side, rng)
        rows += [{"image": image, "label": None, "answer": "yes" if asked == side else "no",
                  "prompt": f"Is the bar on the {asked}?"} for asked in ("left", "right")]
    return rows


@pytest.mark.parametrize("image_first", [False, True])
def test_the_answer_follows_the_question_about_the_same_image(tmp_path, llm_dir, vit_dir, image_first):
    """Each image is asked both questions, so only a model that reads the question text (after the image,
    or before it) answers held-out rows right: an image-only or prior answer gets half of them. With the
    question before the image the 2-layer tiny LLM must look back past the image token: at 4 epochs it
    still answered by the image alone (50%), at 24 it reads the question."""
    train, test = side_question_rows(96, seed=0), side_question_rows(24, seed=1)
    model = attach(vit_dir, llm_dir, num_image_tokens=1, pooling="pixel_shuffle", image_first=image_first)
    model.fit(train, output_dir=str(tmp_path / "run"), num_train_epochs=4 if image_first else 24, **FAST)
    said = [model.answer([row["image"]], row["prompt"], max_new_tokens=4)[0] for row in test]
    assert np.mean([s == row["answer"] for s, row in zip(said, test)]) >= 0.9
    assert said[0::2] != said[1::2]  # the two questions about one image get different answers


def pair_rows(n: int, seed: int) -> list[dict]:
    """Rows of two images; the answer is the colour of the second (the first is another colour)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        second, first = NAMES[i % 3], NAMES[(i + 1 + (i // 3) % 2) % 3]
        images = [colour_image(first, rng), colour_image(second, rng)]
        if i % 2:
            rows.append({"images": images, "label": second, "answer": None, "prompt": None})
        else:
            rows.append({"images": images, "label": None, "answer": second, "prompt": "Which colour is the second?"})
    return rows


def test_rows_of_two_images_learn_an_answer_that_depends_on_the_second(tmp_path, llm_dir, vit_dir):
    """Given the first image, the second is either of two colours: only a model that reads the second
    image's tokens at their own placeholders gets held-out pairs right."""
    train, test = pair_rows(90, seed=0), pair_rows(30, seed=1)
    model = attach(vit_dir, llm_dir)
    model.fit(train, output_dir=str(tmp_path / "run"), num_train_epochs=6, **FAST)
    pairs = [row["images"] for row in test]
    truth = [row["label"] or row["answer"] for row in test]
    said = model.describe(pairs, "Which colour is the second?", max_new_tokens=6)
    assert np.mean([s == t for s, t in zip(said, truth)]) >= 0.9
    assert model.describe([pairs[0]], "Which colour is the second?", max_new_tokens=6) == said[:1]
    swapped = model.describe([[b, a] for a, b in pairs], "Which colour is the second?", max_new_tokens=6)
    firsts = [NAMES[(i + 1 + (i // 3) % 2) % 3] for i in range(30)]
    assert np.mean([s == f for s, f in zip(swapped, firsts)]) >= 0.9  # the order of the images counts
    predicted = model.predict(pairs, NAMES)
    assert np.mean([p == t for p, t in zip(predicted, truth)]) >= 0.9
    scores = model.classify(pairs[:4], NAMES)
    assert [max(s, key=s.get) for s in scores] == predicted[:4]
    assert model.predict([pairs[0]], NAMES) == predicted[:1]  # [[a, b]]: one row of two images
    assert len(model.predict(pairs[0], NAMES)) == 2  # [a, b]: two rows of one image each
    metrics = model.evaluate(test, max_new_tokens=6, progress=False)
    assert metrics["accuracy"] >= 0.9 and metrics["exact_match"] >= 0.9


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(5)
    return [colour_image(name, rng) for name in NAMES * 2]


def _greedy_reference(model, image, prompt: str, steps: int) -> list[int]:
    """Greedy decoding the plain way: the whole sequence through the PEFT model at every step."""
    ids = model.prompts.encode(prompt).input_ids
    image_embeds = model.image_embeddings(image_features=model.vision.encode_images([image]))
    out: list[int] = []
    model.eval()
    with torch.no_grad():
        for _ in range(steps):
            seq = torch.tensor([ids + out])
            logits = model.llm(
                inputs_embeds=model.embed(seq, image_embeds), attention_mask=torch.ones_like(seq),
                position_ids=torch.arange(seq.shape[1])[None],
            ).logits
            out.append(int(logits[0, -1].argmax()))
            if out[-1] in model.stop_token_ids:
                break
    return out


def _text(model, tokens: list[int]) -> str:
    cut = next((i for i, t in enumerate(tokens) if t in model.stop_token_ids), len(tokens))
    return model.tokenizer.decode(tokens[:cut], skip_special_tokens=True).strip()


@pytest.mark.parametrize("adapter", ["lora", "prefix"])
def test_generation_options(llm_dir, vit_dir, images, adapter):
    """Greedy decoding is the plain one step for step (max_new_tokens cuts it); beams, sampling,
    temperature, top_p, stop strings and a GenerationConfig reach transformers' generate."""
    model = attach(vit_dir, llm_dir, adapter=adapter, system_prompt="Be brief.")
    prompt = "Describe this image."
    with torch.no_grad():
        for param in model.adapter_parameters:  # a non-trivial adapter (LoRA B starts at zero)
            param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(param.numel())), alpha=0.3)
    reference = [_greedy_reference(model, image, prompt, 10) for image in images[:3]]
    for steps in (1, 3, 10):
        expected = [_text(model, tokens[:steps]) for tokens in reference]
        assert model.describe(images[:3], max_new_tokens=steps, batch_size=2) == expected
    greedy = [_text(model, tokens) for tokens in reference]

    beams = model.describe(images[:3], num_beams=3, max_new_tokens=10)
    assert beams == [model.describe(image, num_beams=3, max_new_tokens=10) for image in images[:3]]
    returned = model.describe(
        images[:2], generation_config=GenerationConfig(num_beams=3, num_return_sequences=3, max_new_tokens=10)
    )
    assert [len(texts) for texts in returned] == [3, 3] and [texts[0] for texts in returned] == beams[:2]
    if adapter == "lora":  # PEFT's own generate, on the whole sequence without a cache (it fails with a prefix)
        ids = torch.tensor([model.prompts.encode(prompt).input_ids])
        embeds = model.embed(ids, model.image_embeddings(image_features=model.vision.encode_images(images[:1])))
        theirs = model.llm.generate(
            inputs_embeds=embeds, attention_mask=torch.ones_like(ids), num_beams=3, do_sample=False,
            max_new_tokens=10, eos_token_id=sorted(model.stop_token_ids), pad_token_id=model.pad_token_id,
        )
        assert beams[0] == _text(model, theirs[0].tolist())

    def sampled(**options):
        torch.manual_seed(0)
        return model.describe(images[:3], do_sample=True, max_new_tokens=10, **options)

    hot = sampled(temperature=5.0)
    assert hot == sampled(temperature=5.0) and hot != greedy  # reproducible with a seed, not greedy
    assert sampled(temperature=1e-4) == greedy  # temperature reaches the sampler
    assert sampled(temperature=5.0, top_p=1e-6) == greedy  # the nucleus holds only the top token

    piece = next(
        model.tokenizer.decode([t]).strip() for t in reference[0][1:] if model.tokenizer.decode([t]).strip().isalnum()
    )
    cut = greedy[0][: greedy[0].index(piece)].strip()
    assert cut != greedy[0]
    assert model.describe(images[0], stop=piece, max_new_tokens=10) == cut
    assert model.describe(images[0], stop=["never in any text", piece], max_new_tokens=10) == cut
    assert model.describe(images[0], stop="never in any text", max_new_tokens=10) == greedy[0]
    config = GenerationConfig(num_beams=3, max_new_tokens=4)
    assert model.describe(images[:3], generation_config=config, max_new_tokens=10) == beams  # options win
    assert model.answer(images[:2], [prompt, "Colour?"], max_new_tokens=10) == [
        greedy[0], model.describe(images[1], "Colour?", max_new_tokens=10)
    ]
    with pytest.raises(ValueError, match="2 prompts for 3 rows"):
        model.describe(images[:3], ["a", "b"])
    with pytest.raises(ValueError, match="needs a question"):
        model.answer(images[0], "")
    with pytest.raises(TypeError, match="pass max_new_tokens and the other options by name"):
        model.generate_from_features(model.vision.encode_images(images[:1]), prompt, 8)


def test_each_distinct_image_is_encoded_once(tmp_path, llm_dir, vit_dir):
    """Rows are keyed by image content: 8 images under 24 single-image rows and 8 pair rows go
    through the encoder 8 times, and every row gets exactly the features of its own images."""
    rng = np.random.default_rng(0)
    pictures = [colour_image(NAMES[i % 3], rng) for i in range(8)]
    questions = (("Q1", "a"), ("Q2", "b"), ("Q3", "c"))
    single = [{"image": p, "answer": a, "prompt": q} for p in pictures for q, a in questions]
    pairs = [{"images": [pictures[i], pictures[(i + 3) % 8]], "label": NAMES[i % 3]} for i in range(8)]
    model = attach(vit_dir, llm_dir)
    shape = (model.projector.num_vision_tokens, model.config.vision_signature["hidden_size"])
    encoded = []
    hook = model.vision.register_forward_hook(lambda _m, args, _o: encoded.append(len(args[0])))
    cached = with_image_features(as_dataset(single), model.vision, cache_dir=str(tmp_path), token_shape=shape)
    assert sum(encoded) == 8 and len(cached) == 24
    live = model.vision.encode_images(pictures)
    features = torch.as_tensor(np.array(cached[FEATURES_COLUMN], dtype=np.float32))
    torch.testing.assert_close(features, live.repeat_interleave(3, 0))
    encoded.clear()
    cached_pairs = with_image_features(as_dataset(pairs), model.vision, cache_dir=str(tmp_path), token_shape=shape)
    assert sum(encoded) == 8
    for i, row in enumerate(cached_pairs):
        torch.testing.assert_close(torch.tensor(row[FEATURES_COLUMN], dtype=torch.float32), live[[i, (i + 3) % 8]])
    encoded.clear()
    again = with_image_features(as_dataset(pairs), model.vision, cache_dir=str(tmp_path), token_shape=shape)
    hook.remove()
    assert not encoded and len(again) == 8  # the second time reads the cache
    collate = VLMCollator(model, NAMES)  # rows of two images: cached features or pixels, one loss
    with torch.no_grad():
        from_pixels = model(**collate(pairs)).loss
        from_cache = model(**collate([dict(row) for row in features_as_tensors(cached_pairs)])).loss
    assert from_pixels.item() == pytest.approx(from_cache.item(), rel=1e-5)
