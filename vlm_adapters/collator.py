"""`VLMCollator`: dataset rows -> `model(**batch)` inputs (input_ids, attention_mask, labels, the images).

Rows hold an `image`, `images` (a list) or cached `image_features`, plus either `label` (a class)
or `answer` (free text), each with an optional `prompt`; label rows and answer rows mix freely in
one batch. The images of all rows go into one tensor in row order, image by image, the order of
their placeholders in `input_ids`. The model packs the padded batch itself (`packing.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from .data import FEATURES_COLUMN, label_text, row_images
from .prompting import IGNORE_INDEX, EncodedPrompt

if TYPE_CHECKING:
    from .modeling import VisionLanguageCore


def pad_right(encoded: Sequence[EncodedPrompt], pad_token_id: int) -> dict[str, torch.Tensor]:
    """input_ids / attention_mask / labels padded on the right to the longest row."""
    width = max(len(e.input_ids) for e in encoded)
    return {
        "input_ids": torch.tensor([e.input_ids + [pad_token_id] * (width - len(e.input_ids)) for e in encoded]),
        "attention_mask": torch.tensor([[1] * len(e.input_ids) + [0] * (width - len(e.input_ids)) for e in encoded]),
        "labels": torch.tensor([e.labels + [IGNORE_INDEX] * (width - len(e.labels)) for e in encoded]),
    }


class VLMCollator:
    """Turns examples into `model(**batch)` inputs: input_ids, attention_mask, labels and the image.

    For label data it can also teach describing: an example whose `describe` field is true is
    asked `describe_prompt` and answered with `describe_template.format(label=...)`. (`fit` marks a
    fixed, seeded share of rows, so a resumed run sees exactly the batches an uninterrupted one does.)
    """

    def __init__(
        self,
        model: VisionLanguageCore,
        label_names: Sequence[str] | None = None,
        describe_template: str = "This image shows {label}.",
    ) -> None:
        self.model = model
        self.label_names = list(label_names) if label_names else None
        self.describe_template = describe_template

    def text(self, example: dict[str, Any]) -> tuple[str, str]:
        config = self.model.config
        if "answer" in example and example["answer"] is not None:
            return example.get("prompt") or config.describe_prompt, str(example["answer"])
        name = label_text(example["label"], self.label_names)
        if example.get("describe"):
            return config.describe_prompt, self.describe_template.format(label=name)
        return example.get("prompt") or config.classify_prompt, name

    def encode(self, example: dict[str, Any]) -> EncodedPrompt:
        return self.model.prompts.encode(*self.text(example), num_images=num_images(example))

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = pad_right([self.encode(ex) for ex in examples], self.model.pad_token_id)
        if FEATURES_COLUMN in examples[0]:
            batch[FEATURES_COLUMN] = torch.cat([_image_features(ex) for ex in examples]).float()
        else:
            batch["pixel_values"] = self.model.vision.preprocess([img for ex in examples for img in row_images(ex)])
        return batch


def _image_features(example: dict[str, Any]) -> torch.Tensor:
    """[images, tokens, hidden] of a row: cached 'image' rows hold [tokens, hidden]."""
    features = torch.as_tensor(example[FEATURES_COLUMN])
    return features[None] if features.dim() == 2 else features


def num_images(example: dict[str, Any]) -> int:
    if FEATURES_COLUMN in example:
        return len(_image_features(example))
    return len(row_images(example))


