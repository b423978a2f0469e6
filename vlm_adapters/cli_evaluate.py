"""`vlm-adapters evaluate`: a saved adapter on a dataset source -> metrics.json (and the PNGs `evaluate`
writes), plus the data options `train` shares (label maps, what each command takes from a split source).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

DATA_HELP = (
    "image folder (class sub-folders, optionally inside train/ test/ val/), CSV/JSONL file, save_to_disk dir or Hub id"
)
LABEL_MAP_HELP = "JSON file {label in the data: label to train or score}, e.g. {\"PNEUMONIA\": \"pneumonia\"}"
TEST_SPLITS = ("test", "validation")  # what `evaluate` takes


@dataclass
class EvaluateOptions:
    """Evaluate a saved adapter on a dataset; writes metrics.json and confusion, ROC, reliability and coverage PNGs."""

    adapter: str = field(metadata={"help": "adapter folder or Hub repo id"})
    data: str = field(metadata={"help": DATA_HELP})
    split: str | None = field(default=None, metadata={"help": "split to evaluate; default: test, else validation, "
                                                      "else the only one (a flat folder)"})
    label_map: str | None = field(default=None, metadata={"help": LABEL_MAP_HELP})
    batch_size: int = 16
    output_dir: str = "runs/evaluate"
    at_specificity: float | None = field(
        default=None, metadata={"help": "report the sensitivity reached at this specificity, e.g. 0.95"}
    )
    positive_label: str | None = field(
        default=None, metadata={"help": "the label whose sensitivity --at_specificity reports (default: 2nd of 2)"}
    )


def with_label_map(data: Any, label_map: str | None) -> Any:
    from .sources import read_label_map, rename_labels

    return rename_labels(data, read_label_map(label_map)) if label_map else data


def load_data_for(source: str, split: str | None, prefer: Sequence[str], label_map: str | None) -> Any:
    from .sources import load_data

    return with_label_map(load_data(source, split, prefer), label_map)


def cmd_evaluate(opts: EvaluateOptions) -> None:
    from .builder import load

    data = load_data_for(opts.data, opts.split, TEST_SPLITS, opts.label_map)
    metrics = load(opts.adapter).evaluate(
        data, output_dir=opts.output_dir, batch_size=opts.batch_size, at_specificity=opts.at_specificity,
        positive_label=opts.positive_label,
    )
    os.makedirs(opts.output_dir, exist_ok=True)
    with open(os.path.join(opts.output_dir, "metrics.json"), "w", encoding="utf-8") as fh:
        json.dump(metrics, fh, indent=2)
    print(json.dumps({k: v for k, v in metrics.items() if isinstance(v, float)}, indent=2))
