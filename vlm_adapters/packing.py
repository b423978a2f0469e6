"""`PackedBatch`: a padded training batch as one packed row with a block attention mask.

Every row of a batch repeats the same tokens before its image (system turn, user header, the
prompt when it comes first), and rows are padded to the longest. Packing lays out each distinct
head once, then every row's remaining tokens without padding; the mask lets a row see its head
and its own earlier tokens only, and positions restart per row as if it ran alone, so the loss is
the padded batch's loss with fewer tokens through the LLM. A row's tokens after its last
supervised position (its final end-of-turn) are left out: nothing reads them. transformers' own
packing (`DataCollatorWithFlattening`) concatenates whole rows, so it cannot share the heads.
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
    weights: torch.Tensor  # [T] the loss weight of the row each token belongs to (1 for the shared heads)

    @property
    def supervised(self) -> torch.Tensor:
        return self.targets != IGNORE_INDEX

    @classmethod
    def build(
        cls,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        row_weights: torch.Tensor | None = None,
    ) -> PackedBatch:
        """`row_weights` [B]: each row's loss weight (class weights), carried to its tokens."""
        heads: dict[tuple[int, ...], int] = {}  # head tokens -> group
        rows = []
        for ids, mask, lab in zip(input_ids, attention_mask.bool(), labels, strict=True):
            ids, lab = ids[mask], lab[mask]
            # position t predicts token t + 1 of the same row; nothing predicts across rows
            target = torch.cat([lab[1:], lab.new_full((1,), IGNORE_INDEX)])
            image = (ids == IMAGE_TOKEN_ID).nonzero()
            cut = int(image[0]) if len(image) else 0
            group = heads.setdefault(tuple(ids[:cut].tolist()), len(heads))
            if (target[:cut] != IGNORE_INDEX).any():
                raise ValueError("a supervised token comes before the image; only answers are supervised.")
            # tokens after the last supervised position feed nothing: no output read, no later token
            supervised = (target != IGNORE_INDEX).nonzero()
            end = int(supervised[-1]) + 1 if len(supervised) else len(ids)
            rows.append((group, cut, ids[cut:end], target[cut:end]))
        device = input_ids.device
        ids_parts, pos_parts, target_parts, segment, group_of, weight_of = [], [], [], [], [], []
        row_weights = torch.ones(len(rows)) if row_weights is None else row_weights.float().cpu()
        for head, group in heads.items():  # segments 0..G-1: the heads
            ids_parts.append(torch.tensor(head, dtype=torch.long, device=device))
            pos_parts.append(torch.arange(len(head), device=device))
            target_parts.append(torch.full((len(head),), IGNORE_INDEX, device=device))
            segment += [group] * len(head)
            group_of += [group] * len(head)
            weight_of += [1.0] * len(head)
        for r, (group, cut, ids, target) in enumerate(rows):  # segments G..G+B-1: the rows
            ids_parts.append(ids)
            pos_parts.append(torch.arange(cut, cut + len(ids), device=device))
            target_parts.append(target)
            segment += [len(heads) + r] * len(ids)
            group_of += [group] * len(ids)
            weight_of += [float(row_weights[r])] * len(ids)
        seg = torch.tensor(segment, device=device)
        grp = torch.tensor(group_of, device=device)
        index = torch.arange(len(seg), device=device)
        own = (seg[:, None] == seg[None, :]) & (index[None, :] <= index[:, None])
        is_head = seg < len(heads)
        head_of_row = ~is_head[:, None] & is_head[None, :] & (grp[:, None] == grp[None, :])
        return cls(
            input_ids=torch.cat(ids_parts),
            positions=torch.cat(pos_parts),
            targets=torch.cat(target_parts),
            visible=own | head_of_row,
            weights=torch.tensor(weight_of, device=device),
        )
