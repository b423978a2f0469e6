"""Text from images, mixed into `VisionLanguageCore`: `describe`, `answer` and `generate_from_features`.

Decoding is transformers' own `generate` with a `GenerationConfig`: greedy, beam search, sampling
with temperature / top-p, stop strings, and every other option it has. It runs on the base model
with a KV cache that already holds the PEFT prefix (if any) and the prompt's image-independent
head (computed once per call, `inference.py`), and `inputs_embeds` for the whole sequence, of which
`generate` feeds only the part the cache does not hold (the images and the rest of the prompt).
So LoRA and prefix tuning decode alike; PEFT's own `generate(inputs_embeds=...)` fails with a
prefix, and it would run the shared head again for every batch.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from transformers import GenerationConfig

from .images import ImageInput
from .inference import inference
from .inputs import image_rows
from .prompting import IMAGE_TOKEN_ID

DEFAULT_MAX_NEW_TOKENS = 48


def resolve_generation_config(
    base: GenerationConfig | None = None,
    *,
    max_new_tokens: int | None = None,
    num_beams: int | None = None,
    do_sample: bool | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    stop: str | Sequence[str] | None = None,
) -> GenerationConfig:
    """`base` (a copy; greedy with 48 new tokens when None) with the options that are not None on top,
    as `generate(generation_config=..., **kwargs)` merges them. `stop` becomes `stop_strings`."""
    if base is not None and not isinstance(base, GenerationConfig):
        raise TypeError(
            f"generation_config must be a transformers.GenerationConfig, got {type(base).__name__}; pass "
            "max_new_tokens and the other options by name."
        )
    config = copy.deepcopy(base) if base is not None else GenerationConfig(
        max_new_tokens=DEFAULT_MAX_NEW_TOKENS, do_sample=False, num_beams=1
    )
    options = {"max_new_tokens": max_new_tokens, "num_beams": num_beams, "do_sample": do_sample,
               "temperature": temperature, "top_p": top_p}
    if stop is not None:
        options["stop_strings"] = [stop] if isinstance(stop, str) else list(stop)
        if not options["stop_strings"] or not all(isinstance(s, str) and s for s in options["stop_strings"]):
            raise ValueError(f"stop must be a non-empty string or a list of them; got {stop!r}.")
    config.update(**{k: v for k, v in options.items() if v is not None})
    return config


def _cut(text: str, stops: Sequence[str] | None) -> str:
    """The text before the first stop string: `generate` stops on one but keeps it."""
    ends = [text.find(stop) for stop in stops or () if stop in text]
    return text[: min(ends)].strip() if ends else text


class TextGenerationMixin:
    """Relies on the core's `prompts`, `embed`, `image_embeddings`, `base_llm`, `tokenizer`,
    `pad_token_id`, `stop_token_ids` and on `InferenceMixin`'s `_context` and `_per_batch`."""

    @inference
    def generate_from_features(
        self, features: torch.Tensor, prompt: str, generation_config: GenerationConfig | None = None, **options: Any
    ) -> list[str] | list[list[str]]:
        """Text for each row of encoder features ([B, tokens, hidden] or [B, images, tokens, hidden])
        after `prompt`; `options` as in `describe`. With `num_return_sequences=k`, k texts per row."""
        config = _with_model_tokens(resolve_generation_config(generation_config, **options), self)
        rows, images = image_rows(features)
        ids = self.prompts.encode(prompt, num_images=len(images) // rows).input_ids
        head = ids.index(IMAGE_TOKEN_ID)
        expand = max(config.num_beams or 1, config.num_return_sequences or 1)
        cache = self._context(ids[:head], rows * expand)  # generate expands tensors, not a cache
        rest = torch.tensor(ids[head:], device=self.device).expand(rows, -1)
        embeds = self.embed(rest, self.image_embeddings(image_features=images))
        # generate takes the whole sequence and feeds only what follows the cache: the cached part's
        # embeddings are never read, and positions count the PEFT prefix, as `feed` does.
        past = embeds.new_zeros(rows, cache.get_seq_length(), embeds.shape[-1])
        full = torch.cat([past, embeds], 1)
        out = self.base_llm.generate(
            inputs_embeds=full,
            attention_mask=torch.ones(full.shape[:2], dtype=torch.long, device=self.device),
            **{self.cache_argument: cache},
            generation_config=config,
            tokenizer=self.tokenizer if config.stop_strings else None,
        )
        texts = [self._decode(row, config.stop_strings) for row in out.tolist()]
        per_row = config.num_return_sequences or 1
        return texts if per_row == 1 else [texts[i : i + per_row] for i in range(0, len(texts), per_row)]

    def _decode(self, tokens: list[int], stops: Sequence[str] | None) -> str:
        cut = next((i for i, t in enumerate(tokens) if t in self.stop_token_ids), len(tokens))
        return _cut(self.tokenizer.decode(tokens[:cut], skip_special_tokens=True).strip(), stops)

    def describe(
        self,
        images: ImageInput | Sequence[ImageInput],
        prompt: str | Sequence[str] | None = None,
        *,
        max_new_tokens: int | None = None,
        num_beams: int | None = None,
        do_sample: bool | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        stop: str | Sequence[str] | None = None,
        generation_config: GenerationConfig | None = None,
        batch_size: int = 16,
    ) -> str | list[str] | list[list[str]]:
        """Generated text for each row (greedy, at most 48 new tokens, unless told otherwise).

        One image -> one string; a list -> a list, in which an element that is a list (or tuple) of
        images is one row: `describe([[frontal, lateral]], prompt)` gives one text about both,
        `describe([frontal, lateral])` one text each. `prompt` is one string or one per row; it may
        place the images itself with one `<image>` marker per image.

        The options have transformers' `GenerationConfig` meaning (`num_beams` beam search,
        `do_sample` with `temperature` / `top_p`; seed sampling with `torch.manual_seed`); those not
        None override `generation_config`, which may set any other (`top_k`, `repetition_penalty`,
        `num_return_sequences`: then a list of texts per row). `stop`: a string or strings that end
        the text; the text is cut before the first one.
        """
        config = resolve_generation_config(
            generation_config, max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=do_sample,
            temperature=temperature, top_p=top_p, stop=stop,
        )
        return self._per_batch(
            images, batch_size, lambda features, text: self.generate_from_features(features, text, config),
            self.config.describe_prompt if prompt is None else prompt,
        )

    def answer(
        self, images: ImageInput | Sequence[ImageInput], question: str | Sequence[str], **options: Any
    ) -> str | list[str] | list[list[str]]:
        """The answer to `question` (one string, or one per row) about each row of images; the options
        and the shape of the result are `describe`'s."""
        if not question or (isinstance(question, str) and not question.strip()):
            raise ValueError("answer needs a question; got an empty one. For a free description call describe().")
        return self.describe(images, question, **options)


def _with_model_tokens(config: GenerationConfig, model: Any) -> GenerationConfig:
    """The model's end-of-turn / eos tokens end the text (with any the config names), padding after."""
    config = copy.deepcopy(config)
    named = config.eos_token_id
    named = [] if named is None else [named] if isinstance(named, int) else list(named)
    config.eos_token_id = sorted(set(named) | model.stop_token_ids)
    if config.pad_token_id is None:
        config.pad_token_id = model.pad_token_id
    return config
