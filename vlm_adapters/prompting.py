"""`PromptBuilder`: token ids for (image, prompt, answer) through the LLM's own chat template.

The user turn is the prompt, then the image (`image_first=False`, the default): everything before
the image is then the same for every row that shares a prompt, so the model runs it once per
training batch and once per inference call (`model.py`). `image_first=True` gives LLaVA's order
(image, then prompt).

The image is a run of `IMAGE_TOKEN_ID` (-200, as in LLaVA) placeholders in `input_ids`; the model
replaces them with projected patch embeddings, so the tokenizer's vocabulary and the LLM's
embedding matrix are never changed (nothing but the projector and the adapter needs saving).
Labels are -100 everywhere except the answer and the end-of-turn marker that closes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from transformers import PreTrainedTokenizerBase

IMAGE_TOKEN_ID = -200
IGNORE_INDEX = -100
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

    def _render(self, prompt: str, answer: str | None) -> str:
        messages = [] if self.system_prompt is None else [{"role": "system", "content": self.system_prompt}]
        content = f"{_IMAGE_MARK}\n{prompt}" if self.image_first else f"{prompt}\n{_IMAGE_MARK}"
        messages.append({"role": "user", "content": content})
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
    def prompt_ids(self, prompt: str) -> tuple[int, ...]:
        """Ids of the rendered user turn with image placeholders, ending with the assistant header."""
        before, after = self._render(prompt, None).split(_IMAGE_MARK)
        return (*self._ids(before), *([IMAGE_TOKEN_ID] * self.num_image_tokens), *self._ids(after))

    @lru_cache(maxsize=4096)  # noqa: B019 - class names are scored again for every image
    def answer_ids(self, answer: str) -> tuple[int, ...]:
        """Ids of an answer plus the end-of-turn marker, tokenised the same way in training and scoring."""
        return (*self._ids(answer), *self._ids(self._answer_suffix))

    def encode(self, prompt: str, answer: str | None = None) -> EncodedPrompt:
        prompt_ids = list(self.prompt_ids(prompt))
        answer_ids = list(self.answer_ids(answer)) if answer is not None else []
        total = len(prompt_ids) + len(answer_ids)
        if total > self.max_length:
            raise PromptTooLongError(
                f"the prompt needs {total} tokens ({self.num_image_tokens} image tokens, "
                f"{len(prompt_ids) - self.num_image_tokens} prompt tokens, {len(answer_ids)} answer tokens) but the "
                f"LLM's context holds {self.max_length}. Image tokens are never truncated: shorten the prompt or "
                "answer, or lower num_image_tokens."
            )
        return EncodedPrompt(prompt_ids + answer_ids, [IGNORE_INDEX] * len(prompt_ids) + answer_ids)
