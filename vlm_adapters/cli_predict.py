"""`vlm-adapters predict`: a real folder of images -> a CSV or JSON Lines file, one row per file.

Rows are written batch by batch and flushed, so an interrupted run keeps what it wrote and
`--resume` continues it. A file that is not an image, or that cannot be decoded, gets a row with a
`reason` instead of stopping the run.
"""

from __future__ import annotations

import csv
import glob
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from .images import ImageLoadError, is_image_file, load_image, walk_files

ABSTAINED = "abstained"


@dataclass
class PredictOptions:
    """Classify (and describe) a folder or glob of images into CSV or JSONL, a row per file, as it goes."""

    adapter: str = field(metadata={"help": "adapter folder or Hub repo id"})
    images: str = field(metadata={"help": "a folder (searched at any depth) or a glob such as 'scans/*.png'"})
    output: str = field(default="predictions.csv", metadata={"help": "a .csv file, or .jsonl for JSON Lines"})
    labels: str | None = field(default=None, metadata={"help": "comma-separated labels; default: the adapter's"})
    describe: bool = field(default=True, metadata={"help": "also generate a description of each image"})
    max_new_tokens: int = 48
    batch_size: int = field(default=16, metadata={"help": "images per model call"})
    top_k: int | None = field(
        default=None, metadata={"help": "fill the p_<label> columns of the k most likely labels only (default: all)"}
    )
    abstain_below: float | None = field(
        default=None, metadata={"help": f"write label '{ABSTAINED}' when the top probability is below this"}
    )
    resume: bool = field(default=False, metadata={"help": "append to --output, skipping the files already in it"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing --output"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})


def find_files(pattern: str) -> list[str]:
    """Every file of a folder (at any depth, hidden ones left out) or of a glob, sorted."""
    if os.path.isdir(pattern):
        files = walk_files(pattern)
    else:
        files = sorted(path for path in glob.glob(pattern, recursive=True) if os.path.isfile(path))
    if not files:
        raise FileNotFoundError(f"no files match {pattern!r}; pass a folder or a glob such as 'scans/*.png'.")
    return files


def columns(labels: list[str], describe: bool) -> list[str]:
    return ["image", "label", "probability", *(["description"] if describe else []), "reason"] + [
        f"p_{label}" for label in labels
    ]


def check_options(opts: PredictOptions) -> None:
    if opts.abstain_below is not None and not 0.0 <= opts.abstain_below <= 1.0:
        raise ValueError(f"--abstain_below {opts.abstain_below} must be a probability in [0, 1].")
    if opts.top_k is not None and opts.top_k < 1:
        raise ValueError(f"--top_k {opts.top_k} must be a positive integer.")
    if opts.batch_size < 1:
        raise ValueError(f"--batch_size {opts.batch_size} must be a positive integer.")
    if opts.resume and opts.overwrite:
        raise ValueError("--resume and --overwrite contradict each other; pass one of them.")
    if os.path.exists(opts.output) and os.path.getsize(opts.output) and not (opts.resume or opts.overwrite):
        raise FileExistsError(f"{opts.output} exists; pass --resume to continue it or --overwrite to replace it.")


def already_written(path: str, fieldnames: list[str]) -> set[str]:
    """The images an earlier run wrote to `path`. A last line cut by the interruption is removed."""
    if not os.path.exists(path):
        return set()
    with open(path, "rb+") as fh:
        data = fh.read()
        if data and not data.endswith(b"\n"):
            fh.truncate(data.rfind(b"\n") + 1)
    with open(path, encoding="utf-8", newline="") as fh:
        if path.endswith(".csv"):
            reader = csv.DictReader(fh)
            rows = list(reader)
            found = reader.fieldnames
        else:
            rows = [json.loads(line) for line in fh if line.strip()]
            found = list(rows[0]) if rows else None
    if found is not None and list(found) != fieldnames:
        raise ValueError(
            f"{path} has columns {list(found)}, but this run writes {fieldnames} (other labels or --describe); "
            "write to a new --output, or pass --overwrite."
        )
    return {row["image"] for row in rows}


class RowWriter:
    """CSV (header once) or JSON Lines rows, flushed after each batch so a kill loses at most one batch."""

    def __init__(self, fh: IO[str], fieldnames: list[str], as_csv: bool) -> None:
        self.fh, self.fieldnames = fh, fieldnames
        self.csv = csv.DictWriter(fh, fieldnames=fieldnames) if as_csv else None
        if self.csv is not None and fh.tell() == 0:
            self.csv.writeheader()

    def write(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            ordered = {name: row.get(name) for name in self.fieldnames}  # every row: the same keys, in order
            if self.csv is not None:
                self.csv.writerow(ordered)
            else:
                self.fh.write(json.dumps(ordered) + "\n")
        self.fh.flush()


def image_row(path: str, probs: dict[str, float], opts: PredictOptions, labels: list[str]) -> dict[str, Any]:
    """The top label and the probabilities of the `top_k` most likely labels (`probs` is ranked)."""
    top, probability = next(iter(probs.items()))
    shown = dict(list(probs.items())[: opts.top_k or len(probs)])
    row: dict[str, Any] = {"image": path, "label": top, "probability": round(probability, 6), "reason": ""}
    if opts.abstain_below is not None and probability < opts.abstain_below:
        row["label"] = ABSTAINED
        row["reason"] = f"top probability {probability:.3f} < {opts.abstain_below} (top label: {top})"
    return row | {f"p_{label}": round(shown[label], 6) if label in shown else None for label in labels}


def skipped_row(path: str, reason: str) -> dict[str, Any]:
    return {"image": path, "label": "", "probability": None, "reason": f"skipped: {reason}"}


def batch_rows(model: Any, paths: list[str], labels: list[str], opts: PredictOptions) -> list[dict[str, Any]]:
    """One model call per batch for the readable images; rows in the order of `paths`."""
    rows: dict[str, dict[str, Any]] = {}
    images = {}
    for path in paths:
        if not is_image_file(path):
            suffix = os.path.splitext(path)[1] or "(none)"
            rows[path] = skipped_row(path, f"not an image file (suffix {suffix})")
            continue
        try:
            images[path] = load_image(path)
        except ImageLoadError as err:
            rows[path] = skipped_row(path, str(err))
    if images:
        pictures = list(images.values())
        ranked = model.classify(pictures, labels, batch_size=len(pictures))
        texts = [None] * len(pictures)
        if opts.describe:
            texts = model.describe(pictures, max_new_tokens=opts.max_new_tokens, batch_size=len(pictures))
        for path, probs, text in zip(images, ranked, texts):
            rows[path] = image_row(path, probs, opts, labels) | {"description": text}
    return [rows[path] for path in paths]


def chunks(items: list[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def cmd_predict(opts: PredictOptions) -> None:
    from tqdm.auto import tqdm

    from .builder import load

    check_options(opts)
    files = find_files(opts.images)
    model = load(opts.adapter)
    labels = [label.strip() for label in opts.labels.split(",")] if opts.labels else list(model.config.labels)
    if not labels:
        raise ValueError("this adapter was not trained on class labels; pass --labels a,b,c.")
    fieldnames = columns(labels, opts.describe)
    done = already_written(opts.output, fieldnames) if opts.resume else set()
    todo = [path for path in files if path not in done]
    counts = {"written": 0, "skipped": 0, ABSTAINED: 0}
    with open(opts.output, "a" if opts.resume else "w", encoding="utf-8", newline="") as fh:
        writer = RowWriter(fh, fieldnames, opts.output.endswith(".csv"))
        bar = tqdm(total=len(files), initial=len(files) - len(todo), unit="image", disable=not opts.progress)
        try:
            for paths in chunks(todo, opts.batch_size):
                rows = batch_rows(model, paths, labels, opts)
                writer.write(rows)
                counts["written"] += len(rows)
                counts["skipped"] += sum(row["reason"].startswith("skipped") for row in rows)
                counts[ABSTAINED] += sum(row["label"] == ABSTAINED for row in rows)
                bar.update(len(paths))
        except KeyboardInterrupt:
            print(f"\ninterrupted: {counts['written']} rows are in {opts.output}; add --resume to continue.")
            raise
        finally:
            bar.close()
    print(
        f"{counts['written']} rows written to {opts.output} ({counts['skipped']} files skipped, "
        f"{counts[ABSTAINED]} abstained, {len(done)} already there)"
    )
