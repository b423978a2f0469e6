"""`VisionLanguageCore`: frozen encoder -> trainable projector -> LLM with a PEFT adapter, as one nn.Module.

The forward pass splices projected patch embeddings into `inputs_embeds` at the image
placeholders. In training it runs the batch packed into one row (`packing.py`) and computes
logits only where the labels supervise (the answer), not over the whole sequence x vocabulary.
`feed` is the one way tokens enter the LLM after a KV cache with a 4-D mask; the training
forward and inference (`inference.py`, mixed in) both use it.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase
from transformers.modeling_outputs import CausalLMOutputWithPast

from .adapters import prefix_length, regularization
from .config import AdapterConfig
from .generation import TextGenerationMixin
from .inference import InferenceMixin, inference
from .packing import PackedBatch
from .projector import Projector
from .prompting import IMAGE_TOKEN_ID, PromptBuilder
from .vision import VisionTower


def context_length(llm: PreTrainedModel) -> int:
    config = llm.config.get_text_config() if hasattr(llm.config, "get_text_config") else llm.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def cache_argument(llm: PreTrainedModel) -> str:
    """The name forward takes the KV cache by: transformers 5.x renamed `past_key_values` to `cache`
    (the old name still works, with a FutureWarning per process); remote-code models may keep the old one."""
    return "cache" if "cache" in inspect.signature(llm.forward).parameters else "past_key_values"


class VisionLanguageCore(InferenceMixin, TextGenerationMixin, nn.Module):
    """The parts and the math. Trainable: `projector` and the PEFT adapter inside `llm`."""

    # The Trainer passes num_items_in_batch, its count of answer tokens over every process and accumulated
    # micro-batch, and forward divides the summed token losses by it: the loss is the mean over the whole
    # optimizer step's tokens, however unevenly they fall across processes and micro-batches.
    accepts_loss_kwargs = True

    def __init__(
        self,
        config: AdapterConfig,
        vision: VisionTower,
        projector: Projector,
        llm: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
    ) -> None:
        super().__init__()
        self.config = config
        self.vision = vision
        self.projector = projector
        self.llm = llm  # a PeftModel, or the bare LLM for adapter="none"
        self.tokenizer = tokenizer
        self.cache_argument = cache_argument(self.base_llm)
        self.prompts = PromptBuilder(
            tokenizer,
            projector.num_image_tokens,
            context_length(self.base_llm),
            config.system_prompt,
            config.image_first,
        )
        self.pad_token_id = next(
            (i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0
        )
        self.stop_token_ids = {i for i in (tokenizer.eos_token_id, *self.prompts.answer_ids("")) if i is not None}
        # What the PEFT adapter trains, whichever method it is (LoRA, prefix, ...): set_stage toggles these.
        self.adapter_parameters = [p for p in llm.parameters() if p.requires_grad]
        self.label_prior: nn.Module | None = None  # the probe + gate `fit` adds on label data (label_prior.py)

    @property
    def base_llm(self) -> PreTrainedModel:
        """The transformers model (LoRA layers live inside it; a prefix lives in the PEFT wrapper)."""
        return self.llm.get_base_model() if hasattr(self.llm, "get_base_model") else self.llm

    @property
    def num_prefix_tokens(self) -> int:
        """Virtual tokens of a prefix-tuning adapter (from its PEFT config); 0 for other methods."""
        return prefix_length(self.llm)

    @property
    def feature_shape(self) -> tuple[int, int]:
        """(tokens, hidden) of one image's encoder features: what the feature cache stores per image."""
        return self.projector.num_vision_tokens, self.config.vision_signature["hidden_size"]

    @property
    def device(self) -> torch.device:
        return self.base_llm.get_input_embeddings().weight.device

    def trainable_parameters(self) -> dict[str, list[nn.Parameter]]:
        return {
            "projector": [p for p in self.projector.parameters() if p.requires_grad],
            "adapter": [p for p in self.adapter_parameters if p.requires_grad],
        }

    def set_stage(self, stage: str) -> None:
        """'align' trains the projector only (LLaVA stage 1); 'finetune' trains projector + adapter."""
        if stage not in ("align", "finetune"):
            raise ValueError(f"unknown stage {stage!r}; use 'align' or 'finetune'.")
        self.projector.requires_grad_(True)
        for param in self.adapter_parameters:
            param.requires_grad_(stage == "finetune")

    def activation_checkpointing_enable(
        self, activation_checkpointing_kwargs: dict[str, Any] | None = None, every_n_layers: int = 1,
        offload: bool = False,
    ) -> None:
        """What the Trainer calls for `gradient_checkpointing=True`: the LLM's layers recompute their
        activations in the backward. Non-reentrant by default, since the frozen base has no gradients
        of its own for the reentrant variant to follow."""
        kwargs = {"use_reentrant": False, **(activation_checkpointing_kwargs or {})}
        self.base_llm.activation_checkpointing_enable(kwargs, every_n_layers=every_n_layers, offload=offload)

    def image_embeddings(
        self, pixel_values: torch.Tensor | None = None, image_features: torch.Tensor | None = None
    ) -> torch.Tensor:
        if image_features is None:
            if pixel_values is None:
                raise ValueError("pass pixel_values (raw pixels) or image_features (cached encoder output).")
            image_features = self.vision(pixel_values)
        embeds = self.projector(image_features.to(self.device, torch.float32))
        if not torch.isfinite(embeds).all():
            raise FloatingPointError(
                "the projector produced NaN/inf image embeddings; the learning rate is likely too high "
                "(or fp16 overflowed). Lower projector_lr / learning_rate or use compute_dtype='float32'."
            )
        return embeds

    def embed(self, input_ids: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        """Token embeddings with the image placeholders replaced by projected patch embeddings."""
        is_image = input_ids == IMAGE_TOKEN_ID
        if int(is_image.sum()) != image_embeds.shape[0] * image_embeds.shape[1]:
            raise ValueError(
                f"{int(is_image.sum())} image placeholders in input_ids but {image_embeds.shape[0]} images x "
                f"{image_embeds.shape[1]} tokens; build batches with VLMCollator / model.prompts."
            )
        embeds = self.base_llm.get_input_embeddings()(input_ids.masked_fill(is_image, 0))
        return embeds.masked_scatter(is_image.unsqueeze(-1), image_embeds.to(embeds.dtype))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        row_weights: torch.Tensor | None = None,
        num_items_in_batch: torch.Tensor | int | None = None,
        **_: Any,
    ) -> CausalLMOutputWithPast:
        """With labels: mean loss over the answer tokens (+ the adapter's regulariser, if its method has one),
        log-probs only at those positions ([num_answer_tokens, V]); with `num_items_in_batch` (the Trainer's
        count of the step's answer tokens) this batch's share of the step's mean. `row_weights` [B] (class
        weights, from `VLMCollator`) scale each row's token losses inside that mean, scikit-learn's
        sample-weight convention: 'balanced' weights average 1 over the training set.

        The batch runs packed into one row (`packing.py`): no padding, and the tokens before the image
        (system turn + prompt) once for all rows that share them, each row attending to its own."""
        input_ids = input_ids.to(self.device)
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(self.device)
        image_embeds = self.image_embeddings(pixel_values, image_features)
        if labels is None:
            embeds = self.embed(input_ids, image_embeds)
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
            out = self.llm(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids)
            return CausalLMOutputWithPast(logits=out.logits)
        batch = PackedBatch.build(input_ids, attention_mask, labels.to(self.device), row_weights)
        embeds = self.embed(batch.input_ids[None], image_embeds)
        cache = self.prefix_cache() if self.num_prefix_tokens else None
        keep = batch.supervised.nonzero()[:, 0]
        logprobs = self.feed(embeds, cache, batch.positions[None], batch.visible, keep)[0]
        targets = batch.targets[keep]
        # plus what the PEFT method adds in its own forward (AdaLoRA's orthogonal regulariser), bypassed here
        token_loss = -logprobs.gather(-1, targets[:, None])[:, 0] * batch.weights[keep]
        tokens = len(keep) if num_items_in_batch is None else num_items_in_batch  # the step's answer tokens
        loss = (token_loss.sum() + regularization(self.llm) * len(keep)) / tokens
        return CausalLMOutputWithPast(loss=loss, logits=logprobs)

    # ---------------------------------------------- label scores with the label prior (label_prior.py)
    @inference
    def score_labels(self, features: torch.Tensor, labels: Sequence[str], prompt: str, prior: bool = True
                     ) -> torch.Tensor:
        """`InferenceMixin.score_labels` combined with the label prior `fit` adds on label data, if it knows
        the labels (and `prior`): probe log-prob + gate * centred log-likelihood; the probe alone while the
        gate is closed, without running the LLM."""
        gated = self._label_prior(labels, features) if prior else None
        if gated is not None and not gated.gated:
            return gated.log_probs(features, labels)
        llm = super().score_labels(features, labels, prompt)
        return llm if gated is None else gated.added_to(llm, features, labels)

    @inference
    def predict_labels(self, features: torch.Tensor, labels: Sequence[str], prompt: str) -> torch.Tensor:
        """`InferenceMixin.predict_labels`, or with a label prior the argmax of every label's full score."""
        if self._label_prior(labels, features) is not None:
            return self.score_labels(features, labels, prompt).argmax(-1)
        return super().predict_labels(features, labels, prompt)

    def _label_prior(self, labels: Sequence[str], features: torch.Tensor) -> Any:
        prior = self.label_prior
        return prior if prior is not None and prior.covers(labels, features) else None

    def prefix_cache(self) -> DynamicCache:
        """A KV cache holding the PEFT prefix (prefix tuning's virtual tokens), or an empty one."""
        if self.num_prefix_tokens:
            return self.llm.get_prompt(batch_size=1)
        return DynamicCache(config=self.base_llm.config)

    def feed(
        self,
        embeds: torch.Tensor,
        cache: DynamicCache | None,
        positions: torch.Tensor,
        visible: torch.Tensor,
        keep: Any,
    ) -> torch.Tensor:
        """Feed `embeds` after the cached tokens; `visible[(b,) i, j]`: new token i attends new token j
        (every cached token is visible). Calls the base model: a prefix already sits in `cache`, and
        positions count from after it, as PEFT's own forward does. Returns log-probs at `keep`."""
        past = 0 if cache is None else cache.get_seq_length()
        visible = visible if visible.dim() == 3 else visible[None]  # [n, n] shared, or [B, n, n]
        allowed = torch.cat([visible.new_ones(*visible.shape[:2], past), visible], -1).to(self.device)
        mask = torch.zeros(allowed.shape, dtype=embeds.dtype, device=self.device)
        mask = mask.masked_fill(~allowed, torch.finfo(embeds.dtype).min)  # additive: eager and SDPA alike
        out = self.base_llm(
            inputs_embeds=embeds,
            attention_mask=mask[:, None].expand(embeds.shape[0], -1, -1, -1),
            position_ids=(self.num_prefix_tokens + positions.to(self.device)).expand(embeds.shape[0], -1),
            use_cache=cache is not None,
            **{self.cache_argument: cache},
            logits_to_keep=keep,
        )
        return out.logits.float().log_softmax(-1)
