"""`Context`: assets, data subsets and attached models, created once per run and shared by the sections."""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from typing import Any

import torch

from benchmarks.common import SEED, SYSTEM_PROMPT, Sizes, load_trainable_state, log, trainable_state
from vlm_adapters import VisionLanguageModel, attach
from vlm_adapters.demo.assets import efficientnet_lite0, fashion_mnist, smollm2_instruct
from vlm_adapters.features import with_image_features


class Context:
    """Assets, data subsets and attached models, created once and shared by the sections."""

    def __init__(self, sizes: Sizes, repeats: int, threads: int, quick: bool) -> None:
        self.sizes, self.repeats, self.threads, self.quick = sizes, repeats, threads, quick
        self.tmp = tempfile.mkdtemp(prefix="vlm-bench-")
        # Resolve the converted assets before any section points VLM_ADAPTERS_CACHE elsewhere.
        self.llm_path = smollm2_instruct()
        self.encoder, self.processor = efficientnet_lite0()
        self.train = fashion_mnist("train", per_class=sizes.train_per_class, seed=SEED)
        self.test = fashion_mnist("test", per_class=sizes.test_per_class, seed=SEED)
        self.classify_train = fashion_mnist("train", per_class=sizes.classify_train_per_class, seed=SEED + 1)
        self.names: list[str] = list(self.train.features["label"].names)
        self.test_images = [row["image"] for row in self.test]  # decoded once, outside every timing
        self.test_truth: list[int] = list(self.test["label"])
        self._models: dict[int, tuple[VisionLanguageModel, dict[str, torch.Tensor]]] = {}
        self._features: dict[str, Any] = {}
        self.trained_state: dict[str, torch.Tensor] | None = None  # trained on classify_train, for section 2
        self.results: dict[str, Any] = {}
        self.load: dict[str, tuple[float, float, float]] = {}  # section -> (load before, load after, seconds)

    def dir(self, name: str) -> str:
        path = tempfile.mkdtemp(prefix=f"{name}-", dir=self.tmp)
        return path

    def model(self, num_image_tokens: int) -> VisionLanguageModel:
        """The attached demo model with `num_image_tokens`, reset to its initial trainable weights."""
        if num_image_tokens not in self._models:
            log(f"attach: EfficientNet-Lite0 + SmolLM2-135M NF4, LoRA r{self.sizes.lora_r}, {num_image_tokens} tokens")
            model = attach(
                self.encoder, self.llm_path, image_processor=self.processor, adapter="lora", quantization="nf4",
                num_image_tokens=num_image_tokens, system_prompt=SYSTEM_PROMPT, lora_r=self.sizes.lora_r,
                seed=SEED, device="cpu",
            )
            self._models[num_image_tokens] = (model, trainable_state(model))
        model, init = self._models[num_image_tokens]
        load_trainable_state(model, init)
        return model

    def features(self, name: str) -> Any:
        """Encoder features (all 49 tokens) of a data subset, cached once per run for the scaling runs."""
        if name not in self._features:
            data = {
                "train": self.train, "test": self.test, "classify_train": self.classify_train,
                "scaling": self.scaling_train(),
            }[name]
            tokens = self.sizes.num_image_tokens
            model = self._models[tokens][0] if tokens in self._models else self.model(tokens)
            self._features[name] = with_image_features(
                data, model.vision, token_shape=model.feature_shape, cache_dir=os.path.join(self.tmp, "features")
            )
        return self._features[name]

    def scaling_train(self) -> Any:
        """The training subset, grown if needed so every one of the most classes gets a row."""
        per_class = max(self.sizes.train_per_class, math.ceil(max(self.sizes.scaling_classes) / len(self.names)))
        if per_class == self.sizes.train_per_class:
            return self.train
        return fashion_mnist("train", per_class=per_class, seed=SEED)

    def train_args(self, output_dir: str, **overrides: Any) -> dict[str, Any]:
        """TrainingArguments values given identically to the library and to the reference."""
        s = self.sizes
        args = dict(
            output_dir=output_dir, num_train_epochs=s.epochs, learning_rate=s.learning_rate,
            per_device_train_batch_size=s.batch_size, lr_scheduler_type="cosine", warmup_steps=0.05,
            weight_decay=0.0, logging_steps=10, save_strategy="no", report_to="none", seed=SEED,
            dataloader_num_workers=0, use_cpu=True, disable_tqdm=True,
        )
        args.update(overrides)
        return args

    def library_fit(
        self, model: VisionLanguageModel, data: Any, callbacks: list[Any] | None = None, **overrides: Any
    ) -> dict[str, Any]:
        """`model.fit` with the shared arguments; projector at the same lr, no describe examples (the
        reference trains only the classify prompt, so both see the same sequences) and no label prior
        (whose gate rows would be kept out of the LLM's training, and whose probe, with its gate closed,
        would classify without running the LLM: the reference has neither)."""
        return model.fit(
            data, projector_lr=self.sizes.learning_rate, describe_ratio=0.0, label_prior=False, callbacks=callbacks,
            **self.train_args(self.dir("fit"), **overrides),
        )

    def library_trained_model(self) -> VisionLanguageModel:
        """The 16-token model trained by the library for one epoch on `classify_train` (once per run):
        the 20 steps of section 1 leave a model that mostly answers one class."""
        model = self.model(self.sizes.num_image_tokens)
        if self.trained_state is None:
            log(f"training the classification model: {len(self.classify_train)} images, 1 epoch")
            self.library_fit(model, self.features("classify_train"), num_train_epochs=1)
            self.trained_state = trainable_state(model)
        load_trainable_state(model, self.trained_state)
        return model

    def close(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


