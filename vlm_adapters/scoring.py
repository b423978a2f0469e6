"""`CandidateTree`: score every candidate answer in one forward pass after a shared prompt.

`generate` decodes one token per forward pass and K separate passes would repeat the prompt K
times, so neither fits label scoring. Here candidates are merged into a trie (labels that share
leading tokens feed them once), only tokens that have children are fed (a token's probability is
read at its parent's position, so the final end-of-turn tokens are never fed), and each fed
token attends to the prompt plus its own ancestors through a 4D attention mask. The result is
exactly the log-likelihood of each full sequence, from one pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CandidateTree:
    fed_tokens: tuple[int, ...]  # tokens to feed after the prompt, parents before children
    fed_depth: tuple[int, ...]  # 1 for a candidate's first token, 2 for its second, ...
    fed_visible: torch.Tensor  # [F, F] bool: fed token i may attend fed token j (j is i or an ancestor)
    rows: torch.Tensor  # [K, W] which output row predicts each candidate token (0: the prompt's last position)
    tokens: torch.Tensor  # [K, W] the candidate tokens (padded)
    valid: torch.Tensor  # [K, W] bool: real token, not padding

    @classmethod
    def build(cls, candidates: Sequence[Sequence[int]]) -> CandidateTree:
        node_of: dict[tuple[int, int], int] = {}  # (parent node, token) -> node; parent -1 is the prompt
        parent_of: list[int] = []
        token_of: list[int] = []
        paths: list[list[int]] = []
        for candidate in candidates:
            if not candidate:
                raise ValueError("a candidate answer has no tokens.")
            parent, path = -1, []
            for token in candidate:
                key = (parent, int(token))
                if key not in node_of:
                    node_of[key] = len(token_of)
                    parent_of.append(parent)
                    token_of.append(int(token))
                parent = node_of[key]
                path.append(parent)
            paths.append(path)
        fed = sorted({p for p in parent_of if p >= 0})  # nodes with children, in creation order
        fed_index = {node: i for i, node in enumerate(fed)}
        depth = [0] * len(token_of)
        for node, parent in enumerate(parent_of):  # parents are created before their children
            depth[node] = 1 if parent < 0 else depth[parent] + 1
        visible = torch.zeros(len(fed), len(fed), dtype=torch.bool)
        for i, node in enumerate(fed):
            while node >= 0:
                visible[i, fed_index[node]] = True
                node = parent_of[node]
        width = max(map(len, paths))
        rows = torch.zeros(len(paths), width, dtype=torch.long)
        tokens = torch.zeros(len(paths), width, dtype=torch.long)
        valid = torch.zeros(len(paths), width, dtype=torch.bool)
        for k, path in enumerate(paths):
            for t, node in enumerate(path):
                rows[k, t] = 0 if parent_of[node] < 0 else 1 + fed_index[parent_of[node]]
                tokens[k, t] = token_of[node]
                valid[k, t] = True
        return cls(
            fed_tokens=tuple(token_of[n] for n in fed),
            fed_depth=tuple(depth[n] for n in fed),
            fed_visible=visible,
            rows=rows,
            tokens=tokens,
            valid=valid,
        )

    def attention(self, prompt_length: int) -> torch.Tensor:
        """[P + F, P + F] bool: the prompt is causal, fed tokens see the prompt and their ancestors."""
        size = prompt_length + len(self.fed_tokens)
        allowed = torch.ones(size, size, dtype=torch.bool).tril()
        allowed[prompt_length:, prompt_length:] = self.fed_visible
        return allowed

    def positions(self, prompt_length: int) -> list[int]:
        """Position ids of the fed tokens: each sits right after the prompt at its depth."""
        return [prompt_length - 1 + d for d in self.fed_depth]

    def scores(self, logprobs: torch.Tensor) -> torch.Tensor:
        """[B, K] summed log-probabilities from log-probs [B, 1 + F, V] at the prompt end and fed tokens."""
        rows, tokens, valid = (t.to(logprobs.device) for t in (self.rows, self.tokens, self.valid))
        picked = logprobs[:, rows, tokens]  # [B, K, W]
        return (picked * valid).sum(-1)


def within_budget(order: Sequence[int], candidates: Sequence[Sequence[int]], budget: int) -> tuple[int, ...]:
    """The longest leading run of `order` whose candidates' tree feeds at most `budget` tokens (a
    candidate feeds every token but its last), sorted."""
    fed: set[tuple[int, ...]] = set()
    kept: list[int] = []
    for k in order:
        prefixes = {tuple(candidates[k][:i]) for i in range(1, len(candidates[k]))}
        if len(fed | prefixes) > budget:
            break
        kept.append(k)
        fed |= prefixes
    return tuple(sorted(kept))


def labels_to_feed(
    need: torch.Tensor, bound: torch.Tensor, candidates: list[tuple[int, ...]], budget: int | None
) -> dict[int, tuple[int, ...]]:
    """Image -> the labels to feed it in a round of `predict_labels` (images with none left out): all
    it needs [B, K], or (with a budget) those with the best first-token bounds whose tree fits it."""
    picked = {}
    for b in need.any(-1).nonzero()[:, 0].tolist():
        labels = need[b].nonzero()[:, 0].tolist()
        if budget is not None:
            labels = within_budget(sorted(labels, key=lambda k: -float(bound[b, k])), candidates, budget)
        if labels:
            picked[b] = tuple(labels)
    return picked
