"""Zero-shot image-text scoring with the CLIP / SigLIP checkpoint the encoder came from: the baseline
a fine-tuned model should beat, for free when a full checkpoint (text tower included) was attached.

It computes what transformers' zero-shot-image-classification pipeline computes: each label goes into
`template` ("This is a photo of {}." as there), the checkpoint's own tokenizer encodes the texts
(SigLIP padded to 64 tokens, as it was trained) and the image-text model's `logits_per_image`
(logit_scale x cosine similarity, + logit_bias for SigLIP) become probabilities: a softmax over the
labels for CLIP, an independent sigmoid per label for SigLIP (its scores need not sum to 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .data import as_dataset, label_names, label_text
from .images import ImageInput
from .inputs import as_rows, check_labels
from .modeling import VisionLanguageCore

TEMPLATE = "This is a photo of {}."


def _image_text_model(model: VisionLanguageCore, tokenizer: Any) -> tuple[torch.nn.Module, Any]:
    tower = model.vision
    image_text = tower.image_text_model
    if image_text is None:
        raise ValueError(
            f"zero-shot scoring needs a CLIP / SigLIP checkpoint with its text tower (e.g. "
            f"'openai/clip-vit-base-patch32' or 'google/siglip-base-patch16-224', attached by name or path); this "
            f"model's encoder is a {type(tower.encoder).__name__} ({tower.kind}) without one. Attach the full "
            "checkpoint, not its *VisionModel, to compare with its zero-shot scores."
        )
    tokenizer = tokenizer or tower.text_tokenizer
    if tokenizer is None:
        raise ValueError(
            "the image-text model has no tokenizer here (the encoder was passed as a module, or its checkpoint "
            "ships none); pass clip_classify(..., tokenizer=AutoTokenizer.from_pretrained(<the checkpoint>))."
        )
    return image_text, tokenizer


@torch.no_grad()
def clip_probabilities(
    model: VisionLanguageCore, images: Sequence[ImageInput], labels: Sequence[str], template: str, tokenizer: Any
) -> torch.Tensor:
    """[B, K] zero-shot probabilities of each label for each image (see the module docstring)."""
    image_text, tokenizer = _image_text_model(model, tokenizer)
    siglip = "siglip" in image_text.config.model_type
    padding = {"padding": "max_length", "max_length": 64, "truncation": True} if siglip else {"padding": True}
    texts = tokenizer([template.format(label) for label in labels], return_tensors="pt", **padding)
    device = model.vision.device
    pixels = model.vision.preprocess(images).to(device, next(image_text.parameters()).dtype)
    logits = image_text(**texts.to(device), pixel_values=pixels).logits_per_image.float()
    return logits.sigmoid() if siglip else logits.softmax(-1)


def clip_classify(
    model: VisionLanguageCore,
    images: ImageInput | Sequence[ImageInput],
    labels: Sequence[str],
    template: str = TEMPLATE,
    batch_size: int = 16,
    tokenizer: Any = None,
) -> dict[str, float] | list[dict[str, float]]:
    """Zero-shot probability of each label, most likely first; one image -> one dict."""
    labels = check_labels(labels)
    single, rows = as_rows(images)
    if several := [i for i, row in enumerate(rows) if len(row) > 1]:
        raise ValueError(f"row {several[0]} holds {len(rows[several[0]])} images; the image-text model scores one "
                         "image per row, so pass a flat list of images.")
    batch = [row[0] for row in rows]
    out = []
    for start in range(0, len(batch), batch_size):
        probs = clip_probabilities(model, batch[start : start + batch_size], labels, template, tokenizer)
        out += [dict(sorted(zip(labels, row), key=lambda item: -item[1])) for row in probs.tolist()]
    return out[0] if single else out


def zero_shot_accuracy(model: VisionLanguageCore, dataset: Any, batch_size: int = 16) -> float:
    """Accuracy of the zero-shot top label over a label dataset's images (its class names as the labels)."""
    data = as_dataset(dataset)
    names = label_names(data)
    if not names or "image" not in data.column_names:
        raise ValueError(
            "the zero-shot baseline needs label data with an 'image' column (cached encoder features cannot "
            "be scored by the image-text model)."
        )
    right = 0
    for start in range(0, len(data), batch_size):
        rows = data[start : start + batch_size]
        top = clip_probabilities(model, rows["image"], names, TEMPLATE, None).argmax(-1).tolist()
        right += sum(names[i] == label_text(label, names) for i, label in zip(top, rows["label"], strict=True))
    return right / len(data)
