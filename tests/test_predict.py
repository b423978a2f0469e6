"""`predict_labels` on an unsure model: its second round feeds at most one image's worth of tokens, and
returns the best of the labels it scored (exact whenever the labels in doubt fit: see test_model.py)."""

from __future__ import annotations

import pytest
import torch
from conftest import colour_dataset

from vlm_adapters import attach
from vlm_adapters.scoring import CandidateTree, within_budget

# Many labels over several first words: an untrained model is unsure of all of them.
LABELS = [f"{colour} {thing}" for colour in ("red", "green", "blue", "dark", "light")
          for thing in ("square", "cat", "photo", "shape")]


def test_within_budget_takes_the_leading_labels_whose_tree_fits():
    candidates = [(1, 2, 3), (1, 2, 4), (5, 6, 7, 8)]
    assert within_budget([0, 1, 2], candidates, budget=2) == (0, 1)  # label 1 adds no fed token
    assert within_budget([2, 0, 1], candidates, budget=4) == (2,)  # the next would need 5 fed tokens
    assert within_budget([2, 0], candidates, budget=2) == ()  # the first alone does not fit
    assert within_budget([1, 2, 0], candidates, budget=5) == (0, 1, 2)


def expected(model, features, prompt: str) -> list[int]:
    """The rule, image by image from full scores: the labels under the best first token, then those in
    doubt by decreasing first-token bound while their tree fits one image's worth of tokens."""
    full = model.score_labels(features, LABELS, prompt)
    candidates = [model.prompts.answer_ids(label) for label in LABELS]
    model.eval()
    with torch.no_grad():
        bound = model._prompt(features, prompt)[0][:, -1][:, [c[0] for c in candidates]]
    out = []
    for b in range(len(features)):
        top = candidates[int(bound[b].argmax())][0]
        first_round = [k for k, c in enumerate(candidates) if c[0] == top]
        best = max(full[b, k] for k in first_round)
        doubt = sorted((k for k in range(len(LABELS)) if k not in first_round and bound[b, k] > best),
                       key=lambda k: -bound[b, k])
        kept = within_budget(doubt, candidates, model.prompts.num_image_tokens) if doubt else ()
        out.append(max((*first_round, *kept), key=lambda k: full[b, k]))
    return out


@pytest.mark.parametrize("adapter", ["lora", "prefix"])
def test_second_round_of_an_unsure_model_is_capped_at_one_image_of_tokens(llm_dir, vit_dir, adapter, monkeypatch):
    model = attach(vit_dir, llm_dir, adapter=adapter)
    ds = colour_dataset(2, seed=4)
    features = model.vision.encode_images([ds[i]["image"] for i in range(len(ds))])
    budget = model.prompts.num_image_tokens
    full_tree = CandidateTree.build([model.prompts.answer_ids(label) for label in LABELS])
    assert len(full_tree.fed_tokens) > 2 * budget  # the whole trie would cost several images' worth
    widths = []
    feed_trees = model._feed_trees
    monkeypatch.setattr(model, "_feed_trees", lambda trees, *a: widths.append(
        max(len(t.fed_tokens) for t in trees)) or feed_trees(trees, *a))
    for prompt in ("What is shown in this image?", "Colour?"):
        widths.clear()
        assert model.predict_labels(features, LABELS, prompt).tolist() == expected(model, features, prompt)
        assert len(widths) == 2 and widths[1] <= budget  # both rounds ran; the second within the budget
        assert widths[1] < len(full_tree.fed_tokens) - widths[0]  # less than the rest of the trie
