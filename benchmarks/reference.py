"""The standard recipe, written the way the transformers / TRL documentation does it, for side-by-side
benchmarks: every training step runs the vision encoder on the batch's pixels, the LLM computes
full-vocabulary logits at every position (its own `labels=` loss), batches are padded to the longest
sequence, LoRA runs PEFT's own forward (run training inside `peft_lora_forward(vlm)`), and
classification is `generate` + string match. Gradient checkpointing can be turned on, as in the
HF cookbook's QLoRA recipe (`gradient_checkpointing=True`, `use_reentrant=False`) and
`peft.prepare_model_for_kbit_training`'s default, when the benchmark asks for it.

It shares the parts that must be equal for a fair comparison with vlm_adapters: the same encoder,
projector class and shape, NF4 LLM with the same LoRA settings, the same prompts and answers.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import Trainer

from vlm_adapters.collator import pad_right
from vlm_adapters.fast_lora import peft_lora_forward
from vlm_adapters.model import VisionLanguageModel
from vlm_adapters.prompting import IMAGE_TOKEN_ID


class ReferenceModel(nn.Module):
    """LLaVA-style forward: encoder on pixels every step, full logits, the LLM's own loss."""

    def __init__(self, vlm: VisionLanguageModel) -> None:
        super().__init__()
        self.vlm = vlm  # reuse its encoder, projector and PEFT-wrapped LLM: identical parameters

    def gradient_checkpointing_enable(self, **kwargs: Any) -> None:
        """What the Trainer calls for `gradient_checkpointing=True`; the LLM is the part it applies to."""
        self.vlm.base_llm.gradient_checkpointing_enable(**kwargs)

    def forward(self, input_ids, attention_mask, labels, pixel_values, **_: Any):
        vlm = self.vlm
        with torch.no_grad():
            features = vlm.vision(pixel_values)
        embeds = vlm.embed(input_ids, vlm.projector(features))
        return vlm.llm(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels)


class ReferenceCollator:
    """Pixels per batch (no feature cache), padded to the longest sequence."""

    def __init__(self, vlm: VisionLanguageModel, names: list[str]) -> None:
        self.vlm, self.names = vlm, names

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        prompt = self.vlm.config.classify_prompt
        encoded = [self.vlm.prompts.encode(prompt, self.names[r["label"]]) for r in rows]
        batch = pad_right(encoded, self.vlm.pad_token_id)
        return {**batch, "pixel_values": self.vlm.vision.preprocess([r["image"] for r in rows])}


def reference_trainer(vlm: VisionLanguageModel, train: Any, names: list[str], args: Any) -> Trainer:
    """A Trainer on the reference model; pass `gradient_checkpointing=True` in `args` for the cookbook
    recipe (the benchmark's second row does), and call `vlm.base_llm.gradient_checkpointing_disable()` afterwards."""
    collator = ReferenceCollator(vlm, names)
    return Trainer(model=ReferenceModel(vlm), args=args, train_dataset=train, data_collator=collator)


@torch.no_grad()
def classify_by_generate(
    vlm: VisionLanguageModel, images: list[Any], names: list[str], max_new_tokens: int = 8
) -> list[int]:
    """The encoder on the images, then `classify_features_by_generate`."""
    vlm.eval()
    return classify_features_by_generate(vlm, vlm.vision(vlm.vision.preprocess(images)), names, max_new_tokens)


@torch.no_grad()
def classify_features_by_generate(
    vlm: VisionLanguageModel, features: torch.Tensor, names: list[str], max_new_tokens: int = 8
) -> list[int]:
    """`generate(inputs_embeds=...)` on encoder features, then match the text to a class name (-1 when
    nothing matches)."""
    vlm.eval()
    ids = torch.tensor([vlm.prompts.encode(vlm.config.classify_prompt).input_ids] * len(features))
    embeds = vlm.embed(ids, vlm.projector(features))
    with peft_lora_forward(vlm):
        out = vlm.llm.generate(
            inputs_embeds=embeds,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=vlm.pad_token_id,
        )
    texts = vlm.tokenizer.batch_decode(out, skip_special_tokens=True)
    by_length = sorted(range(len(names)), key=lambda i: -len(names[i]))  # "T-shirt/top" before "Shirt"
    return [next((i for i in by_length if names[i].lower() in t.lower()), -1) for t in texts]


__all__ = [
    "IMAGE_TOKEN_ID", "ReferenceCollator", "ReferenceModel", "classify_by_generate", "classify_features_by_generate",
    "reference_trainer",
]
