"""`PromptBuilder`: token ids for (images, prompt, answer) through the LLM's own chat template.

The user turn is the prompt, then the images (`image_first=False`, the default): everything before
the first image is then the same for every row that shares a prompt, so the model runs it once per
training batch and once per inference call (`packing.py`, `inference.py`). `image_first=True` gives
LLaVA's order (images, then prompt). A prompt may place the images itself with one `<image>`
marker per image ("Frontal: <image> Lateral: <image> Any effusion?").

Each image is a run of `num_image_tokens` `IMAGE_TOKEN_ID` (-200, as in LLaVA) placeholders in
`input_ids`, one run per image in order; the model replaces them with projected patch embeddings,
so the tokenizer's vocabulary and the LLM's embedding matrix are never changed (nothing but the
projector and the adapter needs saving). Labels are -100 everywhere except the answer and the
end-of-turn marker that closes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from transformers import PreTrainedTokenizerBase

IMAGE_TOKEN_ID = -200
IGNORE_INDEX = -100
IMAGE_MARKER = "<image>"  # where a prompt places an image itself, as in LLaVA and transformers' processors
_IMAGE_MARK = "<<vlm_adapters_image>>"
_ANSWER_MARK = "<<vlm_adapters_answer>>"
# Used when the tokenizer has no chat template (base models such as GPT-2); documented in the README.
PLAIN_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}User: {{ m['content'] }}\n"
    "{% else %}Assistant: {{ m['content'] }}{{ eos_token }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


class PromptTooLongError(ValueError):
    """The image tokens and text do not fit the LLM's context; image tokens are never cut."""


@dataclass(frozen=True)
class EncodedPrompt:
    input_ids: list[int]
    labels: list[int]


class PromptBuilder:
    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        num_image_tokens: int,
        max_length: int,
        system_prompt: str | None = None,
        image_first: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.num_image_tokens = num_image_tokens
        self.max_length = max_length
        self.system_prompt = system_prompt
        self.image_first = image_first
        self.template = tokenizer.chat_template or PLAIN_TEMPLATE
        self._answer_suffix = self._find_answer_suffix()

    def _user_turn(self, prompt: str, num_images: int) -> str:
        """The prompt with one image mark per image: at its `<image>` markers, else after (or before) it."""
        markers = prompt.count(IMAGE_MARKER)
        if markers == 0:
            images = "\n".join([_IMAGE_MARK] * num_images)
            return f"{images}\n{prompt}" if self.image_first else f"{prompt}\n{images}"
        if markers != num_images:
            raise ValueError(
                f"the prompt {prompt!r} has {markers} {IMAGE_MARKER} markers but the row has {num_images} "
                f"image{'s' * (num_images != 1)}; write one {IMAGE_MARKER} per image, or none to put the images "
                f"{'before' if self.image_first else 'after'} the prompt."
            )
        return prompt.replace(IMAGE_MARKER, _IMAGE_MARK)

    def _render(self, prompt: str, answer: str | None, num_images: int = 1) -> str:
        messages = [] if self.system_prompt is None else [{"role": "system", "content": self.system_prompt}]
        messages.append({"role": "user", "content": self._user_turn(prompt, num_images)})
        if answer is not None:
            messages.append({"role": "assistant", "content": answer})
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.template, tokenize=False, add_generation_prompt=answer is None
        )

    def _find_answer_suffix(self) -> str:
        """The text the template writes after an assistant answer, up to the end-of-turn token."""
        head = self._render("x", None)
        full = self._render("x", _ANSWER_MARK)
        after = full[len(head) :] if full.startswith(head) else full[full.index(_ANSWER_MARK) :]
        suffix = after.split(_ANSWER_MARK, 1)[1].rstrip()
        return suffix or (self.tokenizer.eos_token or "")

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @lru_cache(maxsize=256)  # noqa: B019 - prompts repeat across a dataset; the builder lives as long as the model
    def prompt_ids(self, prompt: str, num_images: int = 1) -> tuple[int, ...]:
        """Ids of the rendered user turn with one run of image placeholders per image, ending with the
        assistant header."""
        if num_images < 1:
            raise ValueError(f"a row needs at least one image, got {num_images}.")
        first, *rest = self._render(prompt, None, num_images).split(_IMAGE_MARK)
        ids = list(self._ids(first))
        for text in rest:
            ids += [IMAGE_TOKEN_ID] * self.num_image_tokens + self._ids(text)
        return tuple(ids)

    @lru_cache(maxsize=4096)  # noqa: B019 - class names are scored again for every image
    def answer_ids(self, answer: str) -> tuple[int, ...]:
        """Ids of an answer plus the end-of-turn marker, tokenised the same way in training and scoring."""
        return (*self._ids(answer), *self._ids(self._answer_suffix))

    def encode(self, prompt: str, answer: str | None = None, num_images: int = 1) -> EncodedPrompt:
        prompt_ids = list(self.prompt_ids(prompt, num_images))
        answer_ids = list(self.answer_ids(answer)) if answer is not None else []
        total = len(prompt_ids) + len(answer_ids)
        image_tokens = num_images * self.num_image_tokens
        if total > self.max_length:
            raise PromptTooLongError(
                f"the prompt needs {total} tokens ({image_tokens} image tokens for {num_images} image(s), "
                f"{len(prompt_ids) - image_tokens} prompt tokens, {len(answer_ids)} answer tokens) but the "
                f"LLM's context holds {self.max_length}. Image tokens are never truncated: shorten the prompt or "
                "answer, or lower num_image_tokens."
            )
        return EncodedPrompt(prompt_ids + answer_ids, [IGNORE_INDEX] * len(prompt_ids) + answer_ids)
