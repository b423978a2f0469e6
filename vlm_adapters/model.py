"""`VisionLanguageModel`: what `attach` and `load` return.

The nn.Module and its inference are `VisionLanguageCore` (`modeling.py`, `inference.py`); this class
adds the workflows a user runs on it: train, evaluate, save, push, export. Each lives in its own
module, imported when first used so that `import vlm_adapters` stays light.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from .modeling import VisionLanguageCore

if TYPE_CHECKING:
    from .explain import Explanation


class VisionLanguageModel(VisionLanguageCore):
    """Frozen encoder -> trainable projector -> LLM with a PEFT adapter: classify, predict, describe
    (from `InferenceMixin`), clip_classify (zero-shot), explain, fit, evaluate, save_pretrained, push_to_hub,
    merge_and_export."""

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

    def clip_classify(
        self, images: Any, labels: Any, template: str = "This is a photo of {}.", **options: Any
    ) -> dict[str, float] | list[dict[str, float]]:
        """Zero-shot probabilities from the CLIP / SigLIP checkpoint the encoder came from (text tower
        included), as transformers' zero-shot-image-classification pipeline computes them: a softmax
        over the labels for CLIP, a sigmoid per label for SigLIP. Raises `ValueError` without a text tower."""
        from .zero_shot import clip_classify

        return clip_classify(self, images, labels, template, **options)

    def explain(self, image: Any, label: str | None = None, prompt: str | None = None, **options: Any) -> Explanation:
        """Which part of `image` made the model give `label` (default: its top label among the adapter's
        labels, or `labels=[...]`): a heatmap over the image, `.save(path)` writes it as a PNG overlay."""
        from .explain import explain

        return explain(self, image, label, prompt, **options)

    def save_pretrained(self, directory: str | os.PathLike, with_app: bool = False) -> str:
        """Write the adapter folder (config, projector, PEFT weights, model card) atomically; `with_app`
        adds a Gradio `app.py` + `requirements.txt`, so the folder runs as a Space."""
        from .hub import save_pretrained

        return save_pretrained(self, directory, with_app)

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> str:
        """Upload the adapter folder to the Hub (`private`, `token`, `revision`, `commit_message`,
        `with_app`)."""
        from .hub import push_to_hub

        return push_to_hub(self, repo_id, **kwargs)

    def merge_and_export(self, directory: str | os.PathLike) -> str:
        """Write a transformers `LlavaForConditionalGeneration` + processor (LoRA merged); see `export`."""
        from .export import merge_and_export

        return merge_and_export(self, directory)
