"""`vlm-adapters explain`: a folder or glob of images -> one heatmap overlay PNG per image.

Each overlay shows which part of the image made the model give its label (`model.explain`). A file
that is not an image, or cannot be decoded, is skipped with a message naming it and why; the rest
are still written.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

from .cli_predict import find_files
from .images import ImageLoadError, is_image_file


@dataclass
class ExplainOptions:
    """Write a heatmap overlay per image: which part of it made the model give its label."""

    adapter: str = field(metadata={"help": "adapter folder or Hub repo id"})
    images: str = field(metadata={"help": "a folder (searched at any depth) or a glob such as 'scans/*.png'"})
    output_dir: str = field(default="explanations", metadata={"help": "where the overlay PNGs go"})
    labels: str | None = field(default=None, metadata={"help": "comma-separated labels; default: the adapter's"})
    label: str | None = field(
        default=None, metadata={"help": "explain this label for every image (default: its top one)"}
    )
    prompt: str | None = field(default=None, metadata={"help": "the classification prompt (default: the adapter's)"})


def input_files(pattern: str) -> tuple[str, list[str]]:
    """(the folder the files are named relative to, every file of a folder at any depth or of a glob, sorted)."""
    files = find_files(pattern)
    if os.path.isdir(pattern):
        return pattern, files
    return os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in files]), files


def overlay_path(path: str, root: str, output_dir: str) -> str:
    """`output_dir` / the file's path below `root`, as a PNG (sub-folders kept, so equal names do not collide)."""
    relative = os.path.relpath(os.path.abspath(path), os.path.abspath(root))
    return os.path.join(output_dir, os.path.splitext(relative)[0] + ".png")


def cmd_explain(opts: ExplainOptions) -> None:
    from .builder import load

    root, files = input_files(opts.images)
    model = load(opts.adapter)
    labels = [label.strip() for label in opts.labels.split(",")] if opts.labels else None
    written = 0
    for path in files:
        if not is_image_file(path):
            print(f"skipped {path}: not an image file", file=sys.stderr)
            continue
        try:
            explanation = model.explain(path, label=opts.label, prompt=opts.prompt, labels=labels)
        except ImageLoadError as err:
            print(f"skipped {path}: {str(err).removeprefix(path + ': ')}", file=sys.stderr)
            continue
        target = overlay_path(path, root, opts.output_dir)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        explanation.save(target)
        written += 1
        print(f"{path}: {explanation.label} ({explanation.score:.1%}) -> {target}")
    print(f"{written} overlays written to {opts.output_dir}; {len(files) - written} files skipped")
