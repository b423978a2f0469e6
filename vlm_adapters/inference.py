"""Inference on a `VisionLanguageCore`, mixed into it: label scores and the top label.

`classify` scores every candidate label in one pass (the labels' tokens fed as a trie after the
prompt, see `scoring.py`); `predict` feeds only the labels that can still be the top one;
generation (`describe`, `answer`) lives in `generation.py`. All of them run the prompt's
image-independent head once per call (`reuse_prompt_cache`), not once per batch, and call the
base model with the PEFT prefix (if any) in the cache, so they work the same for LoRA and for
prefix tuning.

A batch of images is a list; an element that is itself a list (or tuple) is one row of several
images (`classify([[frontal, lateral]], ...)`: one result). Encoder features of a batch are
[B, tokens, hidden] (one image per row) or [B, images, tokens, hidden].

The mixin relies on the core's `prompts`, `embed`, `image_embeddings`, `feed`, `prefix_cache`,
`base_llm`, `cache_argument`, `vision`, `device`, `pad_token_id` and `stop_token_ids` (as transformers'
`GenerationMixin` relies on its model's forward).
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch
from transformers import DynamicCache

from .images import ImageInput
from .inputs import as_rows, check_labels, image_rows, per_row
from .prompting import IMAGE_TOKEN_ID
from .scoring import CandidateTree, labels_to_feed

T = TypeVar("T")


def inference(method: Callable[..., T]) -> Callable[..., T]:
    """Run in eval mode without autograd (bitsandbytes and dropout behave differently in train mode)."""

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> T:
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                return method(self, *args, **kwargs)
        finally:
            self.train(was_training)

    return wrapper


class InferenceMixin:
    _head_caches: dict[tuple[int, ...], DynamicCache] | None = None  # see `reuse_prompt_cache`

    # ------------------------------------------------------------ the prompt head
    @contextlib.contextmanager
    def reuse_prompt_cache(self) -> Iterator[None]:
        """Inside this block, inference computes the image-independent head of each prompt (system
        turn, user header, PEFT prefix) once and reuses its KV cache for every later batch, instead
        of one more pass through the LLM per batch. The weights must not change inside the block.
        `predict`, `classify`, `describe` and `evaluate` use it over their batches."""
        if self._head_caches is not None:  # nested: the outer block owns the caches
            yield
            return
        self._head_caches = {}
        try:
            with self._dequantized_for_call():
                yield
        finally:
            self._head_caches = None

    def _dequantized_for_call(self) -> contextlib.AbstractContextManager[None]:
        """Compute-dtype copies of the 4-bit weights for one inference call (`dequantize="per_call"`)."""
        if self.config.dequantize != "per_call" or self.config.quantization != "nf4":
            return contextlib.nullcontext()
        from .dequantized import dequantized_during

        return dequantized_during(self.base_llm)

    def _context(self, head_ids: Sequence[int], batch: int) -> DynamicCache:
        """KV cache of what precedes the image, repeated over the batch: the PEFT prefix (if any) and
        the prompt's image-independent head (system turn, user header); computed once per
        `reuse_prompt_cache` block."""
        key, shared = tuple(head_ids), self._head_caches
        if shared is None:
            cache = self._head_cache(key)
        else:
            if key not in shared:
                shared[key] = self._head_cache(key)
            cache = copy.deepcopy(shared[key])  # repeating over the batch replaces its tensors
        cache.batch_repeat_interleave(batch)
        return cache

    def _head_cache(self, head_ids: tuple[int, ...]) -> DynamicCache:
        cache = self.prefix_cache()
        if head_ids:
            ids = torch.tensor([list(head_ids)], device=self.device)
            past = cache.get_seq_length()
            self.base_llm(
                input_ids=ids,
                attention_mask=torch.ones(1, past + ids.shape[1], dtype=torch.long, device=self.device),
                position_ids=past + torch.arange(ids.shape[1], device=self.device)[None],
                use_cache=True,
                logits_to_keep=1,
                **{self.cache_argument: cache},
            )
        return cache

    def _prompt(self, features: torch.Tensor, prompt: str, tree: CandidateTree | None = None) -> tuple[Any, ...]:
        """One pass over images + prompt (+ the candidate tree's tokens). Returns log-probs at the
        prompt's last position (and at every fed candidate token), the KV cache and the prompt length."""
        rows, images = image_rows(features)
        return self._prompt_embeds(self.image_embeddings(image_features=images), rows, prompt, tree)

    def _prompt_embeds(
        self, image_embeds: torch.Tensor, rows: int, prompt: str, tree: CandidateTree | None = None
    ) -> tuple[Any, ...]:
        """`_prompt` from projected image embeddings [rows * images, k, d] (what `explain` occludes)."""
        ids = self.prompts.encode(prompt, num_images=len(image_embeds) // rows).input_ids
        head = ids.index(IMAGE_TOKEN_ID)
        fed = list(tree.fed_tokens) if tree else []
        cache = self._context(ids[:head], rows)
        rest = torch.tensor(ids[head:] + fed, device=self.device).expand(rows, -1)
        embeds = self.embed(rest, image_embeds)
        length = len(ids)
        visible = tree.attention(length)[head:, head:] if tree else torch.ones(len(rest[0]), len(rest[0])).tril().bool()
        positions = torch.tensor(list(range(head, length)) + (tree.positions(length) if tree else []))
        keep = torch.arange(length - head - 1, len(rest[0]), device=self.device)
        return self.feed(embeds, cache, positions[None], visible, keep), cache, length

    # ------------------------------------------------------- on encoder features
    @inference
    def score_labels(self, features: torch.Tensor, labels: Sequence[str], prompt: str) -> torch.Tensor:
        """Log-likelihood [B, K] of each full label answer (tokens + end of turn) after images + prompt;
        `features` [B, tokens, hidden] or [B, images, tokens, hidden]."""
        rows, images = image_rows(features)
        return self.label_log_likelihoods(self.image_embeddings(image_features=images), labels, prompt, rows)

    def label_log_likelihoods(
        self, image_embeds: torch.Tensor, labels: Sequence[str], prompt: str, rows: int | None = None
    ) -> torch.Tensor:
        """`score_labels` from projected image embeddings [rows * images, k, d] (default: one image per
        row), outside `inference`'s no-grad: what `explain` occludes. The caller sets eval mode."""
        tree = CandidateTree.build([self.prompts.answer_ids(label) for label in labels])
        logprobs, _, _ = self._prompt_embeds(image_embeds, rows or len(image_embeds), prompt, tree)
        return tree.scores(logprobs)

    def label_probabilities(self, scores: torch.Tensor) -> torch.Tensor:
        """softmax(`score_labels`' log-likelihoods / the temperature `calibrate` fit, 1 until then)."""
        return (scores / self.config.temperature).softmax(-1)

    @inference
    def predict_labels(self, features: torch.Tensor, labels: Sequence[str], prompt: str) -> torch.Tensor:
        """Index [B] of the most likely label, equal to `score_labels(...).argmax(-1)` with far fewer tokens fed.
        A label's log-likelihood is at most its first token's log-prob, so after one pass over the prompt only the
        labels under the best first token are fed (round 1); labels whose first-token bound still beats the best
        full score are fed in round 2. A trained model is sure of its first token, so round 2 rarely runs; for an
        unsure one it would feed most of the trie, more than generating costs, so it feeds at most the image's
        token count per image (`labels_to_feed`): exact whenever the labels in doubt fit."""
        candidates = [self.prompts.answer_ids(label) for label in labels]
        first = torch.tensor([c[0] for c in candidates], device=self.device)
        logprobs, cache, length = self._prompt(features, prompt)
        last = logprobs[:, -1]  # [B, V] at the prompt's last position
        bound = last[:, first]  # [B, K]
        scores = torch.full_like(bound, -torch.inf)
        in_cache = torch.arange(len(bound), device=self.device)  # the images whose rows the cache holds
        for round_ in (1, 2):
            best = scores.max(-1, keepdim=True).values
            need = scores.isneginf() & (bound > best)
            if round_ == 1:  # only the labels that share the most likely first token
                need &= first[None, :] == first[bound.argmax(-1)][:, None]
            picked = labels_to_feed(need, bound, candidates, None if round_ == 1 else self.prompts.num_image_tokens)
            if not picked:
                break
            rows = torch.tensor(list(picked), device=self.device)
            if len(rows) < len(in_cache):
                cache.batch_select_indices(torch.searchsorted(in_cache, rows))
                in_cache = rows
            built = {k: CandidateTree.build([candidates[i] for i in k]) for k in set(picked.values())}  # shared
            trees = [built[k] for k in picked.values()]
            out, width = self._feed_trees(trees, cache, length)
            for i, (b, labels_fed, tree) in enumerate(zip(picked, picked.values(), trees, strict=True)):
                scores[b, list(labels_fed)] = tree.scores(torch.cat([last[b, None, None], out[i, None]], 1))[0]
            cache.crop(-width)
        return scores.argmax(-1)

    def _feed_trees(self, trees: list[CandidateTree], cache: DynamicCache, length: int) -> tuple[torch.Tensor, int]:
        """Each image's own candidate tree after its cached prompt, padded to one width; returns the
        log-probs at every fed token and the width."""
        width = max(len(tree.fed_tokens) for tree in trees)
        fed = torch.full((len(trees), width), self.pad_token_id, dtype=torch.long)
        visible = torch.eye(width, dtype=torch.bool).repeat(len(trees), 1, 1)  # padding sees itself only
        positions = torch.full((len(trees), width), length - 1)
        for i, tree in enumerate(trees):
            n = len(tree.fed_tokens)
            fed[i, :n] = torch.tensor(tree.fed_tokens)
            visible[i, :n, :n] = tree.fed_visible
            positions[i, :n] = torch.tensor(tree.positions(length))
        embeds = self.base_llm.get_input_embeddings()(fed.to(self.device))
        return self.feed(embeds, cache, positions, visible, width), width

    # ------------------------------------------------------------------ on images
    def _per_batch(
        self, images: Any, batch_size: int, run: Callable[[torch.Tensor, str], list[T]], prompt: str | Sequence[str]
    ) -> T | list[T]:
        """`run(features, prompt)` on each batch of rows that share a prompt and an image count (their
        token layout), results in the rows' order; one image (not in a list) -> one result."""
        single, rows = as_rows(images)
        prompts = per_row(prompt, len(rows), "prompts")
        groups: dict[tuple[str, int], list[int]] = {}
        for i, row in enumerate(rows):
            groups.setdefault((prompts[i], len(row)), []).append(i)
        out: list[Any] = [None] * len(rows)
        with self.reuse_prompt_cache():
            for (text, count), members in groups.items():
                for start in range(0, len(members), batch_size):
                    chunk = members[start : start + batch_size]
                    pixels = self.vision.preprocess([image for i in chunk for image in rows[i]])
                    features = self.vision(pixels).unflatten(0, (len(chunk), count))
                    for i, result in zip(chunk, run(features, text), strict=True):
                        out[i] = result
        return out[0] if single else out

    def predict(
        self,
        images: ImageInput | Sequence[ImageInput],
        labels: Sequence[str],
        prompt: str | None = None,
        batch_size: int = 16,
        abstain_below: float | None = None,
    ) -> str | None | list[str | None]:
        """The most likely label of each row: `classify`'s top label for less work (it feeds only the
        labels that can still win, see `predict_labels`). One image -> one string; a list -> a list, in
        which an element that is a list of images is one row (`predict([[frontal, lateral]], labels)`).
        `abstain_below=p`: None where the top (calibrated) probability is below p (scores every label)."""
        labels = check_labels(labels)
        if abstain_below is not None:
            return top_or_none(self.classify(images, labels, prompt, batch_size), abstain_below)
        return self._per_batch(
            images, batch_size, lambda features, text: [labels[i] for i in self.predict_labels(features, labels, text)],
            prompt or self.config.classify_prompt,
        )

    def classify(
        self,
        images: ImageInput | Sequence[ImageInput],
        labels: Sequence[str],
        prompt: str | None = None,
        batch_size: int = 16,
    ) -> dict[str, float] | list[dict[str, float]]:
        """Probability of each candidate label (sums to 1; calibrated once `calibrate` set a temperature), most
        likely first. One image -> one dict; a list -> a list, an element that is a list of images one row."""
        labels = check_labels(labels)

        def ranked(features: torch.Tensor, text: str) -> list[dict[str, float]]:
            probs = self.label_probabilities(self.score_labels(features, labels, text)).tolist()
            return [dict(sorted(zip(labels, row), key=lambda item: -item[1])) for row in probs]

        return self._per_batch(images, batch_size, ranked, prompt or self.config.classify_prompt)


def top_or_none(ranked: dict[str, float] | list[dict[str, float]], abstain_below: float) -> Any:
    """The top label of each of `classify`'s ranked dicts, None where its probability is below `abstain_below`."""
    if not 0.0 <= abstain_below <= 1.0:
        raise ValueError(f"abstain_below={abstain_below!r}; expected a probability in [0, 1].")
    pick = lambda probs: next(iter(probs)) if max(probs.values()) >= abstain_below else None  # noqa: E731
    return pick(ranked) if isinstance(ranked, dict) else [pick(probs) for probs in ranked]
