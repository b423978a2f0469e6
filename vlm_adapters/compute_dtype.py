"""`compute_dtype="auto"` on a CPU: bfloat16 or float32, decided once per machine and cached.

Which one is faster depends on the CPU (AVX512-BF16 without AMX runs fp32 faster, AMX runs bf16
faster), so it is timed. A timing of a few milliseconds taken at every `attach` flipped with the
load on the machine, and the dtype with it, so two identical runs gave different numbers. The
decision is now timed once (medians of interleaved repetitions) and kept in
`$VLM_ADAPTERS_CACHE/compute_dtype.json`, keyed by what decides the speed: CPU model and flags,
torch version, thread count. Delete the file to time again; pass `compute_dtype=` to choose.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import tempfile
import time
from typing import Any

import torch
from filelock import FileLock
from transformers.utils import logging

from .files import default_cache_dir

logger = logging.get_logger(__name__)
DECISIONS_FILE = "compute_dtype.json"
REPEATS = 9


def faster_dtype(fp32_seconds: float, bf16_seconds: float) -> str:
    """bfloat16 only when it is clearly (>= 1.25x) faster: fp32 is the more exact of the two."""
    return "bfloat16" if bf16_seconds < 0.8 * fp32_seconds else "float32"


def _matmul_seconds(dtype: torch.dtype, tokens: int = 256, width: int = 1024) -> float:
    """One timing of a [tokens, width] x [width, width] matmul, the shape of an LLM's linear layer."""
    x, w = torch.ones(tokens, width, dtype=dtype), torch.ones(width, width, dtype=dtype)
    start = time.perf_counter()
    x @ w.T
    return time.perf_counter() - start


def machine_key() -> str:
    """What decides the bf16 / fp32 speed ratio: CPU model and flags, torch version, thread count."""
    model, flags = platform.processor() or platform.machine(), ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            info = dict(map(str.strip, line.split(":", 1)) for line in fh.read().splitlines() if ":" in line)
        model, flags = info.get("model name", model), info.get("flags", "")
    except OSError:  # not Linux: the processor name stands for the model
        pass
    digest = hashlib.sha256(flags.encode()).hexdigest()[:12]
    return f"{model} | flags {digest} | torch {torch.__version__} | {torch.get_num_threads()} threads"


def _time_both() -> dict[str, Any]:
    """Medians of interleaved repetitions (after a warm-up of each), so a passing load spike is outvoted."""
    _matmul_seconds(torch.float32), _matmul_seconds(torch.bfloat16)
    fp32, bf16 = [], []
    for _ in range(REPEATS):
        fp32.append(_matmul_seconds(torch.float32))
        bf16.append(_matmul_seconds(torch.bfloat16))
    fp32_ms, bf16_ms = 1e3 * statistics.median(fp32), 1e3 * statistics.median(bf16)
    return {"dtype": faster_dtype(fp32_ms, bf16_ms), "fp32_ms": round(fp32_ms, 3), "bf16_ms": round(bf16_ms, 3)}


def _read(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):  # absent or damaged: time again
        return {}
    return data if isinstance(data, dict) else {}


def _write(path: str, data: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".compute_dtype-", dir=os.path.dirname(path))
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, sort_keys=True)
    os.replace(tmp, path)


def cpu_compute_dtype() -> str:
    """This machine's cached decision, timed and cached on first use; one log line says which and why."""
    path, key = os.path.join(default_cache_dir(), DECISIONS_FILE), machine_key()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with FileLock(path + ".lock"):  # processes started together (torchrun) wait for one decision
        decisions = _read(path)
        decision = decisions.get(key)
        how = f"the decision cached for this machine in {path}"
        if not isinstance(decision, dict) or decision.get("dtype") not in ("float32", "bfloat16"):
            decision = decisions[key] = _time_both()
            _write(path, decisions)
            how = f"timed now, cached in {path}"
    logger.info(
        f"compute_dtype='auto' on this CPU ({key}): {decision['dtype']}, {how}. A [256, 1024] x [1024, 1024] "
        f"matmul took {decision.get('fp32_ms')} ms in float32 and {decision.get('bf16_ms')} ms in bfloat16 "
        "(median); bfloat16 is chosen only when >= 1.25x faster. Pass compute_dtype= to choose yourself."
    )
    return decision["dtype"]
