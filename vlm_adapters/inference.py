"""Inference on a `VisionLanguageCore`, mixed into it: label scores, the top label, generated text.

`classify` scores every candidate label in one pass (the labels' tokens fed as a trie after the
prompt, see `scoring.py`); `predict` feeds only the labels that can still be the top one;
`describe` decodes greedily from the prompt's KV cache. All three run the prompt's
image-independent head once per call (`reuse_prompt_cache`), not once per batch, and call the
base model with the PEFT prefix (if any) in the cache, so they work the same for LoRA and for
prefix tuning (whose `generate(inputs_embeds=...)` fails).

The mixin relies on the core's `prompts`, `embed`, `image_embeddings`, `feed`, `prefix_cache`,
`base_llm`, `vision`, `device`, `pad_token_id` and `stop_token_ids` (as transformers'
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
from .prompting import IMAGE_TOKEN_ID
from .scoring import CandidateTree, within_budget

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
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        return cache

    def _prompt(self, features: torch.Tensor, prompt: str, tree: CandidateTree | None = None) -> tuple[Any, ...]:
        """One pass over image + prompt (+ the candidate tree's tokens). Returns log-probs at the
        prompt's last position (and at every fed candidate token), the KV cache and the prompt length."""
        ids = self.prompts.encode(prompt).input_ids
        head = ids.index(IMAGE_TOKEN_ID)
        fed = list(tree.fed_tokens) if tree else []
        cache = self._context(ids[:head], features.shape[0])
        rest = torch.tensor(ids[head:] + fed, device=self.device).expand(features.shape[0], -1)
        embeds = self.embed(rest, self.image_embeddings(image_features=features))
        length = len(ids)
        visible = tree.attention(length)[head:, head:] if tree else torch.ones(len(rest[0]), len(rest[0])).tril().bool()
        positions = torch.tensor(list(range(head, length)) + (tree.positions(length) if tree else []))
        keep = torch.arange(length - head - 1, len(rest[0]), device=self.device)
        return self.feed(embeds, cache, positions[None], visible, keep), cache, length

    # ------------------------------------------------------- on encoder features
    @inference
    def score_labels(self, features: torch.Tensor, labels: Sequence[str], prompt: str) -> torch.Tensor:
        """Log-likelihood [B, K] of each full label answer (tokens + end of turn) after image + prompt."""
        tree = CandidateTree.build([self.prompts.answer_ids(label) for label in labels])
        logprobs, _, _ = self._prompt(features, prompt, tree)
        return tree.scores(logprobs)

    @inference
    def predict_labels(self, features: torch.Tensor, labels: Sequence[str], prompt: str) -> torch.Tensor:
        """Index [B] of the most likely label, equal to `score_labels(...).argmax(-1)` with far fewer
        tokens fed. A label's log-likelihood is at most its first token's log-prob, so after one pass
        over the prompt only the labels under the best first token are fed (round 1); labels whose
        first-token bound still beats the best full score are fed in round 2. A trained model is sure
        of its first token, so round 2 rarely runs and each image feeds a few tokens, not the trie.
        An unsure one (untrained, or many long labels) would feed most of the trie in round 2, more
        than generating an answer costs, so round 2 feeds at most as many tokens per image as the image
        has: the labels still in doubt with the best first-token bounds, as many as fit. The answer is
        then the best of the labels scored, exact whenever the labels in doubt fit."""
        candidates = [self.prompts.answer_ids(label) for label in labels]
        budget = self.prompts.num_image_tokens
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
            picked = {b: _to_feed(need[b], bound[b], candidates, None if round_ == 1 else budget)
                      for b in need.any(-1).nonzero()[:, 0].tolist()}
            picked = {b: fed for b, fed in picked.items() if fed}
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

    @inference
    def generate_from_features(self, features: torch.Tensor, prompt: str, max_new_tokens: int) -> list[str]:
        """Greedy decoding from cached encoder features (one pass over the prompt, then one token per step)."""
        logprobs, cache, length = self._prompt(features, prompt)
        logp = logprobs[:, -1]
        tokens: list[torch.Tensor] = []
        done = torch.zeros(features.shape[0], dtype=torch.bool, device=self.device)
        stop = torch.tensor(sorted(self.stop_token_ids), device=self.device)
        one = torch.ones(1, 1, dtype=torch.bool)
        for step in range(max_new_tokens):
            next_ids = logp.argmax(-1).masked_fill(done, self.pad_token_id)
            tokens.append(next_ids)
            done |= torch.isin(next_ids, stop)
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            embeds = self.base_llm.get_input_embeddings()(next_ids[:, None])
            logp = self.feed(embeds, cache, torch.tensor([[length + step]]), one, 1)[:, -1]
        out = torch.stack(tokens, 1).tolist()
        texts = []
        for row in out:
            cut = next((i for i, t in enumerate(row) if t in self.stop_token_ids), len(row))
            texts.append(self.tokenizer.decode(row[:cut], skip_special_tokens=True).strip())
        return texts

    # ------------------------------------------------------------------ on images
    def _per_batch(self, images: Any, batch_size: int, run: Callable[[torch.Tensor], list[T]]) -> T | list[T]:
        """`run` on the encoder features of each batch of images, results in order; one image -> one result."""
        single, batch = _as_batch(images)
        out: list[T] = []
        with self.reuse_prompt_cache():
            for start in range(0, len(batch), batch_size):
                out += run(self.vision(self.vision.preprocess(batch[start : start + batch_size])))
        return out[0] if single else out

    def predict(
        self,
        images: ImageInput | Sequence[ImageInput],
        labels: Sequence[str],
        prompt: str | None = None,
        batch_size: int = 16,
    ) -> str | list[str]:
        """The most likely label of each image: `classify`'s top label for less work (it feeds only the
        labels that can still win, see `predict_labels`). One image -> one string."""
        labels = _check_labels(labels)
        prompt = prompt or self.config.classify_prompt
        return self._per_batch(
            images, batch_size, lambda features: [labels[i] for i in self.predict_labels(features, labels, prompt)]
        )

    def classify(
        self,
        images: ImageInput | Sequence[ImageInput],
        labels: Sequence[str],
        prompt: str | None = None,
        batch_size: int = 16,
    ) -> dict[str, float] | list[dict[str, float]]:
        """Probability of each candidate label (sums to 1), most likely first. One image -> one dict."""
        labels = _check_labels(labels)
        prompt = prompt or self.config.classify_prompt

        def ranked(features: torch.Tensor) -> list[dict[str, float]]:
            probs = self.score_labels(features, labels, prompt).softmax(-1).tolist()
            return [dict(sorted(zip(labels, row), key=lambda item: -item[1])) for row in probs]

        return self._per_batch(images, batch_size, ranked)

    def describe(
        self,
        images: ImageInput | Sequence[ImageInput],
        prompt: str | None = None,
        max_new_tokens: int = 48,
        batch_size: int = 16,
    ) -> str | list[str]:
        """Generated text for each image (greedy). One image -> one string."""
        prompt = prompt or self.config.describe_prompt
        return self._per_batch(
            images, batch_size, lambda features: self.generate_from_features(features, prompt, max_new_tokens)
        )


def _to_feed(
    need: torch.Tensor, bound: torch.Tensor, candidates: list[tuple[int, ...]], budget: int | None
) -> tuple[int, ...]:
    """The labels of one image to feed in a round: all it needs, or (with a budget) those with the best
    first-token bounds whose tree fits it."""
    labels = need.nonzero()[:, 0].tolist()
    if budget is None:
        return tuple(labels)
    return within_budget(sorted(labels, key=lambda k: -float(bound[k])), candidates, budget)


def _check_labels(labels: Sequence[str]) -> list[str]:
    labels = list(labels)
    if not labels:
        raise ValueError("at least one candidate label is needed; got an empty list.")
    if not all(isinstance(label, str) and label for label in labels):
        raise ValueError(f"candidate labels must be non-empty strings; got {labels!r}.")
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise ValueError(f"candidate labels must be unique; {duplicates} appear more than once.")
    return labels


def _as_batch(images: Any) -> tuple[bool, list[Any]]:
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("got an empty list of images.")
        return False, list(images)
    return True, [images]
