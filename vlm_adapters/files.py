"""The cache folder, and atomic writes: a crash, a full disk or a kill mid-write leaves the previous
file or folder as it was, never a half-written one that a later `load` or `resume_from_checkpoint=True`
would pick.

Used for saved adapters, Trainer checkpoints, Llava exports and the demo's converted assets.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable

STALE_SECONDS = 3600  # staging entries older than this belong to a run that died


def default_cache_dir() -> str:
    """Where the library keeps what it computes once (encoder features, converted assets, the
    compute-dtype decision): `$VLM_ADAPTERS_CACHE`, else `~/.cache/vlm_adapters`."""
    return os.environ.get("VLM_ADAPTERS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "vlm_adapters")


def _staging_prefix(target: str) -> str:
    return f".{os.path.basename(target)}.tmp-"


def _remove_stale_staging(target: str) -> None:
    parent, prefix = os.path.dirname(target), _staging_prefix(target)
    for name in os.listdir(parent):
        path = os.path.join(parent, name)
        if name.startswith(prefix) and time.time() - os.path.getmtime(path) > STALE_SECONDS:
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.remove(path)


def replace_folder(source: str, target: str) -> None:
    """Move the fully written folder `source` to `target`, so `target` is always the old or the new one."""
    backup = None
    if os.path.exists(target):
        backup = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.old-", dir=os.path.dirname(target))
        os.rmdir(backup)
        os.rename(target, backup)
    os.rename(source, target)
    if backup:
        shutil.rmtree(backup, ignore_errors=True)


def write_folder_atomically(target: str | os.PathLike, write: Callable[[str], None]) -> str:
    """Run `write(staging)` in a temporary sibling of `target`, then move it into place in one step.
    Returns the absolute path of `target`."""
    target = os.path.abspath(os.fspath(target))
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    _remove_stale_staging(target)
    staging = tempfile.mkdtemp(prefix=_staging_prefix(target), dir=parent)
    try:
        write(staging)
        replace_folder(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def write_file_atomically(path: str, write: Callable[[str], None]) -> str:
    """Run `write(temporary path)` beside `path`, then rename the file over `path`."""
    fd, staging = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=_staging_prefix(path))
    os.close(fd)
    try:
        write(staging)
        os.replace(staging, path)
    finally:
        if os.path.exists(staging):
            os.remove(staging)
    return path
