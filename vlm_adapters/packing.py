"""`PackedBatch`: a padded training batch as one packed row with a block attention mask.

Every row of a batch repeats tokens before its image (system turn, user header, the prompt when it
comes first), and rows are padded to the longest. Packing lays out those heads once, as a trie
(rows with different prompts still share the system turn and the user header), then every row's
remaining tokens without padding; the mask lets a row see its own head path and its own earlier
tokens only, and positions restart per row as if it ran alone, so the loss is the padded batch's
loss with fewer tokens through the LLM. A row's tokens after its last supervised position (its
final end-of-turn) are left out: nothing reads them. transformers' own packing
(`DataCollatorWithFlattening`) concatenates whole rows, so it cannot share the heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .prompting import IGNORE_INDEX, IMAGE_TOKEN_ID


@dataclass(frozen=True)
class PackedBatch:
    input_ids: torch.Tensor  # [T] heads first, then each row's tokens after its head
    positions: torch.Tensor  # [T] position of each token inside its own row
    targets: torch.Tensor  # [T] the token each position predicts (IGNORE_INDEX where unsupervised)
    visible: torch.Tensor  # [T, T] bool: token i may attend token j

    @property
    def supervised(self) -> torch.Tensor:
        return self.targets != IGNORE_INDEX

    @classmethod
    def build(cls, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> PackedBatch:
        heads = _HeadTrie()
        rows = []
        for ids, mask, lab in zip(input_ids, attention_mask.bool(), labels, strict=True):
            ids, lab = ids[mask], lab[mask]
            # position t predicts token t + 1 of the same row; nothing predicts across rows
            target = torch.cat([lab[1:], lab.new_full((1,), IGNORE_INDEX)])
            image = (ids == IMAGE_TOKEN_ID).nonzero()
            cut = int(image[0]) if len(image) else 0
            if (target[:cut] != IGNORE_INDEX).any():
                raise ValueError("a supervised token comes before the image; only answers are supervised.")
            # tokens after the last supervised position feed nothing: no output read, no later token
            supervised = (target != IGNORE_INDEX).nonzero()
            end = int(supervised[-1]) + 1 if len(supervised) else len(ids)
            rows.append((heads.add(ids[:cut].tolist()), cut, ids[cut:end], target[cut:end]))
        device = input_ids.device
        total = len(heads.tokens) + sum(len(ids) for _, _, ids, _ in rows)
        visible = torch.zeros(total, total, dtype=torch.bool, device=device)
        size = len(heads.tokens)
        visible[:size, :size] = heads.visible()
        start = size
        for leaf, _, ids, _ in rows:
            stop = start + len(ids)
            if leaf >= 0:
                visible[start:stop, :size] = visible[leaf, :size]  # the row's head path
            visible[start:stop, start:stop] = torch.ones(len(ids), len(ids), dtype=torch.bool, device=device).tril()
            start = stop
        return cls(
            input_ids=torch.cat([torch.tensor(heads.tokens, dtype=torch.long, device=device),
                                 *(ids for _, _, ids, _ in rows)]),
            positions=torch.cat([torch.tensor(heads.depth, dtype=torch.long, device=device),
                                 *(torch.arange(cut, cut + len(ids), device=device) for _, cut, ids, _ in rows)]),
            targets=torch.cat([torch.full((size,), IGNORE_INDEX, device=device),
                               *(target for _, _, _, target in rows)]),
            visible=visible,
        )


class _HeadTrie:
    """The rows' tokens before their images, each shared prefix once (parents before children)."""

    def __init__(self) -> None:
        self.node: dict[tuple[int, int], int] = {}  # (parent, token) -> node; parent -1 is the start
        self.tokens: list[int] = []
        self.parent: list[int] = []
        self.depth: list[int] = []

    def add(self, head: list[int]) -> int:
        """Insert a head; returns its last node (-1 for an empty head)."""
        parent = -1
        for token in head:
            if (parent, token) not in self.node:
                self.node[parent, token] = len(self.tokens)
                self.tokens.append(token)
                self.depth.append(self.depth[parent] + 1 if parent >= 0 else 0)
                self.parent.append(parent)
            parent = self.node[parent, token]
        return parent

    def visible(self) -> torch.Tensor:
        """[N, N] bool: node i sees node j when j is i or one of its ancestors."""
        seen = torch.zeros(len(self.tokens), len(self.tokens), dtype=torch.bool)
        for i, parent in enumerate(self.parent):
            if parent >= 0:
                seen[i] = seen[parent]
            seen[i, i] = True
        return seen
