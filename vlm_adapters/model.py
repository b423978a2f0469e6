"""`VisionLanguageModel`: what `attach` and `load` return.

The nn.Module and its inference are `VisionLanguageCore` (`modeling.py`, `inference.py`); this class
adds the workflows a user runs on it: train, evaluate, save, push, export. Each lives in its own
module, imported when first used so that `import vlm_adapters` stays light.
"""

from __future__ import annotations

import os
from typing import Any

from .modeling import VisionLanguageCore


class VisionLanguageModel(VisionLanguageCore):
    """Frozen encoder -> trainable projector -> LLM with a PEFT adapter: classify, predict, describe
    (from `InferenceMixin`), fit, evaluate, save_pretrained, push_to_hub, merge_and_export."""

    def fit(self, train: Any, eval: Any = None, **options: Any) -> dict[str, Any]:  # noqa: A002 - contract name
        """Train projector + adapter with transformers' Trainer; options are `FitOptions` fields and
        `TrainingArguments` names, plus `resume_from_checkpoint` and `callbacks` (see `fit.fit`)."""
        from .fit import fit

        return fit(self, train, eval, **options)

    def evaluate(self, dataset: Any, **options: Any) -> dict[str, Any]:
        """Accuracy, macro-F1 and a per-class report on label rows; exact match / BLEU / ROUGE-L on answer
        rows (both for a mixed set); options: `batch_size`, `prompt`, `output_dir` and `describe`'s
        generation options (see `evaluation.evaluate`)."""
        from .evaluation import evaluate

        return evaluate(self, dataset, **options)

    def save_pretrained(self, directory: str | os.PathLike) -> str:
        """Write the adapter folder (config, projector, PEFT weights, model card) atomically."""
        from .hub import save_pretrained

        return save_pretrained(self, directory)

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> str:
        """Upload the adapter folder to the Hub (`private`, `token`, `revision`, `commit_message`)."""
        from .hub import push_to_hub

        return push_to_hub(self, repo_id, **kwargs)

    def merge_and_export(self, directory: str | os.PathLike) -> str:
        """Write a transformers `LlavaForConditionalGeneration` + processor (LoRA merged); see `export`."""
        from .export import merge_and_export

        return merge_and_export(self, directory)
